"""Where the observational views of a run live: `lens.json` (the logit lens, `lens.py`) and `steering.json` (the β
sweep, `steering.py`), beside a tracing run's records in the same output directory.

Each file is written whole (atomically) by `audiolens-ct lens` / `audiolens-ct steer` (or the demo) and read by the
figures and the report, which show them when present. This module imports nothing heavy, so the report and the
command line read these files without loading torch.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from audiolens_ct.store import atomic_write_json

LENS = "lens.json"
STEERING = "steering.json"
VIEWS = (LENS, STEERING)


def write_view(out_dir: str | Path, name: str, data: dict[str, Any]) -> Path:
    """Write one view (`LENS` or `STEERING`) into `out_dir`, replacing an earlier one whole."""
    if name not in VIEWS:
        raise ValueError(f"unknown view file {name!r}; use one of {', '.join(VIEWS)}")
    return atomic_write_json(Path(out_dir) / name, data)


def load_view(out_dir: str | Path | None, name: str) -> dict[str, Any] | None:
    """The view `name` of `out_dir`, or None when the directory has none (or there is no directory)."""
    if out_dir is None:
        return None
    path = Path(out_dir) / name
    if not path.is_file():
        return None
    return json.loads(path.read_text(encoding="utf-8"))
