"""Patch sets: causal tracing is a list of patches, and engines evaluate lists of patches.

Causal tracing (Meng et al., ROME) runs the model three ways: on the clean input (the real audio), on a corrupted
input (the audio taken away, e.g. replaced by silence), and on the corrupted input with one clean activation
restored ("patched"). If restoring the hidden state at layer l and position i brings the probability of the
correct answer back, the audio information needed for the answer flows through (l, i). The Recovery Rate

    RR = (P_patched - P_corrupted) / (P_clean - P_corrupted)

is 0 when the patch restores nothing and 1 when it restores the clean prediction fully.

- **Layer-wise tracing** restores, at one layer l, every text position after the audio: does the text side of
  the sequence already hold what the answer needs at layer l?
- **Token-wise tracing** restores one position i at layer l: which text tokens carry the audio information?

Both are patch sets built on the same core: a `Patch` restores the clean activation of one kind (`resid_pre`,
`resid_post`, `attn_out`, `mlp_out`) at some layers (one, or a ROME window of consecutive layers) and some
positions. Clean and corrupted sequences may differ in length (DeSTA transcripts); a patch therefore names the
clean positions it reads (`src`) and the corrupted positions it writes (`dst`).

Beyond the paper's two maps, the same core gives three more (issue 14):

- **Group-wise tracing** restores a named group of positions jointly at layer l (FCCT's token groups): a segment,
  the audio rows, the text before the audio, a position range or a phrase of the prompt (`tracing/spans.py`).
  One position is the token-wise cell; every text position after the audio is the layer-wise cell.
- **Time-wise tracing** restores a window of audio rows, a stretch of seconds of the clip (`tracing/timeline.py`):
  RR(l, t) says which seconds carry what the answer needs, at which depth.
- **Head-wise tracing** restores one attention head's output at layer l, before the output projection
  (TransformerLens's `hook_z`, kind `HEAD_KIND`), at the last position or a group: RR over layer x head. Heads are
  query heads; with grouped-query attention several query heads share a key/value head, and each is patched alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from audiolens_ct.choices import KINDS

HEAD_KIND = "z"
"""The per-head attention output before the output projection, `blocks.{l}.attn.hook_z`: `[batch, pos, heads, d_head]`."""


@dataclass(frozen=True)
class Patch:
    """Restore the clean `kind` activation at `layers`, clean positions `src` into corrupted positions `dst`;
    for kind `HEAD_KIND`, only the query heads `heads`."""

    layers: tuple[int, ...]
    src: tuple[int, ...]
    dst: tuple[int, ...]
    heads: tuple[int, ...] | None = None


@dataclass(frozen=True)
class PatchSet:
    """A list of patches of one activation kind; engines return one value per patch, in order."""

    kind: str
    patches: tuple[Patch, ...]

    def __post_init__(self) -> None:
        if self.kind not in (*KINDS, HEAD_KIND):
            raise ValueError(f"unknown activation kind {self.kind!r}; use one of {(*KINDS, HEAD_KIND)}")
        for patch in self.patches:
            if (patch.heads is not None) != (self.kind == HEAD_KIND):
                raise ValueError(f"a {self.kind!r} patch set names heads only for kind {HEAD_KIND!r}: {patch}")
            if len(patch.src) != len(patch.dst) or not patch.src:
                raise ValueError(f"a patch needs as many clean as corrupted positions, at least one: {patch}")


def window_layers(layer: int, window: int, n_layers: int) -> tuple[int, ...]:
    """ROME's window: `window` consecutive layers centred on `layer`, clipped to the model."""
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    lo = max(0, layer - window // 2)
    hi = min(n_layers, layer - (-window // 2))
    return tuple(range(lo, hi))


def layer_wise(n_layers: int, src: list[int], dst: list[int], window: int = 1, kind: str = "resid_pre") -> PatchSet:
    """One patch per layer, restoring every position of `src` at once: RR(l)."""
    return PatchSet(kind, tuple(Patch(window_layers(lay, window, n_layers), tuple(src), tuple(dst)) for lay in range(n_layers)))


def token_wise(n_layers: int, src: list[int], dst: list[int], window: int = 1, kind: str = "resid_pre") -> PatchSet:
    """One patch per (layer, position), layer-major: RR(l, i) reshapes to `[n_layers, len(src)]`."""
    return PatchSet(
        kind,
        tuple(
            Patch(window_layers(lay, window, n_layers), (s,), (d,))
            for lay in range(n_layers)
            for s, d in zip(src, dst, strict=True)
        ),
    )


def group_wise(
    n_layers: int, groups: Sequence[tuple[Sequence[int], Sequence[int]]], window: int = 1, kind: str = "resid_pre"
) -> PatchSet:
    """One patch per (layer, group), each group's `(src, dst)` positions restored jointly, layer-major: RR(l, g)
    reshapes to `[n_layers, len(groups)]`."""
    return PatchSet(
        kind,
        tuple(
            Patch(window_layers(lay, window, n_layers), tuple(src), tuple(dst))
            for lay in range(n_layers)
            for src, dst in groups
        ),
    )


def head_wise(n_layers: int, n_heads: int, src: list[int], dst: list[int]) -> PatchSet:
    """One patch per (layer, query head), the head's output restored at every position of `src` jointly,
    layer-major: RR(l, h) reshapes to `[n_layers, n_heads]`. No layer window: a head of another layer is
    another head."""
    return PatchSet(
        HEAD_KIND,
        tuple(Patch((lay,), tuple(src), tuple(dst), (head,)) for lay in range(n_layers) for head in range(n_heads)),
    )
