"""The synthesiser: a source-filter voice rendered frame by frame in the STFT domain (pure numpy).

A `Score` holds the control tracks of one clip: pitch and loudness per sample, formants, breath and a noise band
per 8 ms frame. `Score.render` turns them into a waveform: a sawtooth glottal-like source (with pitch jitter and
shimmer) and white noise, shaped per frame by formant resonances, a spectral tilt and the noise band, then pink
background noise at a chosen SNR and a chosen RMS level. The speech and animal modules only write scores.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from jaxtyping import Float

SAMPLING_RATE = 16000
_N_FFT, _HOP = 512, 128
_FREQS = np.fft.rfftfreq(_N_FFT, 1 / SAMPLING_RATE)
# periodic sqrt-Hann: analysis window x synthesis window = Hann, whose copies at hop N/4 sum to 2
_WINDOW = np.sqrt(np.hanning(_N_FFT + 1)[:-1]).astype(np.float32)
_FREQS_F = np.maximum(_FREQS, 60.0).astype(np.float32)  # floor for the tilt and resonance formulas
_PINK = 1 / np.sqrt(_FREQS_F / 500.0)


class Score:
    """Control tracks of one clip: pitch and loudness per sample, formants and noise bands per frame."""

    def __init__(self, seconds: float, rng: np.random.Generator) -> None:
        self.rng = rng
        self.n = int(seconds * SAMPLING_RATE)
        frames = self.n // _HOP + 4  # covers every STFT frame of the padded clip
        self.f0 = np.full(self.n, 100.0)
        self.voice = np.zeros(self.n)
        self.breath = np.zeros(frames)
        self.hiss = np.zeros(frames)
        self.formants = np.tile([500.0, 1500.0, 2500.0, 3500.0], (frames, 1))
        self.bandwidths = np.tile([80.0, 100.0, 150.0, 250.0], (frames, 1))
        self.band = np.tile([3000.0, 1000.0], (frames, 1))  # hiss centre and width (Hz)
        self.tilt = -9.0  # dB per octave above 500 Hz, of the voiced and breath paths

    @property
    def seconds(self) -> float:
        return self.n / SAMPLING_RATE

    def _span(self, t0: float, t1: float) -> tuple[slice, slice]:
        s0, s1 = max(0, int(t0 * SAMPLING_RATE)), min(self.n, int(t1 * SAMPLING_RATE))
        return slice(s0, s1), slice(s0 // _HOP, max(s0 // _HOP + 1, s1 // _HOP + 1))

    def tone(
        self,
        t0: float,
        t1: float,
        pitch: Iterable[float],
        formants: Iterable[float] | Iterable[Iterable[float]],
        amp: float = 1.0,
        bandwidths: Iterable[float] = (80.0, 100.0, 150.0, 250.0),
        attack: float = 0.015,
        release: float = 0.03,
        breath: float = 0.0,
        am: tuple[float, float] = (0.0, 0.0),
        vibrato: tuple[float, float] = (0.0, 0.0),
    ) -> None:
        """A voiced segment: pitch glides through the `pitch` anchors (Hz, log-linear), formants likewise.

        `formants` is one set of four frequencies or a list of sets to glide through; `am` = (rate Hz, depth) is an
        amplitude modulation, `vibrato` = (rate Hz, semitones) a pitch modulation.
        """
        samples, frames = self._span(t0, t1)
        m = samples.stop - samples.start
        if m <= 0:
            return
        pos = np.linspace(0.0, 1.0, m)
        anchors = np.log(np.asarray(list(pitch), dtype=float))
        f0 = np.exp(np.interp(pos, np.linspace(0, 1, len(anchors)), anchors))
        t = np.arange(m) / SAMPLING_RATE
        if vibrato[1]:
            f0 = f0 * 2 ** (vibrato[1] / 12 * np.sin(2 * np.pi * vibrato[0] * t + self.rng.uniform(0, 6.3)))
        self.f0[samples] = f0
        env = np.minimum(1.0, np.minimum(t / attack, (m / SAMPLING_RATE - t) / release).clip(0))
        if am[1]:
            env = env * (1 - am[1] * 0.5 * (1 + np.cos(2 * np.pi * am[0] * t)))
        self.voice[samples] = amp * env
        sets = np.atleast_2d(np.asarray(list(formants), dtype=float))
        k = frames.stop - frames.start
        grid = np.linspace(0, 1, len(sets))
        self.formants[frames] = np.stack(
            [np.interp(np.linspace(0, 1, k), grid, sets[:, j]) for j in range(4)], 1
        )
        self.bandwidths[frames] = np.asarray(list(bandwidths), dtype=float)
        self.breath[frames] = breath * amp

    def noise(self, t0: float, t1: float, centre: float, width: float, amp: float) -> None:
        """A noise segment (fricative, burst, hiss) in a Gaussian band around `centre` Hz."""
        _, frames = self._span(t0, t1)
        k = frames.stop - frames.start
        self.hiss[frames] = amp * np.hanning(k + 2)[1:-1]
        self.band[frames] = (centre, width)

    def render(self, roughness: float, snr_db: float, level_db: float) -> Float[np.ndarray, " samples"]:
        """The waveform: source through the per-frame filters, pink background noise at `snr_db` below the
        sounding frames, RMS level `level_db` dBFS. `roughness` adds pitch jitter and amplitude shimmer."""
        rng, n = self.rng, self.n
        f0 = self.f0 * np.exp((0.01 + 0.05 * roughness) * _smooth_noise(rng, n, 120.0))
        phase = np.cumsum(f0) / SAMPLING_RATE
        shimmer = 1 + 0.6 * roughness * _smooth_noise(rng, n, 70.0)
        spec = _stft((2 * (phase % 1.0) - 1) * self.voice * shimmer)
        frames = spec.shape[0]
        fmt = self.formants[:frames, :, None].astype(np.float32)
        half_bw = self.bandwidths[:frames, :, None].astype(np.float32) / 2
        tract = (1.0 / (1 + ((_FREQS_F - fmt) / half_bw) ** 2)).sum(1) + 0.02
        voiced_filter = tract * (_FREQS_F / 500.0) ** np.float32(self.tilt / 6.02)
        centre, width = self.band[:frames, :1].astype(np.float32), self.band[:frames, 1:].astype(np.float32)
        breath, hiss = (
            self.breath[:frames, None].astype(np.float32),
            self.hiss[:frames, None].astype(np.float32),
        )
        noise_filter = breath * voiced_filter + hiss * np.exp(-0.5 * ((_FREQS_F - centre) / width) ** 2)
        # complex white noise, about as loud per bin as a unit sawtooth
        white = rng.standard_normal((frames, len(_FREQS), 2), dtype=np.float32).view(np.complex64)[..., 0] * 8
        spec = spec * voiced_filter + white * noise_filter
        power = _power(spec).sum(1)
        sounding = power > 1e-3 * power.max()
        background = white * _PINK
        gain = np.sqrt(power[sounding].mean() / _power(background).sum(1).mean() * 10 ** (-snr_db / 10))
        wave = _istft(spec + gain * background, n)
        wave *= 10 ** (level_db / 20) / np.sqrt(np.mean(wave**2) + 1e-12)
        peak = np.abs(wave).max()
        if peak > 0.99:
            wave *= 0.99 / peak
        return wave.astype(np.float32)


def _power(spec: np.ndarray) -> np.ndarray:
    return spec.real**2 + spec.imag**2


def _smooth_noise(rng: np.random.Generator, n: int, rate: float) -> np.ndarray:
    """Unit-scale random fluctuation with about `rate` Hz bandwidth, one value per sample."""
    knots = rng.standard_normal(int(n / SAMPLING_RATE * rate) + 2)
    return np.interp(np.arange(n) * rate / SAMPLING_RATE, np.arange(len(knots)), knots)


def _stft(x: np.ndarray) -> np.ndarray:
    padded = np.pad(x, (_N_FFT // 2, _N_FFT // 2 + _HOP))
    frames = np.lib.stride_tricks.sliding_window_view(padded, _N_FFT)[::_HOP]
    return np.fft.rfft((frames * _WINDOW).astype(np.float32), axis=1)


def _istft(spec: np.ndarray, n: int) -> np.ndarray:
    frames = np.fft.irfft(spec, _N_FFT, axis=1) * _WINDOW
    count, parts = frames.shape[0], _N_FFT // _HOP
    out = np.zeros((count + parts - 1, _HOP))
    chunks = frames.reshape(count, parts, _HOP)
    for j in range(parts):
        out[j : j + count] += chunks[:, j]
    return out.reshape(-1)[_N_FFT // 2 : _N_FFT // 2 + n] / 2.0

