"""A researcher's own clips, listed in a CSV or JSON Lines manifest.

One row per clip. Columns (CSV header or JSON keys):

- `audio` (or `audio_path`): the audio file, relative to the manifest's folder or absolute;
- `attribute`: the track; one of the paper's four, or any name when `prompt`, `options` and `response_prefix` are
  all given;
- `label`: the correct option;
- optional `id` (default: the `audio` value as written), `prompt`, `options` (a list in JSONL; in CSV one string
  separated by "|", or by "," when it holds no "|"), `response_prefix`, `object_text` (the option list as written in
  the prompt, when it is not `", ".join(options)`). What is left out comes from the attribute's `Track`.

A manifest that cannot be read (bad JSON, a missing column, an inconsistent prompt, a repeated id) raises
`DataError` naming the file and line. A missing audio file or a label outside the options is recorded in that
sample's `error`, so a sweep can report it and go on.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from audiolens_ct.data.prompts import make_track
from audiolens_ct.data.sample import Sample, make_sample
from audiolens_ct.errors import DataError

AUDIO_COLUMNS = ("audio", "audio_path")


def load_manifest(path: str | Path) -> list[Sample]:
    """Read a `.csv` or `.jsonl` manifest into samples (see the module docstring for the columns)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: manifest not found")
    suffix = path.suffix.lower()
    if suffix == ".csv":
        rows = _csv_rows(path)
    elif suffix in (".jsonl", ".ndjson"):
        rows = _jsonl_rows(path)
    else:
        raise DataError(f"{path}: a manifest must be .csv or .jsonl, not {suffix or 'a file without suffix'}")
    samples: list[Sample] = []
    first_line: dict[str, int] = {}
    for line, row in rows:
        sample = _sample(row, path, line)
        if sample.id in first_line:
            raise DataError(f"{path}:{line}: id {sample.id!r} repeats line {first_line[sample.id]}")
        first_line[sample.id] = line
        samples.append(sample)
    if not samples:
        raise DataError(f"{path}: the manifest lists no samples")
    return samples


def read_utf8(path: Path) -> str:
    """The text of a UTF-8 file (a byte-order mark is dropped); other encodings are refused with the byte offset
    of the first byte that is not UTF-8, rather than guessed."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataError(
            f"{path}: not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start}); save it as UTF-8, e.g. "
            f"iconv -f latin1 -t utf-8 {path.name} > utf8-{path.name}"
        ) from None


def _csv_rows(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    with io.StringIO(read_utf8(path), newline="") as handle:
        reader = csv.DictReader(handle)
        try:
            for row in reader:
                if None in row:
                    raise DataError(f"{path}:{reader.line_num}: more fields than the header has columns")
                if any(value is None for value in row.values()):
                    raise DataError(f"{path}:{reader.line_num}: fewer fields than the header has columns")
                row = {key.strip(): value for key, value in row.items()}
                options = (row.get("options") or "").strip()
                row["options"] = _split_options(options) if options else None
                yield reader.line_num, row
        except csv.Error as exc:
            raise DataError(f"{path}:{reader.line_num}: not valid CSV ({exc})") from exc


def _split_options(text: str) -> list[str]:
    separator = "|" if "|" in text else ","
    return [option.strip() for option in text.split(separator)]


def _jsonl_rows(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    for line, text in enumerate(read_utf8(path).split("\n"), start=1):
        if not text.strip():
            continue
        try:
            row = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{line}: not valid JSON ({exc.msg})") from exc
        if not isinstance(row, dict):
            raise DataError(f"{path}:{line}: expected a JSON object, got {type(row).__name__}")
        options = row.get("options")
        if options is not None and not (
            isinstance(options, list) and all(isinstance(option, str) for option in options)
        ):
            raise DataError(f"{path}:{line}: 'options' must be a list of strings, got {options!r}")
        yield line, row


def _sample(row: dict[str, Any], path: Path, line: int) -> Sample:
    where = f"{path}:{line}"
    audio = next((row[c] for c in AUDIO_COLUMNS if row.get(c) not in (None, "")), None)
    for column, value in (("audio", audio), ("attribute", row.get("attribute")), ("label", row.get("label"))):
        if value is None or not str(value).strip():
            raise DataError(f"{where}: no value in column {column!r}")
    custom = {
        c: row[c]
        for c in ("prompt", "options", "response_prefix", "object_text")
        if row.get(c) not in (None, "")
    }
    try:
        track = make_track(
            str(row["attribute"]).strip(),
            prompt=custom.get("prompt"),
            labels=custom.get("options"),
            response_prefix=custom.get("response_prefix"),
            object_text=custom.get("object_text"),
        )
    except DataError as exc:
        raise DataError(f"{where}: {exc}") from exc
    audio_path = Path(str(audio).strip())
    if not audio_path.is_absolute():
        audio_path = path.parent / audio_path
    sample_id = str(row.get("id") or "").strip() or str(audio).strip()
    return make_sample(track, sample_id, str(row["label"]), audio_path=audio_path)
