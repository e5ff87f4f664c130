"""Causal tracing: the sweep core, the reference and fast engines, and `trace`."""

from audiolens_ct.choices import ENGINES, KINDS, MODES
from audiolens_ct.errors import ExactnessError
from audiolens_ct.tracing.result import TraceResult
from audiolens_ct.tracing.sweep import Patch, Sweep, layer_wise, token_wise
from audiolens_ct.tracing.trace import aligned_positions, trace

__all__ = [
    "ENGINES",
    "ExactnessError",
    "KINDS",
    "MODES",
    "Patch",
    "Sweep",
    "TraceResult",
    "aligned_positions",
    "layer_wise",
    "token_wise",
    "trace",
]
