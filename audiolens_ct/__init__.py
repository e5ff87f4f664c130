"""audiolens-ct: causal tracing of audio-text fusion in large audio language models, on TransformerLens.

The stable surface is the names below, plus documented submodules: `audiolens_ct.tracing` (patch sets, engines,
scoring: for new analyses), `audiolens_ct.ports` (for writing a port), `audiolens_ct.plots` (figures),
`audiolens_ct.testing` (tiny models, the port conformance kit), `audiolens_ct.demo` (the demo model and its
synthetic clips), `audiolens_ct.executors` (where a data-set run traces: `RayExecutor`, `ModelSpec`),
`audiolens_ct.lens` (the logit lens), `audiolens_ct.steering` (audio–silence steering; `HookedLALM.generate` runs
its hooks), `audiolens_ct.errors` (every error, under `AudiolensError`) and `audiolens_ct.cli.main` (the command
line in-process). Anything else may move between releases.

    model = HookedLALM.from_pretrained("Qwen/Qwen2-Audio-7B-Instruct")
    gender = get_track("gender")
    res = trace(model, "clip.wav", gender.prompt, gender.response_prefix, target="female", options=gender.labels)
    run_experiment(model, load_sakura("SAKURA", ["gender"]), "runs/qwen2", TraceConfig(modes=("layer",)))

Names are imported on first use, so `import audiolens_ct` (and the command line's `--help`) costs nothing until a
model is touched.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.3.0"

_HOMES = {
    "AudiolensError": "audiolens_ct.errors",
    "HookedLALM": "audiolens_ct.model",
    "LALMInput": "audiolens_ct.inputs",
    "Port": "audiolens_ct.ports",
    "TraceConfig": "audiolens_ct.config",
    "TraceResult": "audiolens_ct.tracing.result",
    "available_ports": "audiolens_ct.ports",
    "get_track": "audiolens_ct.data.prompts",
    "load_audio": "audiolens_ct.audio",
    "load_manifest": "audiolens_ct.data.manifest",
    "load_sakura": "audiolens_ct.data.sakura",
    "register_port": "audiolens_ct.ports",
    "run_experiment": "audiolens_ct.experiment",
    "trace": "audiolens_ct.tracing.clip",
    "write_report": "audiolens_ct.report",
}

__all__ = [
    "AudiolensError",
    "HookedLALM",
    "LALMInput",
    "Port",
    "TraceConfig",
    "TraceResult",
    "available_ports",
    "get_track",
    "load_audio",
    "load_manifest",
    "load_sakura",
    "register_port",
    "run_experiment",
    "trace",
    "write_report",
]

if TYPE_CHECKING:
    from audiolens_ct.audio import load_audio
    from audiolens_ct.config import TraceConfig
    from audiolens_ct.data.manifest import load_manifest
    from audiolens_ct.data.prompts import get_track
    from audiolens_ct.data.sakura import load_sakura
    from audiolens_ct.errors import AudiolensError
    from audiolens_ct.experiment import run_experiment
    from audiolens_ct.inputs import LALMInput
    from audiolens_ct.model import HookedLALM
    from audiolens_ct.ports import Port, available_ports, register_port
    from audiolens_ct.report import write_report
    from audiolens_ct.tracing.clip import trace
    from audiolens_ct.tracing.result import TraceResult


def __getattr__(name: str) -> Any:
    if name in _HOMES:
        value = getattr(importlib.import_module(_HOMES[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'audiolens_ct' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
