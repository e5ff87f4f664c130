"""Animals: nine calls, each told apart by its pattern (pitch, duration, rhythm, formants, noise, modulation).

An animal repeats its call, with random gaps, until the clip is full. Each clip draws its own animal: a pitch
around the species' typical one and a body size that scales every formant. A call function writes one call (or
one group of notes) at `t` through a `_Voice` and returns where it ends; the `_SPECIES` table holds what differs
between species besides the call: typical pitch, gaps, spectral tilt and roughness.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np

from audiolens_ct.demo.synthetic.engine import Score


@dataclass(frozen=True)
class _Voice:
    """One clip's animal: its pitch `f` (Hz), its size (formants are divided by it) and its random draws."""

    score: Score
    rng: np.random.Generator
    f: float
    size: float
    rate: float | None  # the clip's modulation rate (Hz), for species whose calls pulse at one rate

    def u(self, low: float, high: float) -> float:
        """A uniform draw from [low, high)."""
        return self.rng.uniform(low, high)

    def note(
        self, t: float, seconds: float, pitch: Iterable[float], formants: Iterable[float] | Iterable[Iterable[float]],
        amp: float = 1.0, **tone: object,
    ) -> float:
        """A voiced note of `seconds` at `t`; returns where it ends.

        `pitch` anchors are multiples of the animal's pitch; `formants` (Hz, for an animal of typical size) is one
        set of four or a list of sets to glide through. `tone` goes to `Score.tone` (bandwidths, envelope, breath,
        modulation).
        """
        hz = [m * self.f for m in pitch]
        self.score.tone(t, t + seconds, hz, np.asarray(formants) / self.size, amp, **tone)
        return t + seconds


def _barks(v: _Voice, t: float) -> float:
    """One to three short, noisy barks that jump up in pitch and fall."""
    for _ in range(v.rng.integers(1, 4)):
        d = v.u(0.08, 0.18)
        v.note(t, d, (0.9, 1.15, 0.7), (650, 1500, 2600, 3600), v.u(0.7, 1),
               bandwidths=(200, 250, 300, 400), attack=0.005, release=0.04, breath=0.8)  # fmt: skip
        t += d + v.u(0.08, 0.2)
    return t


def _meow(v: _Voice, t: float) -> float:
    """A long tonal meow: pitch arches, formants glide i -> a -> u."""
    glide = [(400, 2100, 3000, 4000), (900, 1500, 2800, 4000), (600, 1100, 2700, 3900)]
    return v.note(t, v.u(0.45, 1.0), (0.85, 1.15, 1.05, 0.7), glide, breath=0.1, release=0.1)


def _grunt(v: _Voice, t: float) -> float:
    """A low, rough, nasal grunt pulsing at 35-55 Hz."""
    d = v.u(0.12, 0.3)
    return v.note(t, d, (1, 0.85), (350, 1000, 2300, 3300), am=(v.u(35, 55), 0.7), breath=0.6)


def _moo(v: _Voice, t: float) -> float:
    """A long, low moo with a slow pitch arch and opening formants (m -> oo -> o)."""
    glide = [(300, 800, 2300, 3300), (600, 1000, 2400, 3400), (450, 900, 2300, 3300)]
    return v.note(t, v.u(0.8, 2.2), (0.9, 1.1, 1, 0.8), glide, breath=0.2, attack=0.1, release=0.2)


def _croak(v: _Voice, t: float) -> float:
    """A croak: a train of pulses at the clip's rate on a mid-pitched carrier."""
    return v.note(t, v.u(0.25, 0.7), (1, 0.95), (900, 1600, 2700, 3700), am=(v.rate, 0.95), breath=0.3)


def _cluck(v: _Voice, t: float) -> float:
    """A short, bright cluck, now and then a longer rising 'bawk'."""
    long = v.rng.random() < 0.15
    d = v.u(0.25, 0.4) if long else v.u(0.04, 0.09)
    pitch = (1, 1.4, 1.2) if long else (1.1, 0.9)
    return v.note(t, d, pitch, (900, 2300, 3300, 4200), attack=0.003, release=0.02, breath=0.4)


