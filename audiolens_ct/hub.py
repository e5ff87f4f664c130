"""A checkpoint's files, from a local directory or a Hugging Face hub id: the one lookup every port uses.

A name that is an existing directory is read in place. A name that looks like a path (absolute, `./`, `~`, or not
exactly one `/`) but is not a directory is an error, so a mistyped local path is never sent to the hub. Anything
else is a hub id: the file comes from the hub cache (offline mode honoured) or is downloaded into it. Every failure
is a `CheckpointError` naming the checkpoint, the file and why the file was wanted.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from audiolens_ct.errors import CheckpointError


def local_directory(name_or_path: str) -> Path | None:
    """The local checkpoint directory `name_or_path` names, or None for a hub id."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    looks_local = path.is_absolute() or name_or_path.startswith((".", "~")) or name_or_path.count("/") != 1
    if looks_local or path.exists():
        raise CheckpointError(f"{name_or_path}: no such checkpoint directory")
    return None


def _from_hub(name_or_path: str, what: str, fetch: Callable[[], str]) -> Path:
    try:
        return Path(fetch())
    except Exception as exc:  # the hub raises many unrelated types; the message is what matters
        raise CheckpointError(
            f"{name_or_path}: not a local directory, and no {what} for it in the hub or its cache "
            f"({type(exc).__name__}: {exc})"
        ) from exc


def checkpoint_file(name_or_path: str, filename: str, why: str) -> Path:
    """`filename` of a local checkpoint directory or a hub repo; `why` says what the file is, for the error."""
    directory = local_directory(name_or_path)
    if directory is not None:
        found = directory / filename
        if not found.is_file():
            raise CheckpointError(f"{directory}: no {filename} in this directory ({why})")
        return found
    from huggingface_hub import hf_hub_download

    return _from_hub(name_or_path, f"{filename} ({why})", lambda: hf_hub_download(name_or_path, filename))


def optional_checkpoint_file(name_or_path: str, filename: str) -> Path | None:
    """`filename` of the checkpoint when it has one, else None (for files that only some releases ship)."""
    try:
        return checkpoint_file(name_or_path, filename, "optional")
    except CheckpointError:
        return None


def checkpoint_directory(name_or_path: str, patterns: Sequence[str], why: str) -> Path:
    """A local checkpoint directory, or the hub snapshot of the files matching `patterns` (for layouts whose
    file names are known only once the directory is listed, such as unindexed weight shards)."""
    directory = local_directory(name_or_path)
    if directory is not None:
        return directory
    from huggingface_hub import snapshot_download

    return _from_hub(
        name_or_path, f"{' / '.join(patterns)} ({why})",
        lambda: snapshot_download(name_or_path, allow_patterns=list(patterns)),
    )


def read_json(path: Path) -> dict[str, Any]:
    """A JSON file as a dict, or a `CheckpointError` naming the file."""
    try:
        return json.loads(Path(path).read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc})") from exc


def read_checkpoint_config(name_or_path: str) -> dict[str, Any]:
    """`config.json` of a local directory or a hub id, as a dict (the registry infers the port from it)."""
    return read_json(checkpoint_file(name_or_path, "config.json", "the model config; is this a saved checkpoint?"))
