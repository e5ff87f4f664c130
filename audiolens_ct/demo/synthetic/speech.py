"""Speech: speakers, vowels and consonants, and the speaking styles that carry the gender, emotion and language.

A clip is phrases of syllables (optional onset consonant, vowel, optional coda) written into a `Score` by one
speaker in one style. The speaker sets the pitch and the vocal-tract length (formant scaling): that is the gender.
The style sets everything else: vowel inventory and articulatory setting (formant shifts), consonants, syllable
rate and timing regularity, the pitch pattern (tones, pitch accent, final rise...) and voice quality (tilt, breath,
roughness, tremor, level). Each language has a style; each emotion changes the neutral style.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from audiolens_ct.demo.synthetic.engine import Score


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

_NEUTRAL = _Style(vowels=_NEUTRAL_VOWELS, onsets=_NEUTRAL_ONSETS, codas={"s": 1, "n": 1, "t": 1})

# each language's sounds, and what else it changes in the neutral style (the `_Style` defaults)
_LANGUAGES = {
    "English": _Style(
        vowels={"schwa": 3, "ih": 2, "ae": 2, "ah": 1.5, "eh": 1, "uh": 0.7},
        onsets={"s": 2, "t": 1.5, "k": 1, "p": 1, "h": 1, "m": 1, "n": 1, "l": 1, "f": 1},
        codas={"s": 2, "t": 1.5, "n": 1.5, "k": 0.5},
        coda_prob=0.5, rate=4.8, rate_cv=0.45, pitch_range=4.0,
        shift=(1.0, 1.0, 0.82),
    ),
    "German": _Style(
        vowels={"y": 1.5, "oe": 1.5, "a": 1, "e": 1, "u": 1, "schwa": 1},
        onsets={"sh": 2, "x": 1.5, "ts": 1.5, "t": 1, "k": 1, "r_uvular": 1, "f": 1, "m": 0.5, "n": 0.5},
        codas={"x": 2, "t": 1.5, "s": 1, "n": 1},
        coda_prob=0.6, rate=4.4, rate_cv=0.4,
        shift=(0.88, 1.0, 1.08), tilt=-6.5,
    ),
    "Spanish": _Style(
        vowels={"a": 3, "e": 2.5, "o": 2, "i": 1},
        onsets={"s": 2, "t": 1, "k": 1, "p": 1, "r_trill": 1, "r_tap": 1, "m": 1, "n": 1, "l": 1},
        codas={"s": 2, "n": 1},
        rate=7.0, rate_cv=0.15,
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
        coda_prob=0.35, rate_cv=0.2, pitch="tones", pitch_range=8.0,
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


def _consonant(score: Score, t: float, name: str, speaker: _Speaker, f0: float, breath: float) -> float:
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


def _speech(score: Score, rng: np.random.Generator, speaker: _Speaker, style: _Style) -> None:
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


def _talk(score: Score, rng: np.random.Generator, style: _Style, sex: str | None = None) -> tuple[float, float]:
    """Fill `score` with one speaker (of `sex`, or either) talking in `style`; returns (roughness, level dB)."""
    score.tilt = style.tilt
    _speech(score, rng, _speaker(rng, sex), style)
    return style.roughness, style.level_db


def gender_clip(score: Score, rng: np.random.Generator, label: str) -> tuple[float, float]:
    """A neutral voice of speaker sex `label`: pitch and vocal-tract length carry the class."""
    return _talk(score, rng, _varied(_NEUTRAL, rng), sex=label)


def emotion_clip(score: Score, rng: np.random.Generator, label: str) -> tuple[float, float]:
    """Any speaker in the neutral style changed by emotion `label` (prosody and voice quality)."""
    return _talk(score, rng, _varied(_NEUTRAL, rng, **_EMOTIONS[label]))


def language_clip(score: Score, rng: np.random.Generator, label: str) -> tuple[float, float]:
    """Any speaker in the style of language `label`."""
    return _talk(score, rng, _varied(_LANGUAGES[label], rng))
