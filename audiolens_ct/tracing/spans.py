"""Spans: named groups of positions of a traced sequence, and where each clean position lies in the corrupted one.

Group-wise tracing restores a span's positions jointly (FCCT's token groups). A span is written as a string
(`choices.SPAN_NAMES`, `choices.parse_span`):

- the paper's segments `early_prompt`, `object`, `late_prompt`, `last` (from `LALMInput.segments`);
- `audio`: every audio row; `before_audio`: the text before the audio (computed identically in both runs, so its
  RR is 0 at every layer: a control); `after_audio`: every text position after the audio (the layer-wise group);
- `pos:START:STOP`: a Python slice of the clean sequence's positions (`pos:-3:` is the last three tokens);
- `text:WORDS`: the tokens overlapping the last occurrence of WORDS in the text after the audio (the question and
  the response prefix), as the object tokens are found.

Clean and corrupted sequences share the text before the audio; their text after the audio is aligned from the end
(a DeSTA transcript may differ in length); audio rows pair by index, which needs as many in both runs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from audiolens_ct.choices import parse_span
from audiolens_ct.errors import InputError
from audiolens_ct.inputs import SEGMENT_NAMES, LALMInput, text_after_audio

if TYPE_CHECKING:
    from audiolens_ct.model import HookedLALM


def corresponding(clean: LALMInput, corrupted: LALMInput, positions: list[int]) -> list[int]:
    """The corrupted position of each clean position: the same before the audio, the same audio row, and the same
    distance from the end after the audio. `InputError` where there is none (naming the position)."""
    clean_rows, corrupted_rows = clean.audio_positions, corrupted.audio_positions
    offset = corrupted.shape[1] - clean.shape[1]
    out = []
    for p in positions:
        if p < clean_rows[0]:
            out.append(p)
        elif p <= clean_rows[-1]:
            if len(clean_rows) != len(corrupted_rows):
                raise InputError(
                    f"position {p} is an audio row, but the clean and corrupted runs have {len(clean_rows)} and "
                    f"{len(corrupted_rows)} audio rows; spans over audio rows need as many in both runs (for a "
                    "transcript-reading port: transcript_policy='clean')"
                )
            out.append(corrupted_rows[clean_rows.index(p)])
        elif p + offset >= corrupted.first_text_after_audio:
            out.append(p + offset)
        else:
            raise InputError(f"clean position {p} has no counterpart after the audio of the corrupted run")
    return out


def after_audio(clean: LALMInput, corrupted: LALMInput) -> list[int]:
    """The clean text positions after the audio that have a counterpart after the corrupted run's audio."""
    offset = corrupted.shape[1] - clean.shape[1]
    return [p for p in clean.text_positions if p + offset >= corrupted.first_text_after_audio]


def span_positions(model: HookedLALM, spec: str, clean: LALMInput, corrupted: LALMInput) -> list[int]:
    """The clean positions of the span `spec` (empty for a segment the prompt lacks, e.g. no option list)."""
    try:
        form, value = parse_span(spec)
    except ValueError as exc:
        raise InputError(str(exc)) from None
    if form == "pos":
        picked = list(range(clean.shape[1]))[value]
        if not picked:
            raise InputError(f"span {spec!r} selects no position of a sequence of {clean.shape[1]}")
        return picked
    if form == "text":
        return _text_positions(model, value, clean)
    if value in SEGMENT_NAMES:
        if clean.segments is None:
            raise InputError(f"span {spec!r} needs the paper's segments: prepare the input with options=")
        aligned = set(after_audio(clean, corrupted))
        return [p for p in clean.segments[value] if p in aligned]
    if value == "audio":
        return clean.audio_positions
    if value == "before_audio":
        return list(range(clean.audio_positions[0]))
    return after_audio(clean, corrupted)  # the last of SPAN_NAMES


def resolve_span(model: HookedLALM, spec: str, clean: LALMInput, corrupted: LALMInput) -> tuple[list[int], list[int]]:
    """`(src, dst)`: the clean positions of the span `spec` and their corrupted counterparts."""
    src = span_positions(model, spec, clean, corrupted)
    return src, corresponding(clean, corrupted, src)


def _text_positions(model: HookedLALM, words: str, clean: LALMInput) -> list[int]:
    """The positions after the audio whose tokens overlap the last occurrence of `words` in that text."""
    first = clean.first_text_after_audio
    text, ends = text_after_audio(model.tokenizer, clean)
    start = text.rfind(words)
    if start < 0:
        raise InputError(f"span 'text:{words}': {words!r} does not occur in the text after the audio {text!r}")
    end = start + len(words)
    starts = [0, *ends[:-1]]
    return [first + j for j, (a, b) in enumerate(zip(starts, ends, strict=True)) if a < end and b > start]
