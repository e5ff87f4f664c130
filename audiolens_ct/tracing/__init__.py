"""Causal tracing of one clip: patch sets, the engines that evaluate them, scoring, the audit, and `trace`.

Read `patches.py` first (the method, and what a patch is), then `clip.py` (`trace` as five named steps),
`engine.py` (the protocol both engines implement), `engine_fast.py` and `audit.py`; `spans.py` and `timeline.py`
resolve the groups of positions and the windows of audio that group-wise and time-wise tracing restore.
"""

from audiolens_ct.tracing.clip import aligned_positions, trace
from audiolens_ct.tracing.engine import CorruptedRun, Engine, get_engine
from audiolens_ct.tracing.patches import (
    HEAD_KIND,
    Patch,
    PatchSet,
    group_wise,
    head_wise,
    layer_wise,
    token_wise,
)
from audiolens_ct.tracing.result import TraceResult
from audiolens_ct.tracing.scoring import answer_probability, answer_token, answer_tokens

__all__ = [
    "HEAD_KIND",
    "CorruptedRun",
    "Engine",
    "Patch",
    "PatchSet",
    "TraceResult",
    "aligned_positions",
    "answer_probability",
    "answer_token",
    "answer_tokens",
    "get_engine",
    "group_wise",
    "head_wise",
    "layer_wise",
    "token_wise",
    "trace",
]
