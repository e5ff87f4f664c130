"""The fast engine: the same sweep as the reference engine, without recomputing what a patch cannot change.

A patch at (layer l, position i) leaves every position before i unchanged at every layer, and every position at
layers below l unchanged. So:

1. The corrupted input runs once; its residual stream before every layer and its keys/values are kept.
2. For the patches that write positions starting at i, only the suffix [i, T) is recomputed, attending to the
   corrupted prefix [0, i) through its stored keys/values (read-only views, expanded over the batch).
3. A growing batch walks the layers k = 0..L-1: before layer k the patches whose (first) patched layer is k join
   as new rows, equal to the corrupted residual at layer k on the suffix; the clean activation is written at the
   patched positions (directly for `resid_pre`, through the block's hook for `resid_post` / `attn_out` /
   `mlp_out`, at every layer of a ROME window); then every row passes layer k. One walk yields the patched output
   of all layers for that suffix.
4. Only the last position goes through the final norm and the unembedding.
5. A residual patch that writes exactly the values already there (a text token's embedding before layer 0 is
   the same in both runs) is not run at all: its result is the corrupted run's.

Rows are cut into chunks of at most `max_batch` (patches x corrupted copies), which bounds memory. The decoder
layers are the bridge's own blocks, so TransformerLens hooks still fire inside them.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from jaxtyping import Float
from transformer_lens.ActivationCache import ActivationCache
from transformer_lens.utilities import get_act_name

from audiolens_ct.inputs import LALMInput
from audiolens_ct.tracing.sweep import Patch, Sweep


class _RecordingKV:
    """A stand-in KV cache for one full forward: records each layer's keys/values and returns them unchanged."""

    def __init__(self) -> None:
        self.kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def update(self, keys: torch.Tensor, values: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any):
        self.kv[layer_idx] = (keys, values)
        return keys, values


class _PrefixKV:
    """A read-only KV prefix [0, start) shared by every row: each layer's new keys/values are appended to it."""

    def __init__(self, kv: dict[int, tuple[torch.Tensor, torch.Tensor]], start: int, copies: int) -> None:
        self.prefix = {layer: (k[:, :, :start], v[:, :, :start]) for layer, (k, v) in kv.items()}
        self.copies = copies

    def update(self, keys: torch.Tensor, values: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any):
        prefix_k, prefix_v = self.prefix[layer_idx]
        rows = keys.shape[0] // self.copies
        if self.copies == 1:  # a stride-0 view: the concatenation is the only copy
            prefix_k, prefix_v = prefix_k.expand(rows, -1, -1, -1), prefix_v.expand(rows, -1, -1, -1)
        else:
            prefix_k, prefix_v = prefix_k.repeat(rows, 1, 1, 1), prefix_v.repeat(rows, 1, 1, 1)
        return torch.cat([prefix_k, keys], dim=2), torch.cat([prefix_v, values], dim=2)


@dataclass
class CorruptedRun:
    """What the fast engine keeps of the corrupted run: residuals before each layer, and keys/values."""

    resid_pre: list[Float[torch.Tensor, "copies pos d_model"]]
    kv: dict[int, tuple[torch.Tensor, torch.Tensor]]
    last_logits: Float[torch.Tensor, "copies vocab"]


def _run_block(block: torch.nn.Module, h: torch.Tensor, pe: Any, positions: torch.Tensor, cache: Any) -> torch.Tensor:
    out = block(h, position_embeddings=pe, position_ids=positions, past_key_values=cache)
    return out[0] if isinstance(out, tuple) else out


def _write_rows(
    x: Float[torch.Tensor, "rows pos d_model"], hook: Any = None, *, rows: torch.Tensor, cols: torch.Tensor,
    values: Float[torch.Tensor, "n_cols d_model"],
) -> torch.Tensor:
    """Write the clean `values` at suffix columns `cols` of batch rows `rows` (usable as a TransformerLens hook)."""
    x = x.clone()
    x[rows[:, None], cols[None, :]] = values.to(x.dtype)
    return x


def _unembed_last(bridge: Any, h: Float[torch.Tensor, "rows pos d_model"]) -> Float[torch.Tensor, "rows vocab"]:
    return bridge.unembed(bridge.ln_final(h[:, -1:]))[:, 0]


def run_corrupted(model: Any, corrupted: LALMInput) -> CorruptedRun:
    """Run the corrupted input once through the bridge's blocks, keeping residuals and keys/values."""
    bridge = model.bridge
    with torch.no_grad(), model._spliced(corrupted):
        h = bridge.embed(corrupted.tokens)
        positions = torch.arange(h.shape[1], device=h.device)[None]
        pe = bridge.rotary_emb(h, positions)
        recorder = _RecordingKV()
        resid = [h]
        for block in bridge.blocks:
            h = _run_block(block, h, pe, positions, recorder)
            resid.append(h)
        return CorruptedRun(resid, recorder.kv, _unembed_last(bridge, h))


