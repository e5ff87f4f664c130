"""The reference engine: every patch is one full forward pass through TransformerLens.

Single-layer patch sets go through `transformer_lens.patching.generic_activation_patch`, unchanged, with the patch
set as its `index_df` (columns `layer`, `patch`); a ROME window patches several layers in one forward, which that
function cannot express, so windows run the same hooks through `run_with_hooks` directly (`patched_metric`, also
the exactness audit's forward). A per-head patch writes its heads only, at TransformerLens's `attn.hook_z`. This
engine is slow and obviously right; the fast engine is tested against it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pandas as pd
import torch
from jaxtyping import Float
from transformer_lens import patching
from transformer_lens.ActivationCache import ActivationCache
from transformer_lens.utilities import get_act_name

from audiolens_ct.inputs import LALMInput
from audiolens_ct.tracing.engine import CorruptedRun, Metric
from audiolens_ct.tracing.patches import Patch, PatchSet

if TYPE_CHECKING:
    from audiolens_ct.model import HookedLALM


def _restore(corrupted_act: torch.Tensor, patch: Patch, clean_act: torch.Tensor) -> torch.Tensor:
    """Write the clean activation at the patch's positions (and only its heads, for a per-head patch)."""
    if patch.heads is None:
        corrupted_act[:, list(patch.dst)] = clean_act[:, list(patch.src)].to(corrupted_act.dtype)
    else:
        dst, src, heads = torch.tensor(patch.dst)[:, None], torch.tensor(patch.src)[:, None], list(patch.heads)
        corrupted_act[:, dst, heads] = clean_act[:, src, heads].to(corrupted_act.dtype)
    return corrupted_act


def _at_last_position(metric: Metric) -> Any:
    """`metric` as `transformer_lens.patching` calls it: on the full logits `[copies, pos, vocab]`."""
    return lambda logits: metric(logits[:, -1])


@dataclass
class ReferenceEngine:
    """One full TransformerLens forward per patch (`transformer_lens.patching` for single-layer patches)."""

    name: str = "transformer_lens"

    def run_corrupted(self, model: HookedLALM, corrupted: LALMInput) -> CorruptedRun:
        """One plain forward of the corrupted input through the bridge."""
        with torch.no_grad():
            return CorruptedRun(corrupted, model(corrupted)[:, -1])

    def evaluate(
        self, model: HookedLALM, patches: PatchSet, clean_cache: ActivationCache, corrupted: CorruptedRun, metric: Metric
    ) -> Float[torch.Tensor, " n_patches"]:
        """`metric` of the corrupted run with each patch applied, one forward per patch."""
        if all(len(p.layers) == 1 for p in patches.patches):
            index_df = pd.DataFrame(
                {"layer": [p.layers[0] for p in patches.patches], "patch": range(len(patches.patches))}
            )

            def setter(corrupted_act: torch.Tensor, index: list[int], clean_act: torch.Tensor) -> torch.Tensor:
                return _restore(corrupted_act, patches.patches[index[1]], clean_act)

            with torch.no_grad():
                values = patching.generic_activation_patch(
                    model, corrupted.input, clean_cache, _at_last_position(metric), setter, patches.kind,
                    index_axis_names=None, index_df=index_df,
                )  # fmt: skip
            return values.detach().cpu().double()
        return torch.tensor(
            [patched_metric(model, patches.kind, patch, clean_cache, corrupted.input, metric) for patch in patches.patches],
            dtype=torch.float64,
        )


def patched_metric(
    model: HookedLALM,
    kind: str,
    patch: Patch,
    clean_cache: ActivationCache,
    corrupted: LALMInput,
    metric: Metric,
) -> float:
    """`metric` of one full forward of `corrupted` with `patch` applied through TransformerLens hooks."""
    hooks = []
    for layer in patch.layers:
        name = get_act_name(kind, layer)

        def hook(act: torch.Tensor, hook: Any, name: str = name) -> torch.Tensor:
            return _restore(act.clone(), patch, clean_cache[name])

        hooks.append((name, hook))
    with torch.no_grad():
        return float(metric(model.run_with_hooks(corrupted, fwd_hooks=hooks)[:, -1]))
