"""A seeded, offline stand-in for SAKURA: synthetic clips whose class is carried by acoustics.

Each clip is built by a small source-filter synthesiser (pure numpy): a sawtooth glottal-like source with a pitch
contour, plus aspiration and fricative noise, shaped frame by frame (8 ms hop) in the STFT domain by formant
resonances, a spectral tilt and noise bands. What distinguishes the classes:

- animal: the call pattern: barks (dog), an arched gliding meow (cat), rough nasal grunts (pig), a long low moo
  (cow), pulse trains (frog), short clucks (hen), a four-part harsh crow (rooster), a tremolo bleat (sheep), harsh
  noisy caws (crow);
- emotion: prosody and voice quality: pitch level and range, syllable rate, vocal effort (spectral tilt, level),
  breathiness, roughness, tremor;
- gender: fundamental frequency and vocal-tract length (formant scaling) of the speaker;
- language: vowel inventory and articulatory setting (formant shifts, tilt), consonant noise bands, syllable rate
  and timing regularity, and pitch pattern (lexical tones, pitch accent, phrase-final rises).

Every clip draws its own speaker (sex, pitch, vocal-tract length), duration (1-5 s, independent of the class),
timing, pitch jitter, spectral tilt, level and background noise, so classes overlap a little. Measured on held-out
clips (tests/test_synthetic.py, three seeds): a linear probe on per-clip log-mel statistics gets 90-99% per
track, while the best single statistic gets 41-60% (language, animal), 72-75% (emotion) and 86-94% (gender,
where pitch nearly decides, as in real speech). Clips are 16 kHz mono float32 and take about 10-20 ms each to
make; `write_synthetic_sakura` writes them in the SAKURA on-disk layout for `load_sakura`.
"""

from __future__ import annotations

import csv
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from jaxtyping import Float

from audiolens_ct.data.prompts import ATTRIBUTES, get_track
from audiolens_ct.data.sakura import TRACK_FOLDERS
from audiolens_ct.errors import DataError

SAMPLING_RATE = 16000
MIN_SECONDS, MAX_SECONDS = 1.0, 5.0
_N_FFT, _HOP = 512, 128
_FREQS = np.fft.rfftfreq(_N_FFT, 1 / SAMPLING_RATE)
# periodic sqrt-Hann: analysis window x synthesis window = Hann, whose copies at hop N/4 sum to 2
_WINDOW = np.sqrt(np.hanning(_N_FFT + 1)[:-1]).astype(np.float32)
_FREQS_F = np.maximum(_FREQS, 60.0).astype(np.float32)  # floor for the tilt and resonance formulas
_PINK = 1 / np.sqrt(_FREQS_F / 500.0)


# -- the synthesiser ----------------------------------------------------------------------------------------------


class _Score:
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


# -- speech: speakers, sounds, styles ------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Speaker:
    f0: float  # typical pitch (Hz)
    scale: float  # vocal-tract length factor on every formant (shorter tract, higher formants)


def _speaker(rng: np.random.Generator, sex: str | None = None) -> _Speaker:
    sex = sex or ("male", "female")[rng.integers(2)]
    if sex == "male":
        return _Speaker(120.0 * np.exp(rng.normal(0, 0.15)), np.exp(rng.normal(0, 0.05)))
    return _Speaker(200.0 * np.exp(rng.normal(0, 0.14)), 1.15 * np.exp(rng.normal(0, 0.05)))


# F1, F2, F3 of an adult male voice (Hz)
_VOWELS = {
    "i": (280, 2250, 2900), "ih": (400, 1900, 2550), "e": (400, 2000, 2600), "eh": (550, 1800, 2500),
    "ae": (690, 1660, 2450), "a": (750, 1250, 2500), "aa": (700, 1100, 2450), "aw": (580, 880, 2450),
    "o": (450, 820, 2400), "u": (310, 850, 2250), "uh": (450, 1050, 2300), "ah": (620, 1200, 2500),
    "schwa": (500, 1450, 2450), "y": (280, 1800, 2200), "oe": (400, 1550, 2300), "ui": (330, 1350, 2350),
    "ea": (480, 1100, 2400),
}  # fmt: skip

