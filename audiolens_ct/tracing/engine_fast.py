"""The fast engine: the same patch sets as the reference engine, without recomputing what a patch cannot change.

A patch at (layer l, position i) leaves every position before i unchanged at every layer, and every position at
layers below l unchanged. So:

1. The corrupted input runs once; its residual stream before every layer and its keys/values are kept.
2. For the patches that write positions starting at i, only the suffix [i, T) is recomputed, attending to the
   corrupted prefix [0, i) through its stored keys/values (read-only views, expanded over the batch).
3. A growing batch walks the layers k = 0..L-1: before layer k the patches whose (first) patched layer is k join
   as new rows, equal to the corrupted residual at layer k on the suffix; the clean activation is written at the
   patched positions (directly for `resid_pre`, through the block's hook for `resid_post` / `attn_out` /
   `mlp_out`, at every layer of a ROME window; for per-head patches, into the attention's per-head output before
   the output projection, each row its own heads); then every row passes layer k. One walk yields the patched
   output of all layers for that suffix. A group of positions (a span, a window of audio rows) is one patch whose
   suffix starts at its first position.
4. Only the last position goes through the last layer's MLP, the final norm and the unembedding (when no hook
   reads the last layer's other outputs).
5. A residual patch that writes exactly the values already there (a text token's embedding before layer 0 is
   the same in both runs) is not run at all: its result is the corrupted run's.

Rows are cut into chunks of at most `max_batch` (patches x corrupted copies), which bounds memory. The layers are
the model's own Hugging Face decoder layers, with the stored prefix handed to attention through a path this package
owns (`tracing/decoder.py`), not through a cache argument whose name may change; TransformerLens hooks on the
residual stream and on attention / MLP outputs still fire inside them. Every trace checks a few of its cells
against full TransformerLens forwards (`tracing/audit.py`).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING

import torch
from jaxtyping import Float
from transformer_lens.ActivationCache import ActivationCache
from transformer_lens.utilities import get_act_name

from audiolens_ct.inputs import LALMInput
from audiolens_ct.tracing.decoder import KV, PrefixKV, RecordKV, Write, plain_decoder
from audiolens_ct.tracing.engine import CorruptedRun, Metric
from audiolens_ct.tracing.patches import HEAD_KIND, Patch, PatchSet

if TYPE_CHECKING:
    from audiolens_ct.model import HookedLALM


@dataclass
class FastCorruptedRun(CorruptedRun):
    """The corrupted run as the fast engine keeps it: also the residuals before each layer, and keys/values."""

    resid_pre: list[Float[torch.Tensor, "copies pos d_model"]]
    kv: dict[int, KV]


def _write_rows(
    x: Float[torch.Tensor, "rows pos d_model"], *, rows: torch.Tensor, cols: torch.Tensor,
    values: Float[torch.Tensor, "n_cols d_model"],
) -> torch.Tensor:
    """Write the clean `values` at suffix columns `cols` of batch rows `rows`."""
    x = x.clone()
    x[rows[:, None], cols[None, :]] = values.to(x.dtype)
    return x


def _write_heads(
    z: Float[torch.Tensor, "rows pos heads d_head"], *, chosen: torch.Tensor, cols: torch.Tensor,
    values: Float[torch.Tensor, "n_cols heads d_head"],
) -> torch.Tensor:
    """Write the clean `values` at suffix columns `cols` of the heads `chosen` (`[rows, heads]`, bool) of each row."""
    z = z.clone()
    z[:, cols] = torch.where(chosen[:, None, :, None], values.to(z.dtype)[None], z[:, cols])
    return z


def _writer(
    kind: str, rows: list[Patch], active: list[int], copies: int, cols: torch.Tensor, values: torch.Tensor
) -> Write:
    """The write of layer-k's clean `values` into the batch rows of the `active` patches (copy-minor rows)."""
    if kind != HEAD_KIND:
        index = torch.tensor([r * copies + c for r in active for c in range(copies)], device=values.device)
        return partial(_write_rows, rows=index, cols=cols, values=values)
    chosen = torch.zeros(len(rows) * copies, values.shape[1], dtype=torch.bool, device=values.device)
    for r in active:
        chosen[r * copies : (r + 1) * copies, list(rows[r].heads)] = True
    return partial(_write_heads, chosen=chosen, cols=cols, values=values)


