"""One clip to trace: its audio, its question in the AudioLens format and its correct option.

Loaders never drop a bad sample silently and never stop a whole data set for one bad row. A sample whose label is
not among the options, or whose audio file is missing, comes back with `error` set to a message for people; a
sweep records that message as the sample's outcome instead of tracing it. A file that exists but cannot be
decoded is found when it is read: `Sample.load` raises `AudioLoadError` naming the file.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from jaxtyping import Float

from audiolens_ct.audio import checked_mono, load_audio, resample
from audiolens_ct.data.prompts import Track
from audiolens_ct.errors import AudioLoadError


@dataclass(frozen=True, eq=False)
class Sample:
    """One clip with its question.

    Attributes:
        id: stable name of the sample, e.g. "Gender/f_001.wav" for SAKURA or the audio path of a manifest row.
        attribute: the track ("gender", ...).
        label: the correct option, in the track's spelling when it is one of the options.
        prompt, response_prefix, options, object_text: the question, as in `Track`; pass them to
            `HookedLALM.prepare(..., options=..., object_text=...)`.
        audio_path: the audio file, or None when the audio is held in memory.
        waveform: the audio in memory at `waveform_rate` Hz: mono, or 2-D with channels on the shorter axis.
        error: why this sample cannot be traced (label outside the options, missing audio), or None.
    """

    id: str
    attribute: str
    label: str
    prompt: str
    response_prefix: str
    options: tuple[str, ...]
    object_text: str
    audio_path: Path | None = None
    waveform: np.ndarray | None = None
    waveform_rate: int | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        """True when the sample can be traced (no recorded error)."""
        return self.error is None

    def source(self) -> dict[str, Any] | None:
        """The clip as stored: `seconds`, `sample_rate`, `channels` (from the file's header, or the array), or
        None when that cannot be read (the error shows when the clip is loaded)."""
        if self.waveform is not None:
            wave = np.asarray(self.waveform)
            frames, channels = (wave.size, 1) if wave.ndim == 1 else (max(wave.shape), min(wave.shape))
            return dict(seconds=frames / self.waveform_rate, sample_rate=self.waveform_rate, channels=channels)
        if self.audio_path is None:
            return None
        import soundfile as sf

        try:
            info = sf.info(str(self.audio_path))
        except Exception:  # missing or unreadable: reported by `load`
            return None
        return dict(seconds=info.frames / info.samplerate, sample_rate=info.samplerate, channels=info.channels)

    def load(self, sampling_rate: int) -> Float[np.ndarray, " samples"]:
        """The clip as a mono float32 waveform at `sampling_rate` Hz (channels averaged, resampled)."""
        if self.waveform is not None:
            wave = checked_mono(self.waveform, f"sample {self.id}", "the waveform")
            return resample(wave, self.waveform_rate, sampling_rate)
        if self.audio_path is None:
            raise AudioLoadError(f"sample {self.id}: holds neither an audio path nor a waveform")
        return load_audio(self.audio_path, sampling_rate)


def make_sample(
    track: Track,
    id: str,
    label: str,
    *,
    audio_path: Path | None = None,
    waveform: np.ndarray | None = None,
    waveform_rate: int | None = None,
    error: str | None = None,
) -> Sample:
    """A `Sample` asking `track`'s question, with the label matched to the options and problems recorded.

    The label is matched ignoring surrounding spaces and case ("english" -> "English"). A label outside the
    options, or an `audio_path` that is not a file, is recorded in `error` (joined to any `error` given).
    """
    errors = [error] if error else []
    label = str(label).strip()
    canonical = track.canonical_label(label)
    if canonical is None:
        errors.append(
            f"label {label!r} is not among the options of track {track.attribute!r} ({', '.join(track.labels)})"
        )
    if waveform is None and audio_path is not None and not Path(audio_path).is_file():
        errors.append(f"{audio_path}: no such audio file")
    if waveform is not None and not waveform_rate:
        raise ValueError(f"sample {id}: a waveform needs its sampling rate")
    return Sample(
        id=id,
        attribute=track.attribute,
        label=canonical or label,
        prompt=track.prompt,
        response_prefix=track.response_prefix,
        options=track.labels,
        object_text=track.object_text,
        audio_path=Path(audio_path) if audio_path is not None else None,
        waveform=waveform,
        waveform_rate=waveform_rate,
        error="; ".join(errors) or None,
    )