# kind, band centre (Hz; F2 for the voiced kinds nasal/liquid/trill), band width (Hz), seconds, amplitude
_CONSONANTS = {
    "s": ("noise", 6200, 1100, 0.085, 0.5), "sh": ("noise", 3300, 800, 0.09, 0.6),
    "x": ("noise", 1900, 700, 0.08, 0.45), "f": ("noise", 5000, 2500, 0.07, 0.2),
    "h": ("noise", 1600, 1400, 0.05, 0.15), "ts": ("noise", 6800, 1400, 0.06, 0.55),
    "sr": ("noise", 2800, 700, 0.09, 0.5), "r_uvular": ("noise", 1100, 450, 0.06, 0.4),
    "t": ("stop", 4200, 1800, 0.02, 0.7), "k": ("stop", 2000, 700, 0.025, 0.6), "p": ("stop", 900, 700, 0.015, 0.5),
    "th": ("aspirated", 4200, 1800, 0.07, 0.6), "kh": ("aspirated", 2000, 900, 0.07, 0.6),
    "m": ("nasal", 1000, 0, 0.05, 0.35), "n": ("nasal", 1500, 0, 0.05, 0.35),
    "l": ("liquid", 1100, 0, 0.05, 0.5), "r_trill": ("trill", 1300, 0, 0.06, 0.5), "r_tap": ("liquid", 1500, 0, 0.02, 0.5),
}  # fmt: skip


@dataclass(frozen=True)
class _Style:
    """How one voice speaks: sounds, timing, pitch pattern and voice quality."""

    vowels: dict[str, float]
    onsets: dict[str, float]
    codas: dict[str, float]
    onset_prob: float = 0.8
    coda_prob: float = 0.3
    rate: float = 5.0  # syllables per second
    rate_cv: float = 0.3  # spread of syllable durations (log scale)
    pitch: str = "declination"  # pitch pattern, see _syllable_pitch
    pitch_level: float = 1.0  # times the speaker's pitch
    pitch_range: float = 3.0  # semitones
    shift: tuple[float, float, float] = (1.0, 1.0, 1.0)  # articulatory setting: factors on F1, F2, F3
    tilt: float = -9.0
    breath: float = 0.1
    roughness: float = 0.1
    tremor: tuple[float, float] = (0.0, 0.0)
    level_db: float = 0.0
    nasal_prob: float = 0.0
    pause_prob: float = 0.2
    amp_spread: float = 0.15


_NEUTRAL_VOWELS = {"a": 1, "e": 1, "i": 1, "o": 1, "u": 1, "schwa": 1, "eh": 1}
_NEUTRAL_ONSETS = {"s": 1, "t": 1, "k": 1, "m": 1, "n": 1, "l": 1, "p": 1, "h": 1}

