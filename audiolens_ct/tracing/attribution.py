"""AtP*: estimate every cell of a patching grid from two forward passes and one backward pass.

Activation patching (`patches.py`) runs the model once per cell. *Attribution patching* (AtP; Nanda 2023) replaces
each run by a first-order Taylor estimate around the corrupted run: restoring the clean value of activation n
changes the metric M (here P of the answer token) by about

    AtP(n) = (n_clean - n_corrupted) . dM/dn        (the gradient taken in the corrupted run)

so one clean forward (the clean values), one corrupted forward and one backward (every dM/dn at once) estimate
every cell of a grid: layer x position, layer x head (`hook_z`), layer x time window (a window is a set of audio
rows restored jointly; its estimate sums over its rows).

**AtP*** (Kramar, Lieberum, Shah and Nanda 2024, "AtP*: An efficient and scalable method for localizing LLM
behaviour to components") removes AtP's two sources of false negatives:

- *The QK fix (saturated attention).* A patch of the residual stream at layer l changes that layer's queries and
  keys, and a softmax is flat where it saturates: a key that every query comes to attend to moves the pattern a
  lot, while the gradient at the old, saturated pattern says almost nothing. AtP* computes the change of the
  attention pattern exactly -- the softmax recomputed with the clean queries and keys at the patched positions
  (RoPE included) and the corrupted ones elsewhere -- and only what comes after the pattern linearly:
  Sum (A_patched - A_corrupted) * dM/dA. A `resid_pre` patch at layer l thus leaves by three paths, each taken
  from its exact change: the residual stream itself (Delta x . dM/dx less the path through the layer's input
  norm), the values (Delta v . dM/dv) and the pattern (as above). Patches of other kinds (`attn_out`, `mlp_out`,
  `resid_post`, a head's `z`) meet no softmax before the next layer and keep the plain estimate.
- *GradDrop (cancellation).* A cell's direct and indirect effects can cancel in the gradient although each is
  large. GradDrop repeats the backward pass once per layer l', with the gradient through l''s attention and MLP
  outputs set to zero, and scores a cell by Sum over l' of |estimate_l'| / (L - 1). It costs L more backward
  passes, so it is an option (`graddrop=True`); it changes which cells a triage verifies (`score`), not the
  estimates.

**Where the linear estimate fails on audio.** Silence is not a small perturbation. The audio rows of a silent clip
are far from those of a voice, so a patch that restores what the answer needs moves P from about chance to about
P_clean, and P, a softmax output, is far from linear over such a step: at the corrupted run the answer token is
improbable and dP/dn is small, so a cell with RR near 1 can be estimated at a small fraction of that. The QK fix
removes the attention softmax's part of this, not the output softmax's. Read the estimates as a ranking of where
to look -- `tracing/triage.py` recomputes the top cells exactly -- never as RR values.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, replace
from functools import partial
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from jaxtyping import Float
from transformer_lens.ActivationCache import ActivationCache
from transformer_lens.utilities import get_act_name

from audiolens_ct.errors import InputError, PortError
from audiolens_ct.inputs import LALMInput
from audiolens_ct.tracing.audit import TOLERANCE
from audiolens_ct.tracing.engine import Metric
from audiolens_ct.tracing.patches import Patch, PatchSet

if TYPE_CHECKING:
    from audiolens_ct.model import HookedLALM

Acts = dict[str, torch.Tensor]


def attention_names(layer: int) -> dict[str, str]:
    """The hook points the QK fix reads at `layer`: post-RoPE queries and keys, values, pattern, and the input of
    the layer's first norm (what separates the residual path from the attention path)."""
    kinds = {"q": "rot_q", "k": "rot_k", "v": "v", "pattern": "pattern"}
    return {**{key: get_act_name(kind, layer) for key, kind in kinds.items()}, "norm_in": f"blocks.{layer}.ln1.hook_in"}


