"""Reading and checking waveforms: the one boundary where audio enters the framework."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
from jaxtyping import Float

from audiolens_ct.errors import AudioLoadError


def load_audio(path: str | Path, sampling_rate: int) -> Float[np.ndarray, " samples"]:
    """Read an audio file as a mono float32 waveform at `sampling_rate` (channels averaged, resampled)."""
    wave, rate = decode(path)
    return resample(wave, rate, sampling_rate)


def decode(source: str | Path | bytes, name: str | None = None) -> tuple[Float[np.ndarray, " samples"], int]:
    """Decode an audio file, given by its path or its bytes, to a checked mono float32 waveform and its rate.

    Every reader of audio files goes through here, so a bad file is reported one way: `AudioLoadError` naming
    `name` (default: the path, or "audio bytes") when the file is missing, unreadable, empty or not finite.
    """
    import soundfile as sf

    if isinstance(source, bytes):
        name, target, readable = name or "audio bytes", io.BytesIO(source), "readable audio"
    else:
        path = Path(source)
        if not path.is_file():
            raise AudioLoadError(f"{name or path}: no such audio file")
        name, target, readable = name or str(path), str(path), "a readable audio file"
    try:
        data, rate = sf.read(target, dtype="float32", always_2d=True)
    except Exception as exc:  # soundfile raises several unrelated types for bad files
        reason = str(exc).replace(f"Error opening {target!r}: ", "")  # soundfile repeats the path
        raise AudioLoadError(f"{name}: not {readable} (soundfile: {reason})") from exc
    return checked_mono(data, name, "the file", channel_axis=1), int(rate)


def checked_mono(
    samples: np.ndarray, where: str, what: str, channel_axis: int | None = None
) -> Float[np.ndarray, " samples"]:
    """`samples` as a mono float32 waveform: a 2-D array's channels averaged (on `channel_axis`, default the
    shorter axis). `AudioLoadError` ("<where>: <what> holds no samples", ...) when it is not a non-empty finite clip.
    """
    wave = np.asarray(samples, dtype=np.float32)
    if wave.ndim == 2:
        wave = wave.mean(axis=int(np.argmin(wave.shape)) if channel_axis is None else channel_axis)
    if wave.ndim != 1:
        raise AudioLoadError(f"{where}: {what} has shape {wave.shape}, expected a 1-D clip")
    if wave.size == 0:
        raise AudioLoadError(f"{where}: {what} holds no samples")
    if not np.isfinite(wave).all():
        raise AudioLoadError(f"{where}: {what} holds NaN or infinite samples")
    return wave


def resample(wave: Float[np.ndarray, " samples"], rate: int, sampling_rate: int) -> Float[np.ndarray, " samples"]:
    """`wave` (at `rate` Hz) at `sampling_rate` Hz, as a contiguous float32 array."""
    if rate != sampling_rate:
        import librosa

        wave = librosa.resample(wave, orig_sr=rate, target_sr=sampling_rate)
    return np.ascontiguousarray(wave, dtype=np.float32)


def as_waveform(
    audio: str | Path | np.ndarray | torch.Tensor | list[float], sampling_rate: int | None, expected_rate: int, who: str
) -> Float[np.ndarray, " samples"]:
    """Check (or load) one clip for a model that reads `expected_rate` Hz mono audio.

    A path is loaded and resampled. An array must be 1-D, finite and non-empty; its `sampling_rate` (default:
    `expected_rate`) must equal `expected_rate`, since a silent mismatch would make every result wrong.
    """
    if isinstance(audio, (str, Path)):
        return load_audio(audio, expected_rate)
    wave = audio.detach().cpu().numpy() if isinstance(audio, torch.Tensor) else np.asarray(audio)
    if sampling_rate is not None and sampling_rate != expected_rate:
        raise AudioLoadError(
            f"audio is at {sampling_rate} Hz but {who} expects {expected_rate} Hz; resample it first "
            f"(audiolens_ct.load_audio(path, {expected_rate}) does)"
        )
    if wave.ndim != 1:
        raise AudioLoadError(
            f"expected a mono 1-D waveform for {who}, got an array of shape {tuple(wave.shape)}; "
            "down-mix the channels first (audiolens_ct.load_audio does)"
        )
    if wave.size == 0:
        raise AudioLoadError(f"the waveform for {who} is empty")
    if not np.issubdtype(wave.dtype, np.number):
        raise AudioLoadError(f"the waveform for {who} has dtype {wave.dtype}, expected floats")
    wave = wave.astype(np.float32)
    if not np.isfinite(wave).all():
        raise AudioLoadError(f"the waveform for {who} contains NaN or infinite samples")
    return wave