_LANGUAGES = {
    "English": _Style(
        vowels={"schwa": 3, "ih": 2, "ae": 2, "ah": 1.5, "eh": 1, "uh": 0.7},
        onsets={"s": 2, "t": 1.5, "k": 1, "p": 1, "h": 1, "m": 1, "n": 1, "l": 1, "f": 1},
        codas={"s": 2, "t": 1.5, "n": 1.5, "k": 0.5},
        coda_prob=0.5, rate=4.8, rate_cv=0.45, pitch="declination", pitch_range=4.0,
        shift=(1.0, 1.0, 0.82), tilt=-9.0,
    ),
    "German": _Style(
        vowels={"y": 1.5, "oe": 1.5, "a": 1, "e": 1, "u": 1, "schwa": 1},
        onsets={"sh": 2, "x": 1.5, "ts": 1.5, "t": 1, "k": 1, "r_uvular": 1, "f": 1, "m": 0.5, "n": 0.5},
        codas={"x": 2, "t": 1.5, "s": 1, "n": 1},
        coda_prob=0.6, rate=4.4, rate_cv=0.4, pitch="declination", pitch_range=3.0,
        shift=(0.88, 1.0, 1.08), tilt=-6.5,
    ),
    "Spanish": _Style(
        vowels={"a": 3, "e": 2.5, "o": 2, "i": 1},
        onsets={"s": 2, "t": 1, "k": 1, "p": 1, "r_trill": 1, "r_tap": 1, "m": 1, "n": 1, "l": 1},
        codas={"s": 2, "n": 1},
        coda_prob=0.3, rate=7.0, rate_cv=0.15, pitch="declination", pitch_range=3.0,
        shift=(1.12, 0.95, 1.0), tilt=-10.0,
    ),
    "French": _Style(
        vowels={"y": 2, "oe": 2, "e": 1.5, "eh": 1, "a": 1, "u": 1},
        onsets={"r_uvular": 2.5, "s": 1, "sh": 1, "t": 1, "p": 1, "m": 1, "n": 1, "l": 1.5},
        codas={"r_uvular": 1, "l": 1},
        coda_prob=0.2, rate=6.3, rate_cv=0.15, pitch="final_rise", pitch_range=4.0, nasal_prob=0.4,
        shift=(0.95, 1.15, 1.05), tilt=-11.0,
    ),
    "Italian": _Style(
        vowels={"a": 3, "o": 2, "aw": 1.5, "eh": 1.5, "e": 1},
        onsets={"r_trill": 1.5, "ts": 1, "t": 1.5, "k": 1, "n": 1, "m": 1, "l": 1.5, "p": 1},
        codas={"n": 1, "l": 1},
        coda_prob=0.1, rate=6.0, rate_cv=0.25, pitch="melodic", pitch_range=6.0,
        shift=(1.2, 0.95, 1.0), tilt=-6.0,
    ),
    "Chinese": _Style(
        vowels={"ea": 2, "schwa": 2, "y": 1, "a": 1, "i": 1, "u": 1},
        onsets={"sr": 2.5, "ts": 1.5, "x": 1.5, "th": 1, "kh": 1, "m": 0.7, "n": 0.7},
        codas={"n": 2, "m": 0.5},
        coda_prob=0.35, rate=5.0, rate_cv=0.2, pitch="tones", pitch_range=8.0,
        shift=(1.0, 0.85, 0.88), tilt=-8.5,
    ),
    "Japanese": _Style(
        vowels={"a": 2, "ui": 2, "o": 2, "e": 1, "i": 1},
        onsets={"k": 1.5, "t": 1, "s": 1, "sh": 1, "ts": 0.7, "n": 1.2, "m": 1, "h": 1.5, "r_tap": 1.2},
        codas={"n": 1},
        onset_prob=0.85, coda_prob=0.08, rate=7.5, rate_cv=0.1, pitch="accent", pitch_range=4.0,
        shift=(0.88, 0.9, 1.0), tilt=-13.0, breath=0.35,
    ),
    "Korean": _Style(
        vowels={"ah": 2.5, "ui": 2, "eh": 1.5, "a": 1, "o": 1},
        onsets={"th": 2, "kh": 2, "t": 1, "k": 1, "sh": 1.5, "n": 1, "m": 1, "h": 1},
        codas={"n": 1.5, "k": 1, "l": 1},
        coda_prob=0.35, rate=6.5, rate_cv=0.2, pitch="phrase_lh", pitch_range=5.0,
        shift=(1.0, 1.1, 1.15), tilt=-7.5,
    ),
}  # fmt: skip

_NEUTRAL = _Style(vowels=_NEUTRAL_VOWELS, onsets=_NEUTRAL_ONSETS, codas={"s": 1, "n": 1, "t": 1})