def _suffix_pass(
    model: Any,
    run: CorruptedRun,
    kind: str,
    clean_cache: ActivationCache,
    rows: list[Patch],
    start: int,
) -> Float[torch.Tensor, "rows copies vocab"]:
    """Final-position logits of `rows` (patches sharing src/dst), recomputing only positions [start, T)."""
    bridge = model.bridge
    copies, total, _ = run.resid_pre[0].shape
    positions = torch.arange(start, total, device=run.resid_pre[0].device)[None]
    pe = bridge.rotary_emb(run.resid_pre[0][:, start:], positions)
    cache = _PrefixKV(run.kv, start, copies)
    src = list(rows[0].src)
    cols = torch.tensor([d - start for d in rows[0].dst], device=positions.device)
    joins = [min(p.layers) for p in rows]
    h = run.resid_pre[0][:0, start:]
    for layer, block in enumerate(bridge.blocks):
        joining = sum(1 for j in joins if j == layer)
        if joining:
            h = torch.cat([h, run.resid_pre[layer][:, start:].repeat(joining, 1, 1)])
        if h.shape[0] == 0:
            continue
        active = [r for r in range(h.shape[0] // copies) if layer in rows[r].layers]
        if not active:
            h = _run_block(block, h, pe, positions, cache)
            continue
        write = partial(
            _write_rows,
            rows=torch.tensor([r * copies + c for r in active for c in range(copies)], device=h.device),
            cols=cols,
            values=clean_cache[get_act_name(kind, layer)][0, src],
        )
        if kind == "resid_pre":
            h = _run_block(block, write(h), pe, positions, cache)
            continue
        hook_point = bridge.get_hook_point(get_act_name(kind, layer))
        handle = hook_point.add_hook(write, dir="fwd")
        try:
            h = _run_block(block, h, pe, positions, cache)
        finally:
            bridge._remove_temporary_hook(hook_point, "fwd", handle)
    return _unembed_last(bridge, h).reshape(len(rows), copies, -1)


def _writes_nothing_new(kind: str, patch: Patch, clean_cache: ActivationCache, run: CorruptedRun) -> bool:
    """A residual patch whose clean values equal the corrupted ones exactly (e.g. text token embeddings before
    layer 0) cannot change the output: its result is the corrupted run's, with no pass needed."""
    if kind != "resid_pre":
        return False
    return all(
        torch.equal(
            clean_cache[get_act_name(kind, layer)][0, list(patch.src)].expand_as(run.resid_pre[layer][:, list(patch.dst)]),
            run.resid_pre[layer][:, list(patch.dst)],
        )
        for layer in patch.layers
    )


def evaluate_fast(
    model: Any,
    sweep: Sweep,
    clean_cache: ActivationCache,
    corrupted: LALMInput | CorruptedRun,
    target: int,
    max_batch: int = 64,
) -> Float[torch.Tensor, " n_patches"]:
    """P(target) at the last position (mean over corrupted copies) for each patch of `sweep`.

    Args:
        corrupted: the corrupted input, or its `run_corrupted` result to reuse across sweeps.
        max_batch: the most rows (patches x corrupted copies) one pass may hold; bounds memory.
    """
    run = corrupted if isinstance(corrupted, CorruptedRun) else run_corrupted(model, corrupted)
    copies = run.resid_pre[0].shape[0]
    per_pass = max(1, max_batch // copies)
    groups: dict[tuple[tuple[int, ...], tuple[int, ...]], list[int]] = defaultdict(list)
    for n, patch in enumerate(sweep.patches):
        groups[(patch.src, patch.dst)].append(n)
    out = torch.zeros(len(sweep.patches), dtype=torch.float64)
    p_corrupted = run.last_logits.float().softmax(-1)[..., target].double().mean().item()
    with torch.no_grad():
        for (_, dst), group in groups.items():
            inert = [n for n in group if _writes_nothing_new(sweep.kind, sweep.patches[n], clean_cache, run)]
            out[inert] = p_corrupted
            members = sorted(set(group) - set(inert), key=lambda n: min(sweep.patches[n].layers))
            for lo in range(0, len(members), per_pass):
                chunk = members[lo : lo + per_pass]
                logits = _suffix_pass(model, run, sweep.kind, clean_cache, [sweep.patches[n] for n in chunk], min(dst))
                probs = logits.float().softmax(-1)[..., target].double().mean(-1)
                out[chunk] = probs.cpu()
    return out
