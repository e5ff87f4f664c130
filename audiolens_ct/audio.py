"""Reading and checking waveforms: the one boundary where audio enters the framework."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from jaxtyping import Float

from audiolens_ct.errors import AudioLoadError


def load_audio(path: str | Path, sampling_rate: int) -> Float[np.ndarray, " samples"]:
    """Read an audio file as a mono float32 waveform at `sampling_rate` (channels averaged, resampled)."""
    import librosa
    import soundfile as sf

    path = Path(path)
    if not path.is_file():
        raise AudioLoadError(f"{path}: no such audio file")
    try:
        data, rate = sf.read(str(path), dtype="float32", always_2d=True)
    except Exception as exc:  # soundfile raises several unrelated types for bad files
        reason = str(exc).replace(f"Error opening {str(path)!r}: ", "")  # soundfile repeats the path
        raise AudioLoadError(f"{path}: not a readable audio file (soundfile: {reason})") from exc
    if data.shape[0] == 0:
        raise AudioLoadError(f"{path}: the file holds no samples")
    if not np.isfinite(data).all():
        raise AudioLoadError(f"{path}: the file holds NaN or infinite samples")
    wave = data.mean(axis=1)
    if rate != sampling_rate:
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