_EMOTIONS = {
    "angry": dict(pitch="falling", pitch_level=1.15, pitch_range=3.0, rate=5.6, tilt=-2.5, breath=0.05,
                  roughness=0.6, level_db=6.0, shift=(1.15, 1.0, 1.0), amp_spread=0.3),
    "disgust": dict(pitch="falling", pitch_level=1.0, pitch_range=5.0, rate=3.8, rate_cv=0.35, tilt=-7.0,
                    breath=0.1, roughness=1.0, level_db=1.0, shift=(0.88, 0.85, 1.0), nasal_prob=0.6),
    "fear": dict(pitch="flat", pitch_level=1.7, pitch_range=2.0, rate=6.2, tilt=-10.0, breath=0.8,
                 roughness=0.2, tremor=(7.0, 1.2), level_db=-2.0, pause_prob=0.45),
    "happy": dict(pitch="arch", pitch_level=1.35, pitch_range=9.0, rate=5.0, tilt=-6.0, breath=0.03,
                  roughness=0.05, level_db=2.0, shift=(1.03, 1.12, 1.03)),
    "sad": dict(pitch="falling", pitch_level=0.8, pitch_range=1.0, rate=3.2, rate_cv=0.2, tilt=-15.0,
                breath=0.5, roughness=0.05, level_db=-7.0, pause_prob=0.35, amp_spread=0.05, shift=(1.0, 0.92, 1.0)),
}  # fmt: skip


def _syllable_pitch(style: _Style, index: int, length: int, rng: np.random.Generator) -> list[float]:
    """Pitch anchors of one syllable in semitones about the speaker's level, by the style's pattern."""
    r, pos = style.pitch_range, index / max(1, length - 1)
    last = index == length - 1
    if style.pitch == "tones":  # lexical tones: high level, rising, dipping, falling
        return [[r / 2, r / 2], [-r / 4, r / 2], [-r / 4, -r / 2, 0.0], [r / 2, -r / 2]][rng.integers(4)]
    if style.pitch == "accent":  # high before the accented mora, low after it
        high = index <= length // 2
        return [r / 2, r / 2 - 0.5] if high else [-r / 4, -r / 2]
    if style.pitch == "phrase_lh":  # low-high alternation, rising at the phrase end
        return [0.0, r] if last else ([-r / 2, -r / 3] if index % 2 == 0 else [r / 3, r / 2])
    if style.pitch == "final_rise":
        return [-r * pos / 4, r] if last else [-r * pos / 4, -r * pos / 4 - 0.3]
    if style.pitch == "melodic":
        centre = r / 2 * np.sin(np.pi * pos * 1.5)
        return [centre - r / 4, centre + r / 4, centre - r / 4]
    if style.pitch == "arch":  # every syllable rises and falls widely
        return [-r / 4, r / 2, -r / 4] if rng.random() < 0.6 else [0.0, r / 3]
    if style.pitch == "falling":
        return [r / 2 - r * pos / 2, -r * pos / 2 - r / 4]
    if style.pitch == "flat":
        return [0.0, 0.2]
    stress = r * 0.8 if rng.random() < 0.35 else 0.0  # declination with stressed peaks
    return [-r * pos, stress - r * pos, -r * pos - 0.5]


def _consonant(score: _Score, t: float, name: str, speaker: _Speaker, f0: float, breath: float) -> float:
    """Write one consonant at `t`; return where it ends."""
    kind, centre, width, seconds, amp = _CONSONANTS[name]
    rng = score.rng
    seconds *= np.exp(rng.normal(0, 0.15))
    if kind == "noise":
        score.noise(t, t + seconds, centre * speaker.scale**0.5, width, amp)
    elif kind == "stop":
        t += 0.03  # closure
        score.noise(t, t + seconds, centre, width, amp)
    elif kind == "aspirated":
        t += 0.03
        score.noise(t, t + 0.015, centre, width, amp)
        score.noise(t + 0.015, t + seconds, 1600 * speaker.scale, 1400, 0.5 * amp)
    else:
        low = (250.0, centre, 2300.0, 3300.0) if kind == "nasal" else (380.0, centre, 2600.0, 3500.0)
        am = (28.0, 0.8) if kind == "trill" else (0.0, 0.0)
        score.tone(t, t + seconds, [f0, f0], np.multiply(low, speaker.scale), amp, attack=0.01, release=0.01,
                   breath=breath, am=am)  # fmt: skip
    return t + seconds


