"""The reference engine: every patch is one full forward pass through TransformerLens.

Single-layer sweeps go through `transformer_lens.patching.generic_activation_patch`, unchanged, with the sweep
as its `index_df` (columns `layer`, `patch`); a ROME window patches several layers in one forward, which that
function cannot express, so windows run the same hooks through `run_with_hooks` directly (`patched_metric`, also
the exactness audit's forward). This engine is slow
and obviously right; the fast engine is tested against it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pandas as pd
import torch
from jaxtyping import Float
from transformer_lens import patching
from transformer_lens.ActivationCache import ActivationCache
from transformer_lens.utilities import get_act_name

from audiolens_ct.inputs import LALMInput
from audiolens_ct.tracing.sweep import Patch, Sweep


def _restore(corrupted_act: torch.Tensor, patch: Patch, clean_act: torch.Tensor) -> torch.Tensor:
    corrupted_act[:, list(patch.dst)] = clean_act[:, list(patch.src)].to(corrupted_act.dtype)
    return corrupted_act


def evaluate_reference(
    model: Any,
    sweep: Sweep,
    clean_cache: ActivationCache,
    corrupted: LALMInput,
    metric: Callable[[torch.Tensor], torch.Tensor],
) -> Float[torch.Tensor, " n_patches"]:
    """`metric(logits)` of the corrupted run with each patch of `sweep` applied, one forward per patch."""
    if all(len(p.layers) == 1 for p in sweep.patches):
        index_df = pd.DataFrame(
            {"layer": [p.layers[0] for p in sweep.patches], "patch": range(len(sweep.patches))}
        )

        def setter(corrupted_act: torch.Tensor, index: list[int], clean_act: torch.Tensor) -> torch.Tensor:
            return _restore(corrupted_act, sweep.patches[index[1]], clean_act)

        with torch.no_grad():
            values = patching.generic_activation_patch(
                model, corrupted, clean_cache, metric, setter, sweep.kind, index_axis_names=None, index_df=index_df
            )
        return values.detach().cpu().double()

    return torch.tensor([patched_metric(model, sweep.kind, patch, clean_cache, corrupted, metric)
                         for patch in sweep.patches], dtype=torch.float64)


def patched_metric(
    model: Any,
    kind: str,
    patch: Patch,
    clean_cache: ActivationCache,
    corrupted: LALMInput,
    metric: Callable[[torch.Tensor], torch.Tensor],
) -> float:
    """`metric(logits)` of one full forward of `corrupted` with `patch` applied through TransformerLens hooks."""
    hooks = []
    for layer in patch.layers:
        name = get_act_name(kind, layer)

        def hook(act: torch.Tensor, hook: Any, name: str = name) -> torch.Tensor:
            return _restore(act.clone(), patch, clean_cache[name])

        hooks.append((name, hook))
    with torch.no_grad():
        return float(metric(model.run_with_hooks(corrupted, fwd_hooks=hooks)))
