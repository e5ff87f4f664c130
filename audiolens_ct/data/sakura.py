"""SAKURA (Interspeech 2025) as the paper uses it: its audio and labels, asked in the AudioLens prompt format.

Three forms of the same data are read:

- the GitHub layout: `<root>/<Track>/audio/*.wav` and `<root>/<Track>/metadata.csv` with a `file` column
  (`<root>` may also be the repository, holding `data/<Track>`);
- the Hugging Face "audiofolder" layout AudioLens uses: `<root>/<Track>/metadata.csv` with a `file_name` column
  and the wav files in the track folder;
- a `datasets.Dataset` with an `audio` column (`load_sakura_hf`), e.g. `SLLM-multi-hop/GenderQA`.

Track folders are `Animal`, `Emotion`, `Gender`, `Language`; the label is the `attribute_label` column, matched to the
track's options ignoring surrounding spaces and case. SAKURA's own multiple-choice questions are not used. Sample
ids are `<Track>/<file>` (the file relative to the track's audio folder), the same in both on-disk layouts.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from audiolens_ct.audio import decode
from audiolens_ct.data.manifest import read_utf8
from audiolens_ct.data.prompts import ATTRIBUTES, Track, get_track
from audiolens_ct.data.sample import Sample, make_sample
from audiolens_ct.errors import AudioLoadError, DataError

TRACK_FOLDERS = {"animal": "Animal", "emotion": "Emotion", "gender": "Gender", "language": "Language"}
LABEL_COLUMN = "attribute_label"


def load_sakura(
    root: str | Path, attributes: Iterable[str] | str | None = None, limit: int | None = None
) -> list[Sample]:
    """Read SAKURA tracks from disk (GitHub or audiofolder layout, told apart per track by the metadata columns).

    Args:
        root: the folder holding the track folders, or the SAKURA repository (holding `data/`).
        attributes: the tracks to read ("gender", ...); None reads every track folder present.
        limit: at most this many samples per track, in metadata order.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: SAKURA folder not found")
    base = root
    if not any((root / folder).is_dir() for folder in TRACK_FOLDERS.values()) and (root / "data").is_dir():
        base = root / "data"
    if attributes is None:
        wanted = [a for a in ATTRIBUTES if (base / TRACK_FOLDERS[a]).is_dir()]
        if not wanted:
            raise DataError(
                f"{root}: holds none of the SAKURA track folders {', '.join(TRACK_FOLDERS.values())}; for clips of "
                "your own, list them in a CSV or JSON Lines manifest (columns audio, attribute, label) and pass "
                "--manifest FILE (Python: load_manifest)"
            )
    else:
        wanted = [
            get_track(a).attribute for a in ([attributes] if isinstance(attributes, str) else attributes)
        ]
    samples: list[Sample] = []
    for attribute in wanted:
        samples += _read_track(base / TRACK_FOLDERS[attribute], get_track(attribute), limit)
    return samples


def _read_track(folder: Path, track: Track, limit: int | None) -> list[Sample]:
    if not folder.is_dir():
        raise DataError(f"{folder}: track folder not found")
    meta = folder / "metadata.csv"
    if not meta.is_file():
        raise DataError(
            f"{meta}: metadata file not found (both SAKURA layouts keep one in each track folder)"
        )
    with io.StringIO(read_utf8(meta), newline="") as handle:
        reader = csv.DictReader(handle)
        columns = reader.fieldnames or []
        if "file_name" in columns:
            file_column, audio_dir = "file_name", folder
        elif "file" in columns:
            file_column, audio_dir = "file", folder / "audio"
        else:
            raise DataError(
                f"{meta}: no 'file' (GitHub layout) or 'file_name' (audiofolder layout) column; columns: {columns}"
            )
        if LABEL_COLUMN not in columns:
            raise DataError(f"{meta}: no {LABEL_COLUMN!r} column; columns: {columns}")
        samples = []
        for row in reader:
            if limit is not None and len(samples) >= limit:
                break
            name, label = row.get(file_column), row.get(LABEL_COLUMN)
            if not name or label is None or None in row:
                raise DataError(f"{meta}:{reader.line_num}: malformed row {row}")
            name = _relative_to_audio_dir(name, folder.name)
            samples.append(make_sample(track, f"{folder.name}/{name}", label, audio_path=audio_dir / name))
    return samples