def _pick(rng: np.random.Generator, weights: dict[str, float]) -> str:
    names = list(weights)
    p = np.asarray([weights[k] for k in names], dtype=float)
    return names[rng.choice(len(names), p=p / p.sum())]


def _speech(score: _Score, rng: np.random.Generator, speaker: _Speaker, style: _Style) -> None:
    """Fill the clip with phrases of syllables in `style`, by `speaker`."""
    level = speaker.f0 * style.pitch_level * np.exp(rng.normal(0, 0.05))
    rate = style.rate * np.exp(rng.normal(0, 0.08))
    t, end = rng.uniform(0.03, 0.25), score.seconds - rng.uniform(0.05, 0.2)
    while t < end - 0.1:
        length = int(rng.integers(3, 9))
        for index in range(length):
            if t >= end - 0.1:
                break
            syllable_end = t + np.clip(np.exp(rng.normal(0, style.rate_cv)) / rate, 0.07, 0.6)
            if style.pitch == "final_rise" and index == length - 1:
                syllable_end += 0.5 / rate
            if rng.random() < style.onset_prob:
                t = _consonant(score, t, _pick(rng, style.onsets), speaker, level, style.breath)
            coda = _pick(rng, style.codas) if rng.random() < style.coda_prob else None
            vowel_end = max(t + 0.04, syllable_end - (0.07 if coda else 0.0))
            f1, f2, f3 = np.multiply(_VOWELS[_pick(rng, style.vowels)], style.shift) * speaker.scale
            f1, f2, f3 = np.array([f1, f2, f3]) * np.exp(rng.normal(0, 0.03, 3))
            formants, widths = (f1, f2, f3, 3500 * speaker.scale), (80.0, 100.0, 150.0, 250.0)
            if rng.random() < style.nasal_prob:
                formants, widths = (250.0, f1, f2, f3), (100.0, 250.0, 120.0, 200.0)
            pitch = level * 2 ** (np.asarray(_syllable_pitch(style, index, length, rng)) / 12)
            amp = np.exp(rng.normal(0, style.amp_spread))
            score.tone(t, vowel_end, pitch, formants, amp, bandwidths=widths, breath=style.breath,
                       vibrato=style.tremor)  # fmt: skip
            t = vowel_end
            if coda:
                t = _consonant(score, t, coda, speaker, float(pitch[-1]), style.breath)
            t += rng.uniform(0.0, 0.03)
        if rng.random() < style.pause_prob:
            t += rng.uniform(0.12, 0.35)
        t += rng.uniform(0.05, 0.15)


def _varied(style: _Style, rng: np.random.Generator, **changes: object) -> _Style:
    """`style` with `changes`, and a little random variation in rate, pitch range and voice quality."""
    style = replace(style, **changes)
    return replace(
        style,
        rate=style.rate * np.exp(rng.normal(0, 0.08)),
        pitch_range=style.pitch_range * np.exp(rng.normal(0, 0.15)),
        tilt=style.tilt + rng.normal(0, 1.5),
        breath=style.breath * np.exp(rng.normal(0, 0.2)),
    )


def _gender_clip(score: _Score, rng: np.random.Generator, label: str) -> tuple[float, float]:
    style = _varied(_NEUTRAL, rng)
    score.tilt = style.tilt
    _speech(score, rng, _speaker(rng, label), style)
    return style.roughness, style.level_db


def _emotion_clip(score: _Score, rng: np.random.Generator, label: str) -> tuple[float, float]:
    style = _varied(_NEUTRAL, rng, **_EMOTIONS[label])
    score.tilt = style.tilt
    _speech(score, rng, _speaker(rng), style)
    return style.roughness, style.level_db


