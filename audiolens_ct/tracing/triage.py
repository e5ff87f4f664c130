"""Triage: rank a grid's cells by their AtP* estimate, recompute the top ones exactly, and say what was missed.

AtP* (`attribution.py`) estimates every cell of a grid at the cost of about three forward passes, but its values
are first-order estimates, poor where silence moves P a long way (its docstring says where). So the estimates
only choose where to look: the k best-scored cells are recomputed exactly with an engine (the fast one by default;
those values are the grid's own), and the rest stay estimates.

k is the largest number of top-scored cells whose exact verification costs at most `budget` of the whole exact
grid (default 10 %), at least one, in the fast engine's cost model (`verification_cost`): cells restoring the same
positions share one pass, which recomputes the suffix from the first patched position to the end through the
layers from the lowest patched layer up; extra rows in a pass are nearly free (a GPU, or a small model on a CPU,
is bound by the pass, not the rows). So a budget of 0.1 allows many cells at late layers but few audio windows at
layer 0.

When the exact grid was computed too (`trace` with the grid's own analysis on), `compare` reports what the triage
would have cost a researcher: the rank correlation of the estimates with the exact values, the largest |RR| among
the cells it did not verify, how far the estimates are off, and the time against the exact grid.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from jaxtyping import Float
from scipy import stats
from transformer_lens.ActivationCache import ActivationCache

from audiolens_ct.choices import ATP_GRIDS
from audiolens_ct.config import TraceConfig
from audiolens_ct.errors import InputError
from audiolens_ct.inputs import LALMInput
from audiolens_ct.tracing.attribution import Attribution, attribute, recorded_names
from audiolens_ct.tracing.engine import CorruptedRun, Engine, Metric
from audiolens_ct.tracing.patches import Patch, PatchSet, group_wise, head_wise, token_wise
from audiolens_ct.tracing.spans import after_audio, corresponding, resolve_span
from audiolens_ct.tracing.timeline import time_windows

if TYPE_CHECKING:
    from audiolens_ct.model import HookedLALM

DEFAULT_BUDGET = TraceConfig.atp_budget
"""Exact verification may cost this fraction of the exact grid (the issue's 10 %)."""


def verification_cost(patches: Sequence[Patch], length: int, n_layers: int) -> int:
    """The fast engine's work for these patches: per pass (the patches restoring the same positions), the suffix
    positions it recomputes times the layers it walks."""
    lowest: dict[tuple[tuple[int, ...], tuple[int, ...]], int] = {}
    for p in patches:
        lowest[p.src, p.dst] = min(lowest.get((p.src, p.dst), n_layers), min(p.layers))
    return sum((length - min(dst)) * (n_layers - layer) for (_, dst), layer in lowest.items())


def budgeted_cells(
    patches: PatchSet, score: Float[np.ndarray, " n_patches"], length: int, n_layers: int, budget: float
) -> list[int]:
    """The largest number of top-scored cells (at least one) whose exact verification costs at most `budget` of
    the whole grid's (`verification_cost`), best score first."""
    if not 0 < budget <= 1:
        raise InputError(f"the verification budget must be a fraction in (0, 1], got {budget!r}")
    allowed = budget * verification_cost(patches.patches, length, n_layers)
    order = [int(i) for i in np.argsort(-np.asarray(score), kind="stable")]
    lowest: dict[tuple[tuple[int, ...], tuple[int, ...]], int] = {}
    spent = 0
    for k, i in enumerate(order):
        patch = patches.patches[i]
        key, layer = (patch.src, patch.dst), min(patch.layers)
        before = lowest.get(key, n_layers)
        spent += (length - min(patch.dst)) * (before - min(before, layer))  # the pass now walks from `layer`
        if spent > allowed and k > 0:
            return order[:k]
        lowest[key] = min(before, layer)
    return order


@dataclass
class Triage:
    """AtP* on one grid: every cell estimated, the top cells recomputed exactly.

    Attributes:
        attribution: the estimates (`Attribution`: AtP, AtP*, the score, P_corrupted).
        verified: indices (into the patch set) of the cells recomputed exactly, best score first.
        p_verified: their exact values (the engine's), in that order.
        budget: the fraction of the exact grid's cost the verification was allowed.
        seconds: wall time of the estimate (`estimate`: the forwards, the backward(s), the QK fix) and of the exact
            verification (`verify`).
    """

    attribution: Attribution
    verified: list[int]
    p_verified: Float[np.ndarray, " k"]
    budget: float
    seconds: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: the estimates (`p_atp`, `p_atp_star`, `score`), the verified cells and their values."""
        a = self.attribution
        return dict(
            p_corrupted=a.p_corrupted, p_atp=a.atp.tolist(), p_atp_star=a.atp_star.tolist(), score=a.score.tolist(),
            qk_fix=a.qk_fix, graddrop=a.graddrop, verified=self.verified, p_verified=self.p_verified.tolist(),
            budget=self.budget, seconds=self.seconds,
        )  # fmt: skip


def triage(
    model: HookedLALM, patches: PatchSet, clean: LALMInput, corrupted: LALMInput, metric: Metric, engine: Engine, *,
    budget: float = DEFAULT_BUDGET, graddrop: bool = False, clean_cache: ActivationCache | None = None,
    corrupted_run: CorruptedRun | None = None,
) -> Triage:  # fmt: skip
    """Estimate every cell of `patches` with AtP*, then recompute the top cells (`budgeted_cells`) with `engine`.

    `clean_cache` and `corrupted_run` (the engine's) are reused when given, as `trace` has them; a clean cache
    without what AtP* reads (`recorded_names`) is replaced by one clean forward, timed with the estimate.
    """
    start = time.perf_counter()
    names = set(recorded_names(model, patches))
    if clean_cache is None or not names <= set(clean_cache.cache_dict):
        with torch.no_grad():  # one clean forward serves the estimate and the verification
            _, clean_cache = model.run_with_cache(clean, names_filter=lambda n: n in names)
    attribution = attribute(model, patches, clean, corrupted, metric, graddrop=graddrop, clean_cache=clean_cache)
    estimated = time.perf_counter()
    cells = budgeted_cells(patches, attribution.score, corrupted.shape[1], model.cfg.n_layers, budget)
    if corrupted_run is None:
        corrupted_run = engine.run_corrupted(model, corrupted)
    chosen = PatchSet(patches.kind, tuple(patches.patches[i] for i in cells))
    values = engine.evaluate(model, chosen, clean_cache, corrupted_run, metric).numpy()
    seconds = {"estimate": estimated - start, "verify": time.perf_counter() - estimated}
    return Triage(attribution, cells, values, budget, seconds)


def _spearman(a: np.ndarray, b: np.ndarray) -> float | None:
    """Spearman's rank correlation, or None where it is undefined (a constant grid)."""
    if np.ptp(a) == 0 or np.ptp(b) == 0:
        return None
    return float(stats.spearmanr(a, b).statistic)


def compare(
    result: Triage, p_exact: Float[np.ndarray, " n_patches"], p_clean: float, exact_seconds: float | None = None,
    n_layers: int | None = None,
) -> dict[str, Any]:
    """How the triage did against the exact grid `p_exact` (the same patches, every one computed), JSON-ready.

    - `rank_correlation` / `rank_correlation_atp`: Spearman's rho of the AtP* / plain AtP estimates with the
      exact values over every cell (the same over RR, an increasing function of P);
    - `worst_missed_rr`: the exact RR of largest magnitude among the cells not verified (`worst_missed_cell`, its
      index); `max_error_rr`: the largest |estimated RR - exact RR| (`max_error_cell`), and with `n_layers` (a
      layer-major grid) `error_by_layer`, its mean per layer: where the linear estimate fails. These need
      P_clean > P_corrupted, and are None otherwise;
    - `verified_max_abs_diff`: the largest |verified value - exact grid value| (the engine's exactness);
    - `seconds`: `estimate`, `verify`, and with `exact_seconds` also `exact` and `speedup` = exact / (estimate +
      verify).
    """
    p_exact = np.asarray(p_exact, dtype=np.float64)
    a = result.attribution
    out: dict[str, Any] = dict(
        rank_correlation=_spearman(a.atp_star, p_exact), rank_correlation_atp=_spearman(a.atp, p_exact),
        verified_max_abs_diff=float(np.abs(p_exact[result.verified] - result.p_verified).max()),
        worst_missed_rr=None, worst_missed_cell=None, max_error_rr=None, max_error_cell=None, error_by_layer=None,
    )  # fmt: skip
    denom = p_clean - a.p_corrupted
    if denom > 0:
        rr = (p_exact - a.p_corrupted) / denom
        missed = np.setdiff1d(np.arange(len(rr)), result.verified)
        if len(missed):
            worst = int(missed[np.argmax(np.abs(rr[missed]))])
            out.update(worst_missed_rr=float(rr[worst]), worst_missed_cell=worst)
        error = np.abs((a.atp_star - a.p_corrupted) / denom - rr)
        out.update(max_error_rr=float(error.max()), max_error_cell=int(error.argmax()))
        if n_layers is not None:
            out["error_by_layer"] = error.reshape(n_layers, -1).mean(axis=1).tolist()
    seconds = dict(result.seconds)
    if exact_seconds is not None:
        seconds.update(exact=exact_seconds, speedup=exact_seconds / (seconds["estimate"] + seconds["verify"]))
    out["seconds"] = seconds
    return out


def atp_grid(
    model: HookedLALM, grid: str, config: TraceConfig, clean: LALMInput, corrupted: LALMInput, heard_seconds: float
) -> tuple[str, PatchSet, list[Any]]:
    """The patch set of an AtP* grid (`choices.ATP_GRIDS`) as `trace` builds the same grid, with its key in
    `TraceResult.atp` and its columns: the token grid's clean positions after the audio, the time grid's windows
    (`[start, end)` seconds; `config.time_window`, the timeline's default when None), the head grid's heads
    (restored at the first span of `config.heads`, "last" when there is none)."""
    n_layers = model.cfg.n_layers
    if grid == "token":
        src = after_audio(clean, corrupted)
        return "token", token_wise(n_layers, src, corresponding(clean, corrupted, src), kind=config.kind), src
    if grid == "time":
        width = {} if config.time_window is None else {"width": config.time_window, "hop": config.time_hop}
        windows = time_windows(model, clean, corrupted, heard_seconds, **width)
        patches = group_wise(n_layers, [(w.src, w.dst) for w in windows], kind=config.kind)
        return "time", patches, [[w.start, w.end] for w in windows]
    if grid != "head":
        raise InputError(f"unknown AtP* grid {grid!r}; use one of {', '.join(ATP_GRIDS)}")
    spec = config.heads[0] if config.heads else "last"
    src, dst = resolve_span(model, spec, clean, corrupted)
    return f"head:{spec}", head_wise(n_layers, model.cfg.n_heads, src, dst), list(range(model.cfg.n_heads))


def triage_grids(
    model: HookedLALM, config: TraceConfig, clean: LALMInput, corrupted: LALMInput, heard_seconds: float,
    engine: Engine, metric: Metric, p_clean: float, *, clean_cache: ActivationCache | None = None,
    corrupted_run: CorruptedRun | None = None, evaluated: Mapping[str, tuple[PatchSet, np.ndarray, float]] | None = None,
) -> dict[str, dict[str, Any]]:  # fmt: skip
    """The AtP* triage of each grid of `config.atp`, JSON-ready, by grid key (`atp_grid`): `Triage.to_dict()`
    plus the grid's `shape` `[n_layers, n_columns]` and `columns`, and `comparison` (`compare`) when `evaluated`
    holds the exact grid under that key (`(patches, values, seconds)`, as `trace` evaluated it)."""
    grids = [atp_grid(model, grid, config, clean, corrupted, heard_seconds) for grid in config.atp]
    names = {name for _, patches, _ in grids for name in recorded_names(model, patches)}
    if clean_cache is None or not names <= set(clean_cache.cache_dict):
        with torch.no_grad():  # one clean forward for every grid
            _, clean_cache = model.run_with_cache(clean, names_filter=lambda n: n in names)
    out = {}
    for key, patches, columns in grids:
        exact = (evaluated or {}).get(key)
        result = triage(model, exact[0] if exact else patches, clean, corrupted, metric, engine,
                        budget=config.atp_budget, graddrop=config.atp_graddrop, clean_cache=clean_cache,
                        corrupted_run=corrupted_run)  # fmt: skip
        out[key] = dict(
            shape=[model.cfg.n_layers, len(columns)], columns=columns, **result.to_dict(),
            comparison=compare(result, exact[1], p_clean, exact[2], model.cfg.n_layers) if exact else None,
        )  # fmt: skip
    return out
