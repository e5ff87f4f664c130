"""The packaged demonstration: the whole product, end to end, on a small model that really listens.

`run_demo(out)` needs no GPU and no model hub. It loads the demo model shipped in `audiolens_ct/assets/demo_model/`
(a small `Qwen2AudioForConditionalGeneration` trained by `scripts/train_demo_model.py` to answer the four AudioLens
questions from synthetic clips) by the same code path as a hub checkpoint, writes a fresh held-out synthetic SAKURA
under `out/data` (clips the model never saw in training), traces every clip layer- and token-wise with silence as
the corruption, reads the logit lens and sweeps audio–silence steering on a few clips per attribute, and writes what
a researcher gets on a real model:

```
out/data/<Track>/...                 the clips, in SAKURA's GitHub layout
out/records/<attribute>/<id>.json    one record per clip: kept (RR maps), excluded (with the rule) or error
out/manifest.json, out/aggregate.json
out/lens.json, out/steering.json     the logit lens and a steering β sweep on 6 clips per attribute
out/figures/*.html                   layer-wise RR, segment RR and token-wise heatmaps (interactive, offline)
out/report.html                      the self-contained report
```

Re-running into the same `out` resumes: finished clips are skipped.

Two parts: `audiolens_ct.demo.synthetic` makes the clips (the training script, tests and notebooks use it too), and
`audiolens_ct.demo.run` runs the demo. The run's names are imported from `run` on first use, so that making clips
never loads the model stack.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

DEMO_MODEL = Path(__file__).resolve().parent.parent / "assets" / "demo_model"
DEMO_SEED = 7  # clip seed of the demo set; training used seeds 0 (train) and 1 (held-out)

__all__ = ["CLIPS_PER_LABEL", "DEMO_MODEL", "DEMO_SEED", "demo_model_path", "run_demo", "write_demo_data"]
_RUN = ("CLIPS_PER_LABEL", "demo_model_path", "run_demo", "write_demo_data")

if TYPE_CHECKING:
    from audiolens_ct.demo.run import CLIPS_PER_LABEL, demo_model_path, run_demo, write_demo_data


def __getattr__(name: str) -> Any:
    if name in _RUN:
        value = getattr(importlib.import_module("audiolens_ct.demo.run"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'audiolens_ct.demo' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