def _language_clip(score: _Score, rng: np.random.Generator, label: str) -> tuple[float, float]:
    style = _varied(_LANGUAGES[label], rng)
    score.tilt = style.tilt
    _speech(score, rng, _speaker(rng), style)
    return style.roughness, style.level_db


# -- animals -------------------------------------------------------------------------------------------------------
# Each animal repeats its call until the clip is full. `f` is the animal's own pitch and `fmt(...)` scales formants
# by its size; both are drawn per clip. A call function writes one call (or group) at `t` and returns its end.


def _calls(
    score: _Score, rng: np.random.Generator, call: Callable[[float], float], gap: tuple[float, float]
) -> None:
    """Repeat `call(t) -> end` from a random start until the clip is full, with random gaps."""
    t = rng.uniform(0.02, 0.3)
    while t < score.seconds - 0.1:
        t = call(t) + rng.uniform(*gap)


_Formants = Callable[..., np.ndarray]


def _dog(score: _Score, rng: np.random.Generator, fmt: _Formants) -> tuple[float, float]:
    """Groups of short, noisy barks that jump up in pitch and fall."""
    f, u = 550 * np.exp(rng.normal(0, 0.15)), rng.uniform

    def barks(t: float) -> float:
        for _ in range(rng.integers(1, 4)):
            d = u(0.08, 0.18)
            score.tone(t, t + d, [0.9 * f, 1.15 * f, 0.7 * f], fmt(650, 1500, 2600, 3600), u(0.7, 1),
                       bandwidths=(200, 250, 300, 400), attack=0.005, release=0.04, breath=0.8)  # fmt: skip
            t += d + u(0.08, 0.2)
        return t

    _calls(score, rng, barks, (0.2, 0.7))
    return -6.0, 0.5


def _cat(score: _Score, rng: np.random.Generator, fmt: _Formants) -> tuple[float, float]:
    """Long tonal meows: pitch arches, formants glide i -> a -> u."""
    f, u = 620 * np.exp(rng.normal(0, 0.12)), rng.uniform

    def meow(t: float) -> float:
        d = u(0.45, 1.0)
        glide = [fmt(400, 2100, 3000, 4000), fmt(900, 1500, 2800, 4000), fmt(600, 1100, 2700, 3900)]
        score.tone(t, t + d, [0.85 * f, 1.15 * f, 1.05 * f, 0.7 * f], glide, breath=0.1, release=0.1)
        return t + d

    _calls(score, rng, meow, (0.3, 1.0))
    return -7.0, 0.1


def _pig(score: _Score, rng: np.random.Generator, fmt: _Formants) -> tuple[float, float]:
    """Low, rough, nasal grunts in quick succession, pulsing at 35-55 Hz."""
    f, u = 130 * np.exp(rng.normal(0, 0.15)), rng.uniform

    def grunt(t: float) -> float:
        d = u(0.12, 0.3)
        score.tone(t, t + d, [f, 0.85 * f], fmt(350, 1000, 2300, 3300), am=(u(35, 55), 0.7), breath=0.6)
        return t + d

    _calls(score, rng, grunt, (0.08, 0.35))
    return -8.0, 0.9


def _cow(score: _Score, rng: np.random.Generator, fmt: _Formants) -> tuple[float, float]:
    """Long, low moos with a slow pitch arch and opening formants (m -> oo -> o), dark spectrum."""
    f, u = 140 * np.exp(rng.normal(0, 0.12)), rng.uniform

    def moo(t: float) -> float:
        d = u(0.8, 2.2)
        glide = [fmt(300, 800, 2300, 3300), fmt(600, 1000, 2400, 3400), fmt(450, 900, 2300, 3300)]
        score.tone(t, t + d, [0.9 * f, 1.1 * f, f, 0.8 * f], glide, breath=0.2, attack=0.1, release=0.2)
        return t + d

    _calls(score, rng, moo, (0.3, 0.8))
    return -11.0, 0.3


