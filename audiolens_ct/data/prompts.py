"""The four AudioLens tracks: label sets, user prompts and response prefixes.

The causal-tracing paper asks every question in the AudioLens format: the user prompt names the full option list
("... Possible options: male, female.") and the assistant turn starts with a response prefix ending in " is", so
the next token is the answer. The option list as written in the prompt is the paper's *object tokens* segment.

`TRACKS` holds the paper's four tracks; `make_track` builds a variant with another prompt, prefix or label set,
checked so that token-wise tracing can still find the option list in the prompt.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from audiolens_ct.errors import DataError

ATTRIBUTES = ("animal", "emotion", "gender", "language")


@dataclass(frozen=True)
class Track:
    """One classification track asked in the AudioLens format.

    Attributes:
        attribute: the track name ("gender", ...).
        labels: the answer options, in the order the prompt lists them (SAKURA's exact label strings).
        prompt: the user question with the option list.
        response_prefix: the start of the assistant turn; the answer is the token after it. It must not end in
            whitespace: the answer token carries its own leading space (" female").
        object_text: the option list exactly as it occurs in `prompt` (default `", ".join(labels)`).
    """

    attribute: str
    labels: tuple[str, ...]
    prompt: str
    response_prefix: str
    object_text: str = field(default="")

    def __post_init__(self) -> None:
        object.__setattr__(self, "labels", tuple(self.labels))
        where = f"track {self.attribute!r}"
        if not self.labels:
            raise DataError(f"{where}: the label list is empty")
        folded = [label.strip().casefold() for label in self.labels]
        if any(not f for f in folded):
            raise DataError(f"{where}: an empty label in {list(self.labels)}")
        if len(set(folded)) != len(folded):
            raise DataError(f"{where}: labels repeat (case-insensitively) in {list(self.labels)}")
        if not self.response_prefix.strip():
            raise DataError(f"{where}: the response prefix is empty")
        if self.response_prefix != self.response_prefix.rstrip():
            raise DataError(
                f"{where}: the response prefix {self.response_prefix!r} ends in whitespace; drop it, the answer "
                "token carries its own leading space"
            )
        if not self.object_text:
            object.__setattr__(self, "object_text", ", ".join(self.labels))
        if self.object_text not in self.prompt:
            raise DataError(
                f"{where}: the option list {self.object_text!r} does not occur in the prompt {self.prompt!r}; "
                "write the options into the prompt or pass object_text= as they are written there"
            )

    def canonical_label(self, label: str) -> str | None:
        """The track's own spelling of `label` (surrounding spaces and case ignored), or None if it is no option."""
        wanted = label.strip().casefold()
        return next((option for option in self.labels if option.casefold() == wanted), None)


def _audiolens(attribute: str, question: str, labels: Sequence[str], response_prefix: str) -> Track:
    return Track(
        attribute, tuple(labels), f"{question} Possible options: {', '.join(labels)}.", response_prefix
    )


TRACKS: dict[str, Track] = {
    "animal": _audiolens(
        "animal",
        "What animal makes the sound?",
        ("dog", "cat", "pig", "cow", "frog", "hen", "rooster", "sheep", "crow"),
        "The sound file's animal is",
    ),
    "emotion": _audiolens(
        "emotion",
        "What is the emotion of the speaker in the speech?",
        ("angry", "disgust", "fear", "happy", "sad"),
        "The speaker's emotion is",
    ),
    "gender": _audiolens(
        "gender",
        "What is the gender of the speaker in the speech?",
        ("male", "female"),
        "The speaker's gender is",
    ),
    "language": _audiolens(
        "language",
        "What is the language spoken in the speech?",
        ("English", "German", "Spanish", "French", "Italian", "Chinese", "Japanese", "Korean"),
        "The speech's spoken language is",
    ),
}


def get_track(attribute: str) -> Track:
    """The paper's track for `attribute` (case-insensitive)."""
    track = TRACKS.get(attribute.strip().lower())
    if track is None:
        raise DataError(f"unknown attribute {attribute!r}; the tracks are {', '.join(ATTRIBUTES)}")
    return track


def make_track(
    attribute: str,
    *,
    prompt: str | None = None,
    labels: Sequence[str] | None = None,
    response_prefix: str | None = None,
    object_text: str | None = None,
) -> Track:
    """A track with a custom prompt, label set or response prefix; what is not given comes from the paper's track.

    A new attribute name (not one of `ATTRIBUTES`) needs all of `prompt`, `labels` and `response_prefix`. With
    custom labels and the default prompt, the prompt is rebuilt around the new option list. The option list must
    occur in the prompt, as `", ".join(labels)` or as `object_text`.
    """
    base = TRACKS.get(attribute.strip().lower())
    if base is None:
        missing = [
            name
            for name, value in (("prompt", prompt), ("labels", labels), ("response_prefix", response_prefix))
            if value is None
        ]
        if missing:
            raise DataError(
                f"attribute {attribute!r} is not one of the paper's tracks ({', '.join(ATTRIBUTES)}); "
                f"give {', '.join(missing)} for it"
            )
        return Track(attribute, tuple(labels), prompt, response_prefix, object_text or "")
    labels = tuple(labels) if labels is not None else base.labels
    if prompt is None:
        prompt = base.prompt.replace(base.object_text, ", ".join(labels))
    return Track(
        base.attribute,
        labels,
        prompt,
        response_prefix if response_prefix is not None else base.response_prefix,
        object_text or "",
    )
