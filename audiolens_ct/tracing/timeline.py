"""Time in the audio: which seconds of the clip each audio row stands for, and windows of rows to restore.

Time-wise tracing restores a window of audio rows at layer l: RR(l, t) says which seconds of the clip carry what
the answer needs, at which depth. The port says when each of its audio rows starts (`Port.audio_row_seconds`:
Qwen2-Audio and Qwen-Audio give 25 rows a second, Voxtral 12.5; Q-Former queries such as DeSTA's stand for no
moment and give no timeline).

Windows of `width` seconds start every `hop` seconds (default `hop = width`: no overlap) and tile the seconds the
model hears (the clip, cut to the port's audio window); a row belongs to every window holding its start time.
Rows that start after the clip ends (the padding a processor adds, e.g. Voxtral's 30-s chunks) and rows that stand
for no moment (Qwen-Audio's boundary embeddings) are in no window.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from jaxtyping import Float

from audiolens_ct.errors import InputError
from audiolens_ct.inputs import LALMInput
from audiolens_ct.tracing.spans import corresponding

if TYPE_CHECKING:
    from audiolens_ct.model import HookedLALM

ENVELOPE_RATE = 50
"""Frames per second of a clip's loudness envelope (`envelope`), drawn above the RR(l, t) map."""


@dataclass(frozen=True)
class TimeWindow:
    """Seconds `[start, end)` of the clip, and the audio rows they hold: clean positions `src`, corrupted `dst`."""

    start: float
    end: float
    src: tuple[int, ...]
    dst: tuple[int, ...]


def require_timeline(model: HookedLALM, n_rows: int = 1) -> Float[np.ndarray, " n_rows"]:
    """The start times of `n_rows` audio rows of `model`'s port; `InputError` for a port whose rows have none
    (checked before a data-set run, so it is refused before anything is written)."""
    seconds = model.port.audio_row_seconds(model.hf_model, model.processor, n_rows)
    if seconds is None:
        raise InputError(
            f"{model.port.name}'s audio rows stand for no moments of the clip (Port.audio_row_seconds gives none), "
            "so time windows cannot be traced for it; trace spans of audio rows instead (spans=('audio',))"
        )
    return seconds


def row_seconds(model: HookedLALM, clean: LALMInput) -> Float[np.ndarray, " n_rows"]:
    """The start time of each audio row of `clean`, in seconds from the clip's start (NaN: no moment)."""
    n_rows = len(clean.audio_positions)
    seconds = np.asarray(require_timeline(model, n_rows), dtype=np.float64)
    if seconds.shape != (n_rows,):
        raise InputError(f"{model.port.name}: audio_row_seconds gave {seconds.shape[0]} times for {n_rows} audio rows")
    return seconds


def time_windows(
    model: HookedLALM, clean: LALMInput, corrupted: LALMInput, heard_seconds: float, width: float = 0.5,
    hop: float | None = None,
) -> list[TimeWindow]:  # fmt: skip
    """Windows of `width` seconds every `hop` seconds over the `heard_seconds` of the clip, each with its audio
    rows (see the module docstring); windows past the last row are left out."""
    seconds = row_seconds(model, clean)
    hop = width if hop is None else hop
    timed = seconds[np.isfinite(seconds)]
    step = float(np.min(np.diff(timed))) if len(timed) > 1 else heard_seconds
    for name, value in (("time_window", width), ("time_hop", hop)):
        if value < step - 1e-9:
            raise InputError(
                f"{name} {value:g} s is shorter than one audio row of {model.port.name} ({step:g} s): some windows "
                "would hold no row; use a longer one"
            )
    rows = clean.audio_positions
    windows = []
    for k in range(math.ceil(heard_seconds / hop - 1e-9)):
        start, end = k * hop, min(k * hop + width, heard_seconds)
        src = tuple(p for p, t in zip(rows, seconds, strict=True) if start - 1e-9 <= t < end - 1e-9)
        if src:
            windows.append(TimeWindow(start, k * hop + width, src, tuple(corresponding(clean, corrupted, list(src)))))
    return windows


def envelope(wave: Float[np.ndarray, " samples"], sampling_rate: int, seconds: float) -> dict[str, Any]:
    """The loudness of the first `seconds` of `wave`, JSON-ready: `{"rate": ENVELOPE_RATE, "rms": [...]}`, the RMS
    over frames of 1/`ENVELOPE_RATE` s."""
    frame = sampling_rate // ENVELOPE_RATE
    heard = np.asarray(wave[: int(round(seconds * sampling_rate))], dtype=np.float64)
    n_frames = math.ceil(len(heard) / frame)
    padded = np.zeros(n_frames * frame)
    padded[: len(heard)] = heard
    rms = np.sqrt((padded.reshape(n_frames, frame) ** 2).mean(axis=1))
    return {"rate": ENVELOPE_RATE, "rms": np.round(rms, 6).tolist()}