def _frog(score: _Score, rng: np.random.Generator, fmt: _Formants) -> tuple[float, float]:
    """Croaks: trains of pulses at 14-30 Hz on a mid-pitched carrier."""
    f, u = 300 * np.exp(rng.normal(0, 0.15)), rng.uniform
    pulse_rate = u(14, 30)

    def croak(t: float) -> float:
        d = u(0.25, 0.7)
        score.tone(t, t + d, [f, 0.95 * f], fmt(900, 1600, 2700, 3700), am=(pulse_rate, 0.95), breath=0.3)
        return t + d

    _calls(score, rng, croak, (0.15, 0.5))
    return -5.0, 0.4


def _hen(score: _Score, rng: np.random.Generator, fmt: _Formants) -> tuple[float, float]:
    """Short, bright clucks at irregular intervals, now and then a longer rising 'bawk'."""
    f, u = 380 * np.exp(rng.normal(0, 0.12)), rng.uniform

    def cluck(t: float) -> float:
        long = rng.random() < 0.15
        d = u(0.25, 0.4) if long else u(0.04, 0.09)
        pitch = [f, 1.4 * f, 1.2 * f] if long else [1.1 * f, 0.9 * f]
        score.tone(t, t + d, pitch, fmt(900, 2300, 3300, 4200), attack=0.003, release=0.02, breath=0.4)
        return t + d

    _calls(score, rng, cluck, (0.12, 0.45))
    return -5.0, 0.3


def _rooster(score: _Score, rng: np.random.Generator, fmt: _Formants) -> tuple[float, float]:
    """A harsh four-part crow (cock-a-doodle-doo): three short rising parts and a long held one."""
    f, u = 560 * np.exp(rng.normal(0, 0.1)), rng.uniform

    def crow(t: float) -> float:
        parts = [
            (u(0.1, 0.16), [0.8 * f, f]),
            (u(0.1, 0.16), [f, 0.95 * f]),
            (u(0.14, 0.22), [1.05 * f, 1.2 * f]),
            (u(0.5, 0.9), [1.2 * f, 1.25 * f, 0.8 * f]),
        ]
        for d, pitch in parts:
            score.tone(t, t + d, pitch, fmt(750, 1800, 3000, 4000), breath=0.9, release=0.02)
            t += d + 0.03
        return t

    _calls(score, rng, crow, (0.4, 1.0))
    return -5.0, 0.8


def _sheep(score: _Score, rng: np.random.Generator, fmt: _Formants) -> tuple[float, float]:
    """Bleats: an 'baa' vowel with a deep 14-24 Hz tremolo and vibrato."""
    f, u = 270 * np.exp(rng.normal(0, 0.15)), rng.uniform
    bleat_rate = u(14, 24)

    def baa(t: float) -> float:
        d = u(0.45, 1.0)
        glide = [fmt(500, 1500, 2600, 3600), fmt(850, 1550, 2650, 3700)]
        score.tone(t, t + d, [f, 1.05 * f, 0.9 * f], glide, am=(bleat_rate, 0.6), vibrato=(bleat_rate, 0.6),
                   breath=0.4)  # fmt: skip
        return t + d

    _calls(score, rng, baa, (0.3, 0.9))
    return -7.0, 0.3


def _crow(score: _Score, rng: np.random.Generator, fmt: _Formants) -> tuple[float, float]:
    """Groups of two to four harsh, noisy caws with wide formants."""
    f, u = 550 * np.exp(rng.normal(0, 0.15)), rng.uniform

    def caws(t: float) -> float:
        for _ in range(rng.integers(2, 5)):
            d = u(0.22, 0.45)
            score.tone(t, t + d, [0.95 * f, 1.05 * f, 0.85 * f], fmt(1000, 1700, 2800, 3800),
                       bandwidths=(300, 350, 400, 500), breath=1.2)  # fmt: skip
            t += d + u(0.15, 0.4)
        return t

    _calls(score, rng, caws, (0.4, 1.0))
    return -4.0, 1.0


