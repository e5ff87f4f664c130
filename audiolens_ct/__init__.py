"""audiolens-ct: causal tracing of audio-text fusion in large audio language models, on TransformerLens.

The public names below are imported on first use, so that `import audiolens_ct` (and the command line's `--help`)
costs nothing until a model is touched.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.2.0"

_HOMES = {
    "AudioLoadError": "audiolens_ct.errors",
    "load_audio": "audiolens_ct.audio",
    "CheckpointError": "audiolens_ct.errors",
    "Port": "audiolens_ct.ports",
    "PortError": "audiolens_ct.errors",
    "available_ports": "audiolens_ct.ports",
    "get_port": "audiolens_ct.ports",
    "register_port": "audiolens_ct.ports",
    "ExactnessError": "audiolens_ct.errors",
    "TraceResult": "audiolens_ct.tracing",
    "trace": "audiolens_ct.tracing",
    "HookedLALM": "audiolens_ct.model",
    "InputError": "audiolens_ct.errors",
    "LALMInput": "audiolens_ct.inputs",
}

__all__ = [
    "AudioLoadError",
    "CheckpointError",
    "ExactnessError",
    "HookedLALM",
    "InputError",
    "LALMInput",
    "Port",
    "PortError",
    "TraceResult",
    "available_ports",
    "get_port",
    "load_audio",
    "register_port",
    "testing",
    "trace",
]

if TYPE_CHECKING:
    from audiolens_ct import testing
    from audiolens_ct.audio import load_audio
    from audiolens_ct.errors import AudioLoadError, CheckpointError, ExactnessError, InputError, PortError
    from audiolens_ct.inputs import LALMInput
    from audiolens_ct.model import HookedLALM
    from audiolens_ct.ports import Port, available_ports, get_port, register_port
    from audiolens_ct.tracing import TraceResult, trace


def __getattr__(name: str) -> Any:
    if name == "testing":
        return importlib.import_module("audiolens_ct.testing")
    if name in _HOMES:
        value = getattr(importlib.import_module(_HOMES[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'audiolens_ct' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