def _cock_a_doodle_doo(v: _Voice, t: float) -> float:
    """A harsh four-part crow: three short rising parts and a long held one."""
    parts = [
        (v.u(0.1, 0.16), (0.8, 1)),
        (v.u(0.1, 0.16), (1, 0.95)),
        (v.u(0.14, 0.22), (1.05, 1.2)),
        (v.u(0.5, 0.9), (1.2, 1.25, 0.8)),
    ]
    for d, pitch in parts:
        v.note(t, d, pitch, (750, 1800, 3000, 4000), breath=0.9, release=0.02)
        t += d + 0.03
    return t


def _baa(v: _Voice, t: float) -> float:
    """A bleat: a 'baa' vowel with a deep tremolo and vibrato at the clip's rate."""
    glide = [(500, 1500, 2600, 3600), (850, 1550, 2650, 3700)]
    return v.note(t, v.u(0.45, 1.0), (1, 1.05, 0.9), glide, am=(v.rate, 0.6), vibrato=(v.rate, 0.6), breath=0.4)


def _caws(v: _Voice, t: float) -> float:
    """Two to four harsh, noisy caws with wide formants."""
    for _ in range(v.rng.integers(2, 5)):
        d = v.u(0.22, 0.45)
        v.note(t, d, (0.95, 1.05, 0.85), (1000, 1700, 2800, 3800), bandwidths=(300, 350, 400, 500), breath=1.2)
        t += d + v.u(0.15, 0.4)
    return t


@dataclass(frozen=True)
class _Species:
    """What one species' clips share: the call, and the numbers that place it."""

    call: Callable[[_Voice, float], float]
    pitch: float  # typical pitch (Hz)
    spread: float  # log-scale spread of the pitch across animals
    gap: tuple[float, float]  # seconds between calls
    tilt: float  # spectral tilt (dB per octave above 500 Hz)
    roughness: float  # pitch jitter and shimmer
    rate: tuple[float, float] | None = None  # range of the per-clip modulation rate (Hz)


_SPECIES = {
    "dog": _Species(_barks, 550, 0.15, (0.2, 0.7), tilt=-6.0, roughness=0.5),
    "cat": _Species(_meow, 620, 0.12, (0.3, 1.0), tilt=-7.0, roughness=0.1),
    "pig": _Species(_grunt, 130, 0.15, (0.08, 0.35), tilt=-8.0, roughness=0.9),
    "cow": _Species(_moo, 140, 0.12, (0.3, 0.8), tilt=-11.0, roughness=0.3),
    "frog": _Species(_croak, 300, 0.15, (0.15, 0.5), tilt=-5.0, roughness=0.4, rate=(14, 30)),
    "hen": _Species(_cluck, 380, 0.12, (0.12, 0.45), tilt=-5.0, roughness=0.3),
    "rooster": _Species(_cock_a_doodle_doo, 560, 0.1, (0.4, 1.0), tilt=-5.0, roughness=0.8),
    "sheep": _Species(_baa, 270, 0.15, (0.3, 0.9), tilt=-7.0, roughness=0.3, rate=(14, 24)),
    "crow": _Species(_caws, 550, 0.15, (0.4, 1.0), tilt=-4.0, roughness=1.0),
}
"""Each species by its label in the animal track."""


def animal_clip(score: Score, rng: np.random.Generator, label: str) -> tuple[float, float]:
    """Fill `score` with calls of animal `label`, from a random start; returns (roughness, level dB)."""
    species = _SPECIES[label]
    size = np.exp(rng.normal(0, 0.06))  # the animal's vocal-tract factor
    f = species.pitch * np.exp(rng.normal(0, species.spread))
    rate = rng.uniform(*species.rate) if species.rate else None
    voice = _Voice(score, rng, f, size, rate)
    t = rng.uniform(0.02, 0.3)
    while t < score.seconds - 0.1:
        t = species.call(voice, t) + rng.uniform(*species.gap)
    score.tilt = species.tilt + rng.normal(0, 1.0)
    return species.roughness, 0.0