_ANIMALS = {
    "dog": _dog, "cat": _cat, "pig": _pig, "cow": _cow, "frog": _frog, "hen": _hen, "rooster": _rooster,
    "sheep": _sheep, "crow": _crow,
}  # fmt: skip


def _animal_clip(score: _Score, rng: np.random.Generator, label: str) -> tuple[float, float]:
    size = np.exp(rng.normal(0, 0.06))  # the animal's vocal-tract factor
    tilt, roughness = _ANIMALS[label](score, rng, lambda *hz: np.asarray(hz) / size)
    score.tilt = tilt + rng.normal(0, 1.0)
    return roughness, 0.0


_CLIPS = {
    "animal": _animal_clip,
    "emotion": _emotion_clip,
    "gender": _gender_clip,
    "language": _language_clip,
}


# -- public API -----------------------------------------------------------------------------------------------------


def synthetic_clip(attribute: str, label: str, rng: np.random.Generator) -> Float[np.ndarray, " samples"]:
    """One synthetic clip of `label` in track `attribute`: 16 kHz mono float32, 1-5 s, drawn from `rng`."""
    track = get_track(attribute)
    canonical = track.canonical_label(label)
    if canonical is None:
        raise DataError(
            f"label {label!r} is not among the options of track {track.attribute!r} ({', '.join(track.labels)})"
        )
    score = _Score(rng.uniform(MIN_SECONDS, MAX_SECONDS), rng)
    roughness, level_db = _CLIPS[track.attribute](score, rng, canonical)
    return score.render(roughness, snr_db=rng.uniform(30, 45), level_db=-20 + level_db + rng.normal(0, 2.0))


def clip_rng(seed: int, attribute: str, label: str, index: int) -> np.random.Generator:
    """The generator for clip `index` of `label`: the same clip whatever else is generated beside it."""
    track = get_track(attribute)
    return np.random.default_rng([seed, ATTRIBUTES.index(track.attribute), track.labels.index(label), index])


def write_synthetic_sakura(
    root: str | Path,
    n_per_label: int,
    seed: int = 0,
    layout: str = "github",
    attributes: Iterable[str] | None = None,
) -> Path:
    """Write a synthetic SAKURA under `root` (16-bit PCM wav + metadata.csv per track) and return `root`.

    `layout="github"` writes `<Track>/audio/NNNN.wav` and a `file` column; `layout="audiofolder"` writes the wav
    files in the track folder and a `file_name` column. The metadata also carries SAKURA's single-question columns.
    """
    import soundfile as sf

    if layout not in ("github", "audiofolder"):
        raise DataError(f"unknown layout {layout!r}; choose 'github' or 'audiofolder'")
    root = Path(root)
    for attribute in attributes or ATTRIBUTES:
        track = get_track(attribute)
        folder = root / TRACK_FOLDERS[track.attribute]
        audio_dir = folder / "audio" if layout == "github" else folder
        audio_dir.mkdir(parents=True, exist_ok=True)
        question = track.prompt.split(" Possible options:")[0]
        choices = " ".join(f"({chr(97 + i)}) {label}" for i, label in enumerate(track.labels))
        rows = []
        for index in range(n_per_label):
            for k, label in enumerate(track.labels):
                name = f"{len(rows):04d}.wav"
                wave = synthetic_clip(track.attribute, label, clip_rng(seed, track.attribute, label, index))
                sf.write(audio_dir / name, wave, SAMPLING_RATE, subtype="PCM_16")
                rows.append(
                    {
                        "file_name" if layout == "audiofolder" else "file": name,
                        "attribute_label": label,
                        "single_instruction": f"{question} {choices}",
                        "single_answer": f"({chr(97 + k)}) {label}",
                        "multi_instruction": "",
                        "multi_answer": "",
                    }
                )
        with open(folder / "metadata.csv", "w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]) if rows else ["file", "attribute_label"])
            writer.writeheader()
            writer.writerows(rows)
    return root