def run_corrupted(model: HookedLALM, corrupted: LALMInput) -> FastCorruptedRun:
    """Run the corrupted input once through the model's own layers, keeping residuals and keys/values."""
    decoder = plain_decoder(model)
    decoder.check_hooks()
    with torch.no_grad(), model.spliced(corrupted):
        recorder = RecordKV()
        resid, last_logits = decoder.run(model.bridge.embed(corrupted.tokens), 0, recorder)
        return FastCorruptedRun(corrupted, last_logits, resid, recorder.kv)


def _suffix_pass(
    model: HookedLALM,
    run: FastCorruptedRun,
    kind: str,
    clean_cache: ActivationCache,
    rows: list[Patch],
    start: int,
) -> Float[torch.Tensor, "rows copies vocab"]:
    """Final-position logits of `rows` (patches sharing src/dst), recomputing only positions [start, T)."""
    decoder = plain_decoder(model)
    copies, total, _ = run.resid_pre[0].shape
    positions, rotary = decoder.positions(start, total, run.resid_pre[0][:, start:])
    prefix = PrefixKV(run.kv, start, copies)
    src = list(rows[0].src)
    cols = torch.tensor([d - start for d in rows[0].dst], device=positions.device)
    joins = [min(p.layers) for p in rows]
    last = len(decoder.layers) - 1
    last_only = decoder.last_layer_unread()
    h = run.resid_pre[0][:0, start:]
    for layer in range(len(decoder.layers)):
        joining = sum(1 for j in joins if j == layer)
        if joining:
            h = torch.cat([h, run.resid_pre[layer][:, start:].repeat(joining, 1, 1)])
        if h.shape[0] == 0:
            continue
        present = h.shape[0] // copies
        active = [r for r in range(present) if layer in rows[r].layers]
        write = None
        if active:
            write = _writer(kind, rows[:present], active, copies, cols, clean_cache[get_act_name(kind, layer)][0, src])
        h = decoder.run_layer(layer, h, positions, rotary, prefix, write=write, kind=kind,
                              last_position_only=layer == last and last_only)
    return decoder.unembed_last(h).reshape(len(rows), copies, -1)


def _writes_nothing_new(kind: str, patch: Patch, clean_cache: ActivationCache, run: FastCorruptedRun) -> bool:
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


@dataclass
class FastEngine:
    """Suffix recomputation with a growing batch (module docstring); `max_batch` bounds the rows per pass."""

    max_batch: int = 64
    name: str = "fast"

    def run_corrupted(self, model: HookedLALM, corrupted: LALMInput) -> FastCorruptedRun:
        """The corrupted run once, keeping residuals and keys/values for the suffix passes."""
        return run_corrupted(model, corrupted)

    def evaluate(
        self, model: HookedLALM, patches: PatchSet, clean_cache: ActivationCache, corrupted: CorruptedRun, metric: Metric
    ) -> Float[torch.Tensor, " n_patches"]:
        """`metric` of the corrupted run with each patch applied; patches sharing positions share passes."""
        run = corrupted if isinstance(corrupted, FastCorruptedRun) else run_corrupted(model, corrupted.input)
        copies = run.resid_pre[0].shape[0]
        per_pass = max(1, self.max_batch // copies)
        groups: dict[tuple[tuple[int, ...], tuple[int, ...]], list[int]] = defaultdict(list)
        for n, patch in enumerate(patches.patches):
            groups[(patch.src, patch.dst)].append(n)
        out = torch.zeros(len(patches.patches), dtype=torch.float64)
        unpatched = float(metric(run.last_logits))
        with torch.no_grad():
            for (_, dst), group in groups.items():
                inert = [n for n in group if _writes_nothing_new(patches.kind, patches.patches[n], clean_cache, run)]
                out[inert] = unpatched
                members = sorted(set(group) - set(inert), key=lambda n: min(patches.patches[n].layers))
                for lo in range(0, len(members), per_pass):
                    chunk = members[lo : lo + per_pass]
                    logits = _suffix_pass(model, run, patches.kind, clean_cache, [patches.patches[n] for n in chunk],
                                          min(dst))  # fmt: skip
                    out[chunk] = torch.stack([metric(row) for row in logits]).double().cpu()
        return out