def _relative_to_audio_dir(name: str, folder: str) -> str:
    """Accept "x.wav", "audio/x.wav" and "data/<Track>/audio/x.wav" for the same file."""
    parts = Path(name.strip()).parts
    for prefix in (("data", folder, "audio"), ("audio",)):
        if parts[: len(prefix)] == prefix:
            parts = parts[len(prefix) :]
    return Path(*parts).as_posix()


def load_sakura_hf(dataset: Any, attribute: str, limit: int | None = None) -> list[Sample]:
    """Read one SAKURA track from a Hugging Face `datasets` dataset, e.g.
    `load_sakura_hf(datasets.load_dataset("SLLM-multi-hop/GenderQA", split="test"), "gender")`.

    The `audio` column may hold decoded dicts (`array`, `sampling_rate`), undecoded ones (`bytes` / `path`) or
    paths; an `Audio` feature is read undecoded and decoded here with soundfile. The label is `attribute_label`
    (or `label`, names of a `ClassLabel` included). A `DatasetDict` with one split, or a `test` split, is accepted.
    Undecodable audio bytes are recorded in the sample's `error`.
    """
    import datasets

    track = get_track(attribute)
    name = f"the {track.attribute} dataset"
    if isinstance(dataset, datasets.DatasetDict):
        splits = list(dataset)
        if len(splits) != 1 and "test" not in splits:
            raise DataError(f"{name} has splits {splits}; pass one of them (SAKURA's copies have 'test')")
        dataset = dataset[splits[0] if len(splits) == 1 else "test"]
    columns = dataset.column_names
    if "audio" not in columns:
        raise DataError(f"{name} has no 'audio' column; columns: {columns}")
    label_column = next((c for c in (LABEL_COLUMN, "label") if c in columns), None)
    if label_column is None:
        raise DataError(f"{name} has no {LABEL_COLUMN!r} or 'label' column; columns: {columns}")
    feature = dataset.features["audio"]
    if isinstance(feature, datasets.Audio) and feature.decode:
        dataset = dataset.cast_column("audio", datasets.Audio(decode=False))
    label_feature = dataset.features[label_column]
    if limit is not None:
        dataset = dataset.select(range(min(limit, len(dataset))))
    folder = TRACK_FOLDERS[track.attribute]
    samples = []
    for index, row in enumerate(dataset):
        label = row[label_column]
        if isinstance(label_feature, datasets.ClassLabel):
            label = label_feature.int2str(label)
        path, wave, rate, error = _audio_cell(row["audio"])
        file = row.get("file") or row.get("file_name") or (path.name if path is not None else None)
        sample_id = f"{folder}/{_relative_to_audio_dir(file, folder)}" if file else f"{folder}/{index}"
        samples.append(
            make_sample(
                track, sample_id, label, audio_path=path, waveform=wave, waveform_rate=rate, error=error
            )
        )
    return samples


def _audio_cell(cell: Any) -> tuple[Path | None, np.ndarray | None, int | None, str | None]:
    """(path, waveform, rate, error) from one `audio` value of a `datasets` row."""
    if isinstance(cell, (str, Path)):
        return Path(cell), None, None, None
    if not isinstance(cell, dict):  # a decoder object (datasets with torchcodec) answers like a dict
        return None, np.asarray(cell["array"], dtype=np.float32), int(cell["sampling_rate"]), None
    path = Path(cell["path"]) if cell.get("path") else None
    if cell.get("array") is not None:
        return path, np.asarray(cell["array"], dtype=np.float32), int(cell["sampling_rate"]), None
    if cell.get("bytes"):
        try:
            wave, rate = decode(cell["bytes"], name=str(path or "audio bytes"))
        except AudioLoadError as exc:
            return path, None, None, str(exc)
        return path, wave, rate, None
    if path is None:
        return None, None, None, "the audio cell holds no array, bytes or path"
    return path, None, None, None
