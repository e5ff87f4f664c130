"""Step 6 of `trace`: what a clip yields beyond the patching maps -- attention to the audio, and the AtP* triage.

Both are off unless asked for (`TraceConfig.attention`, `TraceConfig.atp`):

- attention to the audio (`attention.py`) is observational and cheap (a forward pass of each input), so it is read
  for every clip, kept or excluded: ranking heads by how their attention goes with answering right needs the clips
  the model gets wrong, which the paper's rules exclude;
- the AtP* triage (`triage.py`) estimates grids of patches, so it runs where the maps run (kept clips, or every
  clip with `trace_excluded`), and is compared with the exact grids `trace` evaluated in step 5 (`evaluated`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
from transformer_lens.ActivationCache import ActivationCache

from audiolens_ct.config import TraceConfig
from audiolens_ct.inputs import LALMInput
from audiolens_ct.tracing.attention import attention_record
from audiolens_ct.tracing.engine import CorruptedRun, Engine, Metric
from audiolens_ct.tracing.patches import PatchSet
from audiolens_ct.tracing.result import TraceResult
from audiolens_ct.tracing.triage import triage_grids

if TYPE_CHECKING:
    from audiolens_ct.model import HookedLALM


def beyond_the_maps(
    model: HookedLALM,
    config: TraceConfig,
    clean: LALMInput,
    corrupted: LALMInput,
    heard_seconds: float,
    metric: Metric,
    result: TraceResult,
    *,
    engine: Engine,
    clean_cache: ActivationCache | None = None,
    corrupted_run: CorruptedRun | None = None,
    evaluated: Mapping[str, tuple[PatchSet, np.ndarray, float]] | None = None,
) -> dict[str, Any]:
    """Attention to the audio and the AtP* triage of one traced clip, as `config` asks: `{"attention": ...,
    "atp": ...}` (the keys asked for), JSON-ready, for `result.attention` / `result.atp`.

    `evaluated` holds the exact grids step 5 computed, by triage key (`"token"`, `"time"`, `"head:<span>"`):
    `(patches, values, seconds)`; the triage is compared with each one it finds there.
    """
    out: dict[str, Any] = {}
    if config.attention:
        out["attention"] = attention_record(model, clean, corrupted)
    if config.atp and (not result.excluded or config.trace_excluded):
        out["atp"] = triage_grids(model, config, clean, corrupted, heard_seconds, engine, metric, result.p_clean,
                                  clean_cache=clean_cache, corrupted_run=corrupted_run, evaluated=evaluated)  # fmt: skip
    return out