@dataclass
class Attribution:
    """AtP and AtP* estimates of a patch set's values (the metric with each patch applied), one per patch.

    Attributes:
        p_corrupted: the metric of the corrupted run, around which the estimates are taken.
        atp: plain attribution patching, `p_corrupted + (clean - corrupted) . gradient`.
        atp_star: with AtP*'s QK fix where it applies (`resid_pre` patches); equal to `atp` elsewhere.
        score: how a triage ranks the cells: |atp_star - p_corrupted|, or GradDrop's score with `graddrop`.
        qk_fix: whether the QK fix applied; graddrop: whether `score` is GradDrop's.
    """

    p_corrupted: float
    atp: Float[np.ndarray, " n_patches"]
    atp_star: Float[np.ndarray, " n_patches"]
    score: Float[np.ndarray, " n_patches"]
    qk_fix: bool
    graddrop: bool


def _scores(q: torch.Tensor, k: torch.Tensor, scale: float) -> Float[torch.Tensor, "copies heads q_pos k_pos"]:
    """Attention logits of queries `q` `[copies, q_pos, heads, d]` against keys `k` `[copies, k_pos, kv_heads, d]`;
    each key/value head serves `heads // kv_heads` query heads (transformers' `repeat_kv` order)."""
    k = k.repeat_interleave(q.shape[2] // k.shape[2], dim=2)
    return torch.einsum("cqhd,ckhd->chqk", q, k) * scale


def _causal(logits: torch.Tensor, first_row: int) -> torch.Tensor:
    """`logits` of the query rows `first_row, first_row + 1, ...` with every key after its query masked out."""
    rows, keys = logits.shape[-2:]
    future = torch.ones(rows, keys, dtype=torch.bool, device=logits.device).triu_(diagonal=first_row + 1)
    return logits.masked_fill(future, float("-inf"))


class PatternChange:
    """The QK fix at one layer: the exact change of the attention pattern when a contiguous run of positions gets
    its clean queries and keys, dotted with dM/dA (`__call__`; `each_position` for every run of one position).

    Rows before the run do not change. A row after it changes only in the run's columns, so its new softmax
    follows from the old one in closed form: with lse the row's log-normaliser, lse_rest the log-sum over the
    columns outside the run (prefix and suffix log-cumulative sums, exact even when the run holds all the mass)
    and l' the new logits of the run's columns, lse_new = logaddexp(lse_rest, logsumexp(l')) and every other
    column is rescaled by exp(lse - lse_new). The run's own rows (new queries against new keys) are recomputed.
    Only the rows from `first` on are kept (no patch of the layer starts earlier): for a token-wise grid, the text
    after the audio. Everything is float64; one layer at a time, seven `[copies, heads, rows, pos]` tensors (about
    1 GB for 32 heads, 800 rows and positions, one copy).
    """

    def __init__(self, model: HookedLALM, layer: int, clean: Acts, corrupted: Acts, first: int = 0) -> None:
        names = attention_names(layer)
        q, k = corrupted[names["q"]].double(), corrupted[names["k"]].double()
        copies = q.shape[0]
        q_clean = clean[names["q"]].double().expand(copies, -1, -1, -1)[:, first:]
        k_clean = clean[names["k"]].double().expand(copies, -1, -1, -1)[:, first:]
        attn = model.bridge.blocks[layer].attn.original_component
        scale = float(getattr(attn, "scaling", q.shape[-1] ** -0.5))  # what the bridge's attention uses
        self.first = first
        self.logits = _causal(_scores(q[:, first:], k, scale), first)  # rows first.., every key
        self.lse = self.logits.logsumexp(-1)
        self.pattern = (self.logits - self.lse[..., None]).exp()
        seen = corrupted[names["pattern"]][:, :, first:]
        diff = float((self.pattern - seen.double()).abs().max())
        if diff > TOLERANCE.get(seen.dtype, 1e-2):
            raise PortError(
                f"AtP*'s QK fix recomputes layer {layer}'s attention from hook_rot_q and hook_rot_k, but it differs from "
                f"hook_pattern by {diff:.2g}: this attention is more than a scaled, causal softmax of q.k (soft-capping, "
                "a sliding window, a norm after RoPE?); use qk_fix=False (tracing.attribution.attribute)"
            )
        self.prefix = self.logits.logcumsumexp(-1)
        self.suffix = self.logits.flip(-1).logcumsumexp(-1).flip(-1)
        self.new_keys = _scores(q[:, first:], k_clean, scale)  # a patched column (from `first`): corrupted x clean
        self.new_query_old_keys = _scores(q_clean, k, scale)  # a patched row, before the run: clean x corrupted
        self.new_query_new_keys = _scores(q_clean, k_clean, scale)  # a patched row, within the run: clean x clean

    def __call__(self, positions: Sequence[int], grad: Float[torch.Tensor, "copies heads q_pos k_pos"]) -> float:
        """Sum over heads and rows of (A_patched - A) * `grad` for the run `positions` (contiguous, ascending)."""
        first, last = positions[0], positions[-1]
        if list(positions) != list(range(first, last + 1)) or first < self.first:
            raise InputError(f"AtP*'s QK fix restores a contiguous run of positions from {self.first} on, got "
                             f"{list(positions)}; use qk_fix=False")  # fmt: skip
        grad = grad[:, :, self.first :].double()
        total = torch.zeros((), dtype=torch.float64)
        run, new_run = slice(first, last + 1), slice(first - self.first, last + 1 - self.first)
        below = slice(last + 1 - self.first, None)  # rows after the run: only its columns change
        if below.start < self.logits.shape[-2]:
            new = self.new_keys[:, :, below, new_run]
            rest = self.suffix[:, :, below, last + 1]
            if first > 0:
                rest = torch.logaddexp(self.prefix[:, :, below, first - 1], rest)
            lse_new = torch.logaddexp(rest, new.logsumexp(-1))
            weighted = self.pattern[:, :, below] * grad[:, :, below]
            others = weighted.sum(-1) - weighted[..., run].sum(-1)
            total += (torch.expm1(self.lse[:, :, below] - lse_new) * others).sum()
            total += (((new - lse_new[..., None]).exp() - self.pattern[:, :, below, run]) * grad[:, :, below, run]).sum()
        # the run's own rows: new queries; keys corrupted before the run, clean from its start on
        logits = torch.cat([self.new_query_old_keys[:, :, new_run, :first],
                            self.new_query_new_keys[:, :, new_run, first - self.first :]], dim=-1)  # fmt: skip
        patched = _causal(logits, first).softmax(-1)
        total += ((patched - self.pattern[:, :, new_run]) * grad[:, :, new_run]).sum()
        return float(total)

    def each_position(self, grad: Float[torch.Tensor, "copies heads q_pos k_pos"]) -> Float[torch.Tensor, " pos"]:
        """`self([i], grad)` for every position i from `first` on at once (token-wise grids): the same closed
        form, one column per i, and every row i recomputed with its clean query; 0 before `first`."""
        first = self.first
        grad = grad[:, :, first:].double()
        rows = self.logits.shape[-2]
        weighted = self.pattern * grad
        none = torch.full_like(self.prefix[..., :1], float("-inf"))
        before = self.prefix[..., first - 1 : -1] if first > 0 else torch.cat([none, self.prefix[..., :-1]], -1)
        rest = torch.logaddexp(before, torch.cat([self.suffix[..., first + 1 :], none], -1))
        lse_new = torch.logaddexp(rest, self.new_keys)
        change = torch.expm1(self.lse[..., None] - lse_new) * (weighted.sum(-1, keepdim=True) - weighted[..., first:])
        change += ((self.new_keys - lse_new).exp() - self.pattern[..., first:]) * grad[..., first:]
        after = torch.ones(rows, rows, dtype=torch.bool, device=grad.device).tril_(diagonal=-1)  # row t > column i
        total = torch.where(after, change, 0.0).sum(dim=(0, 1, 2))
        logits = self.new_query_old_keys.clone()
        own = torch.arange(rows, device=grad.device)
        logits[..., own, own + first] = self.new_query_new_keys[..., own, own]
        patched = (_causal(logits, first).softmax(-1) - self.pattern) * grad
        return torch.cat([torch.zeros(first, dtype=torch.float64), total + patched.sum(dim=(0, 1, 3))])


def _pair_terms(
    clean: torch.Tensor, corrupted: torch.Tensor, grad: torch.Tensor, src: list[int], dst: list[int], per_head: bool
) -> np.ndarray:
    """(clean[src_j] - corrupted[dst_j]) . grad[dst_j] for each position pair j, summed over the copies and the
    feature axis: `[pairs]`, or `[pairs, heads]` for `[batch, pos, heads, d_head]` activations with `per_head`."""
    delta = clean[:, src].double() - corrupted[:, dst].double()
    product = delta * grad[:, dst].double()
    return (product.sum(-1) if per_head else product.flatten(2).sum(-1)).sum(0).cpu().numpy()


def _layer_estimates(
    model: HookedLALM, kind: str, layer: int, patches: list[Patch], clean: Acts, corrupted: Acts, passes: list[Acts],
    qk_fix: bool,
) -> Float[np.ndarray, "passes patches 2"]:
    """(AtP, AtP*) change of the metric for each patch of one layer, under each backward pass's gradients."""
    pairs = sorted({pair for p in patches for pair in zip(p.src, p.dst, strict=True)})
    column = {pair: j for j, pair in enumerate(pairs)}
    src, dst = [s for s, _ in pairs], [d for _, d in pairs]
    name, names = get_act_name(kind, layer), attention_names(layer)
    per_head = patches[0].heads is not None
    first = min(min(p.dst) for p in patches)
    pattern_change = PatternChange(model, layer, clean, corrupted, first) if qk_fix else None
    out = np.zeros((len(passes), len(patches), 2))
    for n, grads in enumerate(passes):
        terms = partial(_pair_terms, src=src, dst=dst, per_head=per_head)
        linear = terms(clean[name], corrupted[name], grads[name])
        if qk_fix:
            residual = terms(clean[name], corrupted[name], grads[name] - grads[names["norm_in"]])
            values = terms(clean[names["v"]], corrupted[names["v"]], grads[names["v"]])
            pattern_grad = grads[names["pattern"]]
            singles = pattern_change.each_position(pattern_grad) if any(len(p.dst) == 1 for p in patches) else None
        for i, patch in enumerate(patches):
            cols = [column[pair] for pair in zip(patch.src, patch.dst, strict=True)]
            out[n, i, 0] = linear[cols][:, list(patch.heads)].sum() if per_head else linear[cols].sum()
            out[n, i, 1] = out[n, i, 0]
            if qk_fix:
                pattern = singles[patch.dst[0]] if len(patch.dst) == 1 else pattern_change(patch.dst, pattern_grad)
                out[n, i, 1] = residual[cols].sum() + values[cols].sum() + float(pattern)
    return out


def qk_fix_applies(patches: PatchSet, qk_fix: bool = True) -> bool:
    """Whether AtP*'s QK fix applies to `patches`: residual-stream patches (`resid_pre`), when asked."""
    return qk_fix and patches.kind == "resid_pre"


def recorded_names(model: HookedLALM, patches: PatchSet, qk_fix: bool = True) -> list[str]:
    """The activations AtP* reads in both runs for `patches`: the patched ones, and what the QK fix needs."""
    layers = sorted({layer for p in patches.patches for layer in p.layers})
    names = [get_act_name(patches.kind, layer) for layer in layers]
    if qk_fix_applies(patches, qk_fix):
        names += [name for layer in layers for name in attention_names(layer).values()]
    missing = [name for name in names if name not in model.hook_dict]
    if missing:
        raise PortError(f"AtP* reads {', '.join(missing[:3])}, which this model's bridge does not have; use qk_fix=False")
    return names


def _backward_passes(
    model: HookedLALM, corrupted: LALMInput, metric: Metric, names: list[str], graddrop: bool
) -> tuple[float, Acts, list[Acts]]:
    """The corrupted run with gradients: its metric, the activations at `names`, and their gradients -- one set,
    or with `graddrop` one more set per layer l' with the gradient through l''s attention and MLP outputs zeroed.

    The audio rows are computed once without gradients (nothing here needs the audio tower's)."""
    acts: Acts = {}
    dropped: list[int | None] = [None]

    def record(act: torch.Tensor, hook: Any, name: str) -> torch.Tensor:
        # a view of its own, so that its gradient is what flows from this hook point on (the residual stream's
        # tensor is also the input norm's); kept by the name asked for (a hook point's own may be an alias's)
        acts[name] = act.view_as(act)
        return acts[name]

    def drop(act: torch.Tensor, hook: Any, layer: int) -> None:
        act.register_hook(lambda grad: torch.zeros_like(grad) if dropped[0] == layer else grad)

    hooks = [(name, partial(record, name=name)) for name in names]
    if graddrop:
        hooks += [(get_act_name(kind, layer), partial(drop, layer=layer))
                  for layer in range(model.cfg.n_layers) for kind in ("attn_out", "mlp_out")]  # fmt: skip
    with torch.no_grad():
        audio = model.audio_embeddings(corrupted)
    corrupted = replace(corrupted, audio_embeds_override=audio, _audio_embeds_cache={})
    settings: list[int | None] = [None, *range(model.cfg.n_layers)] if graddrop else [None]
    passes = []
    with torch.enable_grad():
        value = metric(model.run_with_hooks(corrupted, fwd_hooks=hooks)[:, -1])
        tensors = [acts[name] for name in names]
        for setting in settings:
            dropped[0] = setting
            grads = torch.autograd.grad(value, tensors, retain_graph=setting != settings[-1], allow_unused=True)
            passes.append({n: torch.zeros_like(t) if g is None else g for n, t, g in zip(names, tensors, grads, strict=True)})
    return float(value.detach()), {name: act.detach() for name, act in acts.items()}, passes


def attribute(
    model: HookedLALM,
    patches: PatchSet,
    clean: LALMInput,
    corrupted: LALMInput,
    metric: Metric,
    *,
    qk_fix: bool = True,
    graddrop: bool = False,
    clean_cache: ActivationCache | None = None,
) -> Attribution:
    """AtP and AtP* estimates of `metric` with each patch of `patches` applied to `corrupted` (module docstring).

    One clean forward (skipped when `clean_cache` holds every activation needed), one corrupted forward with
    gradients and one backward pass (L + 1 with `graddrop`). Patches restore one layer each (no ROME window). The
    QK fix applies to `resid_pre` patch sets, each patch a contiguous run of positions, clean and corrupted inputs
    of equal length. Memory: the corrupted run keeps every patched activation with its gradient, and with the QK
    fix every layer's attention pattern (`[copies, heads, pos, pos]`) with its gradient.
    """
    windows = [p for p in patches.patches if len(p.layers) != 1]
    if windows:
        raise InputError(f"AtP* estimates patches of one layer each, got layers {windows[0].layers}; use window=1")
    qk_fix = qk_fix_applies(patches, qk_fix)
    if qk_fix and any(p.src != p.dst for p in patches.patches):
        raise InputError(
            "AtP*'s QK fix compares queries and keys at the same positions, but the clean and corrupted inputs differ "
            f"in length ({clean.shape[1]} vs {corrupted.shape[1]} positions: a transcript read from each clip?); "
            "use transcript_policy='clean', or qk_fix=False"
        )
    by_layer: dict[int, list[int]] = defaultdict(list)
    for n, patch in enumerate(patches.patches):
        by_layer[patch.layers[0]].append(n)
    names = recorded_names(model, patches, qk_fix)
    if clean_cache is None or any(name not in clean_cache.cache_dict for name in names):
        with torch.no_grad():
            _, clean_cache = model.run_with_cache(clean, names_filter=lambda n: n in set(names))
    clean_acts = {name: clean_cache[name] for name in names}
    p_corrupted, acts, passes = _backward_passes(model, corrupted, metric, names, graddrop)
    estimates = np.zeros((len(passes), len(patches.patches), 2))
    for layer, members in by_layer.items():
        estimates[:, members] = _layer_estimates(model, patches.kind, layer, [patches.patches[n] for n in members],
                                                 clean_acts, acts, passes, qk_fix)  # fmt: skip
    atp, atp_star = estimates[0, :, 0], estimates[0, :, 1]
    if graddrop:
        score = np.abs(estimates[1:, :, 1]).sum(axis=0) / max(1, model.cfg.n_layers - 1)
    else:
        score = np.abs(atp_star)
    return Attribution(p_corrupted, p_corrupted + atp, p_corrupted + atp_star, score, qk_fix, graddrop)
