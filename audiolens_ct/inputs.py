"""`LALMInput`: one prepared batch for an audio language model.

TransformerLens functions expect a token batch (`tokens.shape == (batch, pos)`). An audio language model needs
more: the audio features its encoder reads and the rows of the sequence where the audio embeddings go. An
`LALMInput` carries all of it and still behaves like the token batch where TransformerLens looks (`.shape`,
`.size()`, `len()`), so `transformer_lens.patching` accepts it unchanged.

It also records how it was made (`prepare_kwargs`), so a corrupted twin (same prompt, silent audio) can be
prepared by the same code path, and the paper's text segments (early prompt / object tokens / late prompt / last
token) when answer options were given.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from jaxtyping import Bool, Int

from audiolens_ct.errors import InputError

SEGMENT_NAMES = ("early_prompt", "object", "late_prompt", "last")



@dataclass
class LALMInput:
    """A prepared batch: tokens, audio features, audio rows and text segments.

    Attributes:
        tokens: token ids; audio rows hold the port's placeholder id.
        audio_features: the tensors the port's audio encoder reads (e.g. `input_features`), batch-first.
        audio_mask: True at the rows that receive audio embeddings.
        str_tokens: the token strings of each batch row (audio rows shown as the placeholder).
        segments: text positions of `early_prompt`, `object`, `late_prompt`, `last` (shared by every row), or
            None when no options were given.
        port: the name of the port that prepared it.
        prepare_kwargs: the arguments of `HookedLALM.prepare` (audio excluded), to prepare a twin.
        extras: port-specific data beside the tensors (e.g. a DeSTA transcript); in a batch made by `stack`, each
            value is a list with one entry per row.
        audio_embeds_override: audio rows to use instead of the audio tower's (e.g. noise-corrupted ones),
            `[batch, n_audio, d_model]`.
    """

    tokens: Int[torch.Tensor, "batch pos"]
    audio_features: dict[str, torch.Tensor]
    audio_mask: Bool[torch.Tensor, "batch pos"]
    str_tokens: list[list[str]]
    segments: dict[str, list[int]] | None = None
    port: str = ""
    prepare_kwargs: dict[str, Any] = field(default_factory=dict)
    extras: dict[str, Any] = field(default_factory=dict)
    audio_embeds_override: torch.Tensor | None = None
    _audio_embeds_cache: dict[int, torch.Tensor] = field(default_factory=dict, repr=False, compare=False)

    # -- token-batch behaviour (what TransformerLens reads) --------------------------------------------------------
    @property
    def shape(self) -> torch.Size:
        return self.tokens.shape

    def size(self, dim: int | None = None):
        return self.tokens.size() if dim is None else self.tokens.size(dim)

    def __len__(self) -> int:
        return self.tokens.shape[0]

    @property
    def device(self) -> torch.device:
        return self.tokens.device

    # -- positions ---------------------------------------------------------------------------------------------------
    @property
    def audio_positions(self) -> list[int]:
        """Sequence positions of the audio rows (identical for every batch row)."""
        return torch.nonzero(self.audio_mask[0]).flatten().tolist()

    @property
    def first_text_after_audio(self) -> int:
        """The first position after the audio block: patches before it cannot change anything."""
        return self.audio_positions[-1] + 1

    @property
    def text_positions(self) -> list[int]:
        """Every text position after the audio block, up to the last token."""
        return list(range(self.first_text_after_audio, self.tokens.shape[1]))

    # -- construction ------------------------------------------------------------------------------------------------
    def to(self, device: torch.device | str) -> LALMInput:
        """A copy with every tensor on `device`."""
        return replace(
            self,
            tokens=self.tokens.to(device),
            audio_features={k: v.to(device) for k, v in self.audio_features.items()},
            audio_mask=self.audio_mask.to(device),
            audio_embeds_override=None if self.audio_embeds_override is None else self.audio_embeds_override.to(device),
            _audio_embeds_cache={},
        )

    @staticmethod
    def stack(inputs: list[LALMInput]) -> LALMInput:
        """Batch several inputs of equal length and identical audio rows into one."""
        if not inputs:
            raise InputError("LALMInput.stack needs at least one input")
        first = inputs[0]
        for i, other in enumerate(inputs[1:], start=1):
            if other.tokens.shape[1] != first.tokens.shape[1]:
                raise InputError(
                    f"cannot batch inputs of different lengths: input 0 has {first.tokens.shape[1]} positions, "
                    f"input {i} has {other.tokens.shape[1]}; trace them one at a time"
                )
            if not torch.equal(other.audio_mask, first.audio_mask[: other.audio_mask.shape[0]]):
                raise InputError(f"cannot batch inputs whose audio rows differ (input 0 vs input {i})")
            if other.audio_features.keys() != first.audio_features.keys():
                raise InputError(f"input {i} was prepared by another port than input 0")
        return LALMInput(
            tokens=torch.cat([x.tokens for x in inputs]),
            audio_features={k: torch.cat([x.audio_features[k] for x in inputs]) for k in first.audio_features},
            audio_mask=torch.cat([x.audio_mask for x in inputs]),
            str_tokens=[row for x in inputs for row in x.str_tokens],
            segments=first.segments if all(x.segments == first.segments for x in inputs) else None,
            port=first.port,
            prepare_kwargs=first.prepare_kwargs,
            extras={k: [x.extras.get(k) for x in inputs] for k in first.extras},
            audio_embeds_override=(
                torch.cat([x.audio_embeds_override for x in inputs])
                if all(x.audio_embeds_override is not None for x in inputs)
                else None
            ),
        )


def object_span(text: str, options: list[str] | None, object_text: str | None) -> tuple[int, int] | None:
    """Character span of the object tokens (the option list) in `text`.

    `object_text` is searched verbatim when given; otherwise `", ".join(options)`, and failing that the smallest
    span holding every option's last occurrence as a whole word (options listed in another order or with other
    separators). The last occurrence is taken because the question comes after anything else in the text after
    the audio (e.g. a DeSTA transcript that happens to name an option).
    """
    if object_text is not None:
        start = text.rfind(object_text)
        if start < 0:
            raise InputError(f"the object text {object_text!r} does not occur in the prompt text {text!r}")
        return start, start + len(object_text)
    if not options:
        return None
    joined = ", ".join(options)
    start = text.rfind(joined)
    if start >= 0:
        return start, start + len(joined)
    found = {o: ([None, *re.finditer(rf"(?<!\w){re.escape(o)}(?!\w)", text)])[-1] for o in options}
    missing = [o for o, m in found.items() if m is None]
    if missing:
        raise InputError(
            f"the options {missing} do not occur in the prompt text {text!r}; list the options in the prompt or "
            "pass object_text="
        )
    return min(m.start() for m in found.values()), max(m.end() for m in found.values())


def text_after_audio(tokenizer: Any, inp: LALMInput) -> tuple[str, list[int]]:
    """The decoded text after the audio block (first row), and for each position p from `first_text_after_audio` on
    the end offset, in that text, of the tokens up to p: how character spans map back to positions."""
    ids = inp.tokens[0].tolist()
    first = inp.first_text_after_audio
    ends = [len(tokenizer.decode(ids[first : p + 1])) for p in range(first, len(ids))]
    return tokenizer.decode(ids[first:]), ends


def text_segments(piece_ends: list[int], first: int, span: tuple[int, int] | None) -> dict[str, list[int]]:
    """Split the text positions after the audio into the paper's four segments.

    Args:
        piece_ends: for each position p >= `first`, the end offset of the decoded tokens `first..p` in the text.
        first: the first position after the audio block.
        span: the character span of the object tokens (the option list), or None for no object segment.
    """
    last = first + len(piece_ends) - 1
    start, end = span if span is not None else (piece_ends[-1] + 1, piece_ends[-1] + 1)
    segs: dict[str, list[int]] = {name: [] for name in SEGMENT_NAMES}
    piece_start = 0
    for offset, piece_end in enumerate(piece_ends):
        pos = first + offset
        if pos == last:
            segs["last"].append(pos)
        elif piece_end <= start:
            segs["early_prompt"].append(pos)
        elif piece_start >= end:
            segs["late_prompt"].append(pos)
        else:
            segs["object"].append(pos)
        piece_start = piece_end
    return segs
