"""Clips by track and label, each from its own seeded generator, and a synthetic SAKURA of them on disk."""

from __future__ import annotations

import csv
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from jaxtyping import Float

from audiolens_ct.data.prompts import ATTRIBUTES, get_track
from audiolens_ct.data.sakura import TRACK_FOLDERS
from audiolens_ct.demo.synthetic.animals import animal_clip
from audiolens_ct.demo.synthetic.engine import SAMPLING_RATE, Score
from audiolens_ct.demo.synthetic.speech import emotion_clip, gender_clip, language_clip
from audiolens_ct.errors import DataError

MIN_SECONDS, MAX_SECONDS = 1.0, 5.0
_CLIPS = {
    "animal": animal_clip,
    "emotion": emotion_clip,
    "gender": gender_clip,
    "language": language_clip,
}


def synthetic_clip(attribute: str, label: str, rng: np.random.Generator) -> Float[np.ndarray, " samples"]:
    """One synthetic clip of `label` in track `attribute`: 16 kHz mono float32, 1-5 s, drawn from `rng`."""
    track = get_track(attribute)
    canonical = track.canonical_label(label)
    if canonical is None:
        raise DataError(
            f"label {label!r} is not among the options of track {track.attribute!r} ({', '.join(track.labels)})"
        )
    score = Score(rng.uniform(MIN_SECONDS, MAX_SECONDS), rng)
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
