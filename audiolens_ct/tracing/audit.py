"""The runtime exactness audit: a fast trace re-computes a few of its own cells the slow, obvious way.

The fast engine is exact by construction, but its construction rests on other libraries (how attention reads keys
and values, how the bridge wraps a layer), and those change between releases. So every `trace(..., engine="fast")`
recomputes some cells of its own grids with plain full forward passes through the TransformerLens hooks (the
reference engine), and compares:

- the corrupted run itself (its probability of the target, with no patch);
- layer-wise: the last layer's cell;
- token-wise: the last position at a layer drawn from the seed, and two more (layer, position) cells drawn from
  the seed. Layers where the fast engine computes nothing (a residual patch before layer 0 writes the values
  already there) are not drawn.

That is a handful of extra forwards per clip, not a fraction of the grid. A difference beyond the tolerance of the
model's dtype raises `ExactnessError`, naming the cell, both values and the installed library versions: a trace
never returns numbers its own audit disagrees with. The cells and the largest difference are kept in
`TraceResult.audit`.

Tolerances, in probability (`TOLERANCE`). The fast engine's attention does the bridge's arithmetic, so the two
engines differ only where matrix products of other shapes round differently: measured on CPU up to 6.6e-7 in
float32 (the trained demo model) and 0 in bfloat16 and float16 (test models and demo model). Kernels of other
shapes or devices may round otherwise; swapping PyTorch's fused attention in for the matmul one, as a stand-in for
such differences, moved probabilities by up to 1.8e-3 (bfloat16) and 1.9e-4 (float16). The tolerances sit well
above those and far below what a broken engine gives (losing the prefix moves RR by ~0.5-1).
"""

from __future__ import annotations

import importlib.metadata
import random
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from transformer_lens.ActivationCache import ActivationCache

from audiolens_ct.errors import ExactnessError
from audiolens_ct.inputs import LALMInput
from audiolens_ct.tracing.engine import CorruptedRun, Metric
from audiolens_ct.tracing.engine_reference import ReferenceEngine, patched_metric
from audiolens_ct.tracing.patches import PatchSet

if TYPE_CHECKING:
    from audiolens_ct.model import HookedLALM

TOLERANCE = {torch.float32: 1e-5, torch.float64: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}
"""Largest accepted |fast - reference| in probability, by the model's parameter dtype."""

TOKEN_CELLS = 3


def versions() -> dict[str, str]:
    """Installed versions of the libraries a trace's numbers depend on."""
    out = {}
    for name in ("audiolens-ct", "torch", "transformers", "transformer-lens"):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "unknown"
    return out


def layer_cells(n_layers: int) -> list[int]:
    """Audited indices of a layer-wise patch set: the last layer."""
    return [n_layers - 1]


def token_cells(n_layers: int, n_positions: int, seed: int, first_live_layer: int = 0) -> list[int]:
    """Audited indices of a layer-major token-wise patch set `[n_layers, n_positions]`: the last position at a layer
    drawn from `seed`, and `TOKEN_CELLS - 1` more distinct cells drawn from `seed`, all at layers >=
    `first_live_layer` (when the model has such layers)."""
    rng = random.Random(f"audiolens-ct audit {seed}")
    layers = range(first_live_layer, n_layers) if first_live_layer < n_layers else range(n_layers)
    cells = [rng.choice(layers) * n_positions + n_positions - 1]
    candidates = [lay * n_positions + j for lay in layers for j in range(n_positions)]
    others = [c for c in candidates if c != cells[0]]
    cells += rng.sample(others, min(TOKEN_CELLS - 1, len(others)))
    return cells


def corrupted_cell(model: HookedLALM, corrupted: CorruptedRun, metric: Metric) -> dict[str, Any]:
    """The unpatched corrupted run: the fast engine's value next to a full TransformerLens forward's."""
    reference = ReferenceEngine().run_corrupted(model, corrupted.input)
    return dict(mode="corrupted", fast=float(metric(corrupted.last_logits)), reference=float(metric(reference.last_logits)))


def recompute(
    model: HookedLALM,
    mode: str,
    patches: PatchSet,
    fast: np.ndarray,
    picks: Sequence[int],
    clean_cache: ActivationCache,
    corrupted: LALMInput,
    metric: Metric,
    describe: Callable[[int], dict[str, Any]],
) -> list[dict[str, Any]]:
    """The audited cells `picks` of a patch set: their fast values next to the reference engine's."""
    return [
        dict(mode=mode, **describe(i), fast=float(fast[i]),
             reference=patched_metric(model, patches.kind, patches.patches[i], clean_cache, corrupted, metric))
        for i in picks
    ]


def verdict(cells: list[dict[str, Any]], model: HookedLALM) -> dict[str, Any]:
    """The audit record of a trace; raises `ExactnessError` if a cell differs by more than the tolerance of the
    model's dtype."""
    dtype = next(model.bridge.parameters()).dtype
    tol = TOLERANCE.get(dtype, TOLERANCE[torch.float32])
    name = str(dtype).removeprefix("torch.")
    for cell in cells:
        cell["abs_diff"] = abs(cell["fast"] - cell["reference"])
    worst = max(cells, key=lambda c: c["abs_diff"])
    if not worst["abs_diff"] <= tol:  # also catches NaN
        where = ", ".join(f"{k} {worst[k]!r}" for k in worst if k not in ("fast", "reference", "abs_diff", "mode"))
        found = ", ".join(f"{k} {v}" for k, v in versions().items())
        raise ExactnessError(
            f"the fast engine disagrees with full TransformerLens forwards at the {worst['mode']} cell"
            f"{f' ({where})' if where else ''}: fast P={worst['fast']:.8g}, reference P={worst['reference']:.8g}, "
            f"|diff| {worst['abs_diff']:.3g} > {tol:g} ({name}). Installed: {found}. Use engine='transformer_lens' "
            "(CLI --engine transformer_lens), or install the tested versions (constraints.txt), and please report this."
        )
    return dict(cells=cells, max_abs_diff=worst["abs_diff"], tolerance=tol, dtype=name)
