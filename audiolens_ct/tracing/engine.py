"""The engine protocol: how a patch set is evaluated on one corrupted input.

An engine does two things, with the same signature in every engine:

1. `run_corrupted(model, corrupted)` runs the corrupted input once, unpatched, and returns a `CorruptedRun`: the
   input, its last-position logits (P_corrupted comes from these), and whatever the engine keeps to evaluate
   patches later (the fast engine: residuals and keys/values; the reference engine: nothing more).
2. `evaluate(model, patches, clean_cache, corrupted, metric)` returns `metric(last_logits)` of the corrupted run
   with each patch applied, one value per patch, in order. `metric` maps the last position's logits of the
   corrupted copies, `[copies, vocab]`, to a scalar (`scoring.answer_probability` in tracing) — the shape of
   callable `transformer_lens.patching` takes, read at the last position.

Engines differ only in how a patch set is evaluated; the numbers are the same (the suite checks it, and every
fast trace audits a few cells against the reference). A new engine implements these two methods and is
registered in `ENGINE_CLASSES`; its dataclass fields named like `TraceConfig` fields are filled from the config.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Protocol

import torch
from jaxtyping import Float
from transformer_lens.ActivationCache import ActivationCache

from audiolens_ct.config import TraceConfig
from audiolens_ct.errors import InputError
from audiolens_ct.inputs import LALMInput
from audiolens_ct.tracing.patches import PatchSet

if TYPE_CHECKING:
    from audiolens_ct.model import HookedLALM

Metric = Callable[[Float[torch.Tensor, "copies vocab"]], Float[torch.Tensor, ""]]
"""A function of the last position's logits of the corrupted copies, e.g. P(answer) averaged over the copies."""


@dataclass
class CorruptedRun:
    """The corrupted input, run once without patches: its last-position logits, and what the engine keeps."""

    input: LALMInput
    last_logits: Float[torch.Tensor, "copies vocab"]


class Engine(Protocol):
    """Evaluates patch sets; see the module docstring."""

    name: str

    def run_corrupted(self, model: HookedLALM, corrupted: LALMInput) -> CorruptedRun: ...

    def evaluate(
        self, model: HookedLALM, patches: PatchSet, clean_cache: ActivationCache, corrupted: CorruptedRun, metric: Metric
    ) -> Float[torch.Tensor, " n_patches"]: ...


ENGINE_CLASSES = {
    "fast": "audiolens_ct.tracing.engine_fast:FastEngine",
    "transformer_lens": "audiolens_ct.tracing.engine_reference:ReferenceEngine",
}
"""Engine name -> `module:Class` (imported on first use; names as in `choices.ENGINES`)."""


def get_engine(config: TraceConfig) -> Engine:
    """The engine `config.engine`, built with the config's fields it declares (the fast engine: `max_batch`)."""
    if config.engine not in ENGINE_CLASSES:
        raise InputError(f"unknown engine {config.engine!r}; use one of {', '.join(ENGINE_CLASSES)}")
    module, _, name = ENGINE_CLASSES[config.engine].partition(":")
    cls = getattr(importlib.import_module(module), name)
    wanted = {f.name for f in fields(cls)} & {f.name for f in fields(config)}
    return cls(**{key: getattr(config, key) for key in wanted})
