"""The on-disk form of a sweep: one record per sample, a run manifest, and resuming.

An output directory holds one model's sweep:

```
<out>/manifest.json                          settings, prompts, versions, every command that wrote here
<out>/records/<attribute>/<sample>.json      one finished sample: kept, excluded or error
<out>/aggregate.json, <out>/report.html      written from the records (aggregate.py, report.py)
```

One process writes to a directory at a time: a writer holds `<out>/.lock` (an operating-system lock, released
when its process ends, even by SIGKILL), and a second writer is refused at once, naming the first. Every file is
written to a temporary file in its own folder and moved into place with `os.replace`, so a crash (even SIGKILL)
leaves either the whole record or none. A sample with a record is finished; re-running the same
command skips it. The manifest's settings are checked on every run: a run with different settings (another
corruption, engine, prompt...) refuses to write into the directory instead of mixing results.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from audiolens_ct.errors import OutputDirError, RunLockedError, RunMismatchError

MANIFEST = "manifest.json"
RECORDS = "records"
LOCK = ".lock"
STATUSES = ("kept", "excluded", "error")
_HELD: dict[Path, int] = {}
"""Output directories whose lock this process holds, with the lock file's descriptor (the lock is re-entrant)."""


def atomic_write_text(path: Path, text: str) -> Path:
    """Write `text` to `path` through a temporary file in the same folder and `os.replace`: readers (and a
    resumed run) see the old file or the whole new one, never a part."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "x", encoding="utf-8") as file:
            file.write(text)
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def atomic_write_json(path: Path, data: Any) -> Path:
    """`atomic_write_text` of `data` as JSON; NaN and infinities are refused (a record must never hold them)."""
    return atomic_write_text(path, json.dumps(data, indent=1, allow_nan=False))


def _alive(pid: int) -> bool:
    """True when a process with this id runs on this machine."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def safe_name(name: str) -> str:
    """`name` with every run of characters other than letters, digits, ".", "_", "-" replaced by "_"."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._")[:80] or "unnamed"


def file_stem(name: str) -> str:
    """A file name for a sample id or attribute: `safe_name`, plus a hash so distinct ids never collide."""
    return f"{safe_name(name)}-{hashlib.sha1(name.encode()).hexdigest()[:10]}"


class RunStore:
    """Records and manifest of one output directory."""

    def __init__(self, out_dir: str | Path) -> None:
        self.root = Path(out_dir)

    # -- records ----------------------------------------------------------------------------------------------------
    def record_path(self, attribute: str, sample_id: str) -> Path:
        return self.root / RECORDS / file_stem(attribute) / f"{file_stem(sample_id)}.json"

    def read_record(self, attribute: str, sample_id: str) -> dict[str, Any] | None:
        """The finished record of a sample, or None when it has none (or an unreadable one, to be redone)."""
        path = self.record_path(attribute, sample_id)
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
            return None
        ok = isinstance(record, dict) and record.get("sample_id") == sample_id and record.get("status") in STATUSES
        return record if ok else None

    def write_record(self, record: dict[str, Any]) -> Path:
        """Store one finished sample (keys `sample_id`, `attribute`, `status` at least), atomically."""
        if record.get("status") not in STATUSES:
            raise ValueError(f"record status must be one of {STATUSES}, got {record.get('status')!r}")
        return atomic_write_json(self.record_path(record["attribute"], record["sample_id"]), record)

    def records(self) -> Iterator[dict[str, Any]]:
        """Every stored record, in no set order (`aggregate_records` sorts what it averages)."""
        for path in (self.root / RECORDS).glob("*/*.json"):
            yield json.loads(path.read_text(encoding="utf-8"))

    def remove_stale_temporaries(self) -> int:
        """Delete the temporary files killed runs left behind (those of live processes are kept); returns how
        many were deleted."""
        removed = 0
        for path in [*self.root.glob(".*.tmp"), *self.root.glob(f"{RECORDS}/*/.*.tmp")]:
            pid = path.name.rsplit(".", 2)[-2].split("-")[0]
            if not (pid.isdigit() and _alive(int(pid))):
                path.unlink(missing_ok=True)
                removed += 1
        return removed

    # -- lock -------------------------------------------------------------------------------------------------------
    @contextmanager
    def lock(self, command: str | None = None) -> Iterator[None]:
        """Hold the directory's writer lock; raise `RunLockedError` at once, naming the holder, if another process
        holds it. The lock dies with its process (even SIGKILL), so a killed run never blocks the next one. A
        directory this call created and nothing else wrote to is removed again on exit."""
        key = self.root.resolve()
        if key in _HELD:
            yield
            return
        if self.root.exists() and not self.root.is_dir():
            raise OutputDirError(f"{self.root}: exists and is not a directory; give an output folder")
        created = not self.root.exists()
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.root / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise OutputDirError(f"{self.root}: cannot write here ({exc.strerror}); choose another output folder") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 65536).decode("utf-8", errors="replace")
            os.close(fd)
            try:
                info = json.loads(holder)
            except json.JSONDecodeError:
                info = {}
            raise RunLockedError(
                f"{self.root} is being written by another audiolens-ct process (pid {info.get('pid', '?')}, since "
                f"{info.get('started', '?')}: {info.get('command') or '?'}); wait for it to end, or use another --out"
            ) from None
        os.ftruncate(fd, 0)
        started = datetime.now(UTC).isoformat(timespec="seconds")
        os.write(fd, json.dumps({"pid": os.getpid(), "started": started, "command": command}).encode())
        _HELD[key] = fd
        try:
            yield
        finally:
            del _HELD[key]
            if created and [p.name for p in self.root.iterdir()] == [LOCK]:
                (self.root / LOCK).unlink()
                self.root.rmdir()
            os.close(fd)  # releases the lock

    # -- manifest ---------------------------------------------------------------------------------------------------
    @property
    def manifest_path(self) -> Path:
        return self.root / MANIFEST

    def manifest(self) -> dict[str, Any] | None:
        """The run manifest, or None for a directory no sweep has written to."""
        if not self.manifest_path.is_file():
            return None
        try:
            return json.loads(self.manifest_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise RunMismatchError(f"{self.manifest_path}: not valid JSON ({exc}); remove it or use another --out") from exc

    def check(
        self, settings: dict[str, Any], prompts: dict[str, Any] | None = None, versions: dict[str, str] | None = None,
        accept_versions: bool = False,
    ) -> None:
        """Refuse (`RunMismatchError`) if the recorded run differs in any setting given here, or in the prompts
        of an attribute both runs share, or (unless `accept_versions`) in the library versions that produced it.
        A directory without a manifest passes."""
        recorded = self.manifest()
        if recorded is None:
            if (self.root / RECORDS).is_dir() and any((self.root / RECORDS).iterdir()):
                raise RunMismatchError(f"{self.root}: holds records but no {MANIFEST}; use another output directory")
            return
        old = recorded.get("settings", {})
        diffs = [f"{key}: {old.get(key)!r} here, {value!r} asked" for key, value in settings.items() if old.get(key) != value]
        old_prompts = recorded.get("prompts", {})
        for attribute, variants in (prompts or {}).items():
            if attribute in old_prompts and old_prompts[attribute] != variants:
                diffs.append(f"prompts of {attribute!r}: {old_prompts[attribute]!r} here, {variants!r} asked")
        if diffs:
            raise RunMismatchError(
                f"{self.root} holds a run with other settings ({'; '.join(diffs)}); re-run with the recorded "
                "settings to resume it, or write to another output directory"
            )
        old_versions = recorded.get("versions", {})
        changed = [f"{name} {old_versions.get(name, 'unknown')} -> {version}" for name, version in (versions or {}).items()
                   if old_versions.get(name, "unknown") != version]  # fmt: skip
        if changed and not accept_versions:
            raise RunMismatchError(
                f"{self.root} was traced with other library versions ({', '.join(changed)}), so its records may not "
                "match what these versions compute; write to a new --out, or pass --accept-versions "
                "(Python: accept_versions=True) to resume it anyway"
            )

    def open(
        self, settings: dict[str, Any], prompts: dict[str, Any], versions: dict[str, str], command: str | None,
        accept_versions: bool = False, executor: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Start or resume the run: check the settings and versions, then record this invocation (with its
        versions, and the `executor` that traces it: its name and workers) in the manifest. The manifest's
        top-level `versions` stay those of the run that started it."""
        self.check(settings, prompts, versions, accept_versions)
        self.remove_stale_temporaries()
        manifest = self.manifest() or {"format": 1, "settings": settings, "prompts": {}, "versions": versions, "invocations": []}
        manifest["prompts"] = {**prompts, **manifest["prompts"]}
        invocation = {"command": command, "started": datetime.now(UTC).isoformat(timespec="seconds"), "versions": versions}
        manifest["invocations"].append(invocation if executor is None else {**invocation, "executor": executor})
        atomic_write_json(self.manifest_path, manifest)
        return manifest
