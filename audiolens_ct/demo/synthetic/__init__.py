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

One job per module: `engine` (the synthesiser), `speech` (speakers, sounds, speaking styles), `animals` (the
nine calls), `writer` (a clip by track and label, and the SAKURA writer).
"""

from audiolens_ct.demo.synthetic.engine import SAMPLING_RATE
from audiolens_ct.demo.synthetic.writer import (
    MAX_SECONDS,
    MIN_SECONDS,
    clip_rng,
    synthetic_clip,
    write_synthetic_sakura,
)

__all__ = ["MAX_SECONDS", "MIN_SECONDS", "SAMPLING_RATE", "clip_rng", "synthetic_clip", "write_synthetic_sakura"]
