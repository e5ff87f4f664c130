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
"""

from __future__ import annotations

from dataclasses import dataclass

from audiolens_ct.choices import KINDS


@dataclass(frozen=True)
class Patch:
    """Restore the clean `kind` activation at `layers`, clean positions `src` into corrupted positions `dst`."""

    layers: tuple[int, ...]
    src: tuple[int, ...]
    dst: tuple[int, ...]


@dataclass(frozen=True)
class PatchSet:
    """A list of patches of one activation kind; engines return one value per patch, in order."""

    kind: str
    patches: tuple[Patch, ...]

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown activation kind {self.kind!r}; use one of {KINDS}")


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
