"""`run_experiment`: trace every clip of a data set with one model into an output directory, resumably.

The directory ends with `aggregate.json` (per-attribute means and 95% intervals, `aggregate.py`) beside the records.

Each sample ends as one record (`store.RunStore`): `kept` (RR maps), `excluded` (the paper's rule that dropped it),
or `error` (why it could not be traced: a label outside the options, a missing or unreadable audio file, ...). A
bad sample never stops the run and is never dropped silently. Re-running the same experiment skips every sample that
has a kept or excluded record (for the same label), so a killed run loses at most the sample it was tracing; error
records are redone (they cost nothing, and the data may have been fixed since).

With `corruption="swap"`, each clip's corrupted run hears another clip of the same attribute with a different
label (chosen by `seed` and the sample id, so the choice is stable across resumes), cut or zero-padded to the
clean clip's length so the number of audio rows matches; the record names the partner in `swap_with`.
"""

from __future__ import annotations

import random
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from tqdm.auto import tqdm

from audiolens_ct.aggregate import write_aggregate
from audiolens_ct.config import TraceConfig
from audiolens_ct.data.sample import Sample
from audiolens_ct.errors import SAMPLE_ERRORS, DataError, InputError
from audiolens_ct.store import RunStore
from audiolens_ct.tracing.audit import versions
from audiolens_ct.tracing.clip import trace
from audiolens_ct.tracing.scoring import answer_tokens

if TYPE_CHECKING:
    from audiolens_ct.model import HookedLALM
    from audiolens_ct.ports import Port


@dataclass
class ExperimentSummary:
    """The outcome of an experiment's samples (`resumed`: traced by an earlier run and skipped)."""

    out_dir: Path
    total: int
    kept: int
    excluded: int
    errors: int
    resumed: int


def run_settings(model_name: str, port: Port, dataset: Any, config: TraceConfig) -> dict[str, Any]:
    """The settings a run is identified by (recorded in its manifest, checked on resume): the model, the data
    source, and the options that change the numbers (`TraceConfig.settings`)."""
    return dict(model=model_name, port=port.name, dataset=dataset, **config.settings(port.reads_transcript))


def prompts_of(samples: Sequence[Sample]) -> dict[str, list[dict[str, Any]]]:
    """The question(s) asked per attribute, each distinct variant once, in order of appearance."""
    out: dict[str, list[dict[str, Any]]] = {}
    for s in samples:
        variant = dict(prompt=s.prompt, response_prefix=s.response_prefix, options=list(s.options), object_text=s.object_text)
        variants = out.setdefault(s.attribute, [])
        if variant not in variants:
            variants.append(variant)
    return out


def run_experiment(
    model: HookedLALM,
    samples: Sequence[Sample],
    out_dir: str | Path,
    config: TraceConfig | None = None,
    *,
    dataset: Any = None,
    command: str | None = None,
    progress: bool = True,
    accept_versions: bool = False,
    **overrides: Any,
) -> ExperimentSummary:
    """Trace every sample with `model` into `out_dir`, skipping samples already traced there.

    Args:
        samples: from `load_sakura`, `load_sakura_hf` or `load_manifest`; ids must be unique per attribute.
        config: the tracing options (`TraceConfig`; `overrides` replace fields of it). Each record keeps its
            audit; an `ExactnessError` stops the run, with every finished record kept. `config.long_audio`: a clip
            longer than the model's audio window (`Port.audio_window`) is traced as the model hears it, its first
            seconds ("truncate", one warning per run), recorded as an error ("skip"), or the whole run is refused
            before anything is written ("error"). Every record keeps the clip's `audio_source` (seconds, sample
            rate, channels) and `heard_seconds`.
        dataset: a JSON-ready description of the data source, kept in the manifest (and checked on resume).
        command: the command line, kept in the manifest.
        progress: show a tqdm bar (postfix: done, kept, excluded, errors). Each error is printed to stderr anyway.
        accept_versions: resume a directory traced with other versions of audiolens-ct, torch, transformers or
            transformer-lens (refused otherwise).

    Raises `RunMismatchError` when `out_dir` holds a run with other settings or (see `accept_versions`) other
    library versions, and `RunLockedError` when another process is writing to it.
    """
    config = TraceConfig.make(config, **overrides)
    settings = run_settings(model.model_name, model.port, dataset, config)
    settings["dtype"] = str(next(model.hf_model.parameters()).dtype).removeprefix("torch.")
    _check_unique(samples)
    too_long = longer_than_window(samples, model.port, config.long_audio)
    prompts = prompts_of(samples)
    for variants in prompts.values():
        for variant in variants:
            answer_tokens(model.tokenizer, variant["options"])  # a clash of option tokens fails here, once
    store = RunStore(out_dir)
    with store.lock(command):
        store.open(settings, prompts, versions(), command, accept_versions)

        counts = {"kept": 0, "excluded": 0, "error": 0}
        pending = []
        for sample in samples:
            record = store.read_record(sample.attribute, sample.id)
            if record is None or record["status"] == "error" or record["label"] != sample.label:
                pending.append(sample)
            else:
                counts[record["status"]] += 1
        resumed = len(samples) - len(pending)
        bar = tqdm(total=len(samples), initial=resumed, desc=f"tracing {Path(model.model_name).name}", unit="sample",
                   disable=not progress, dynamic_ncols=True)  # fmt: skip
        with bar:
            bar.set_postfix(_postfix(counts, resumed))
            if too_long and config.long_audio == "truncate":
                tqdm.write(
                    f"warning: {len(too_long)} clip(s) are longer than {model.port.name}'s "
                    f"{model.port.audio_window:g}-s audio window; the model hears only their first seconds, and so "
                    "does the trace (records: heard_seconds; --long-audio skip|error to change this)", file=sys.stderr,
                )  # fmt: skip
            for sample in pending:
                record = _trace_sample(model, sample, samples, config)
                store.write_record(record)
                counts[record["status"]] += 1
                if record["status"] == "error":
                    tqdm.write(f"error: {_where(sample, record['error'])}{record['error']}", file=sys.stderr)
                bar.set_postfix(_postfix(counts, bar.n + 1), refresh=False)
                bar.update(1)
        write_aggregate(out_dir)
    return ExperimentSummary(Path(out_dir), len(samples), counts["kept"], counts["excluded"], counts["error"], resumed)


def _where(sample: Sample, error: str) -> str:
    """The prefix of a sample's error line: its attribute, and its id unless the message starts with it."""
    return f"{sample.attribute}: " if error.startswith(sample.id) else f"{sample.attribute} {sample.id}: "


def _postfix(counts: dict[str, int], done: int) -> dict[str, int]:
    return {"done": done, "kept": counts["kept"], "excluded": counts["excluded"], "errors": counts["error"]}


def _check_unique(samples: Sequence[Sample]) -> None:
    seen: set[tuple[str, str]] = set()
    for s in samples:
        if (s.attribute, s.id) in seen:
            raise DataError(f"sample id {s.id!r} occurs twice in attribute {s.attribute!r}; ids must be unique")
        seen.add((s.attribute, s.id))


def longer_than_window(samples: Sequence[Sample], port: Port, long_audio: str) -> list[Sample]:
    """The traceable samples whose clip is longer than the port's audio window (read from the files' headers);
    with `long_audio="error"`, any such clip is refused here (`DataError`)."""
    if port.audio_window is None:
        return []
    found = [s for s in samples if s.ok and _beyond(s.source(), port.audio_window)]
    if found and long_audio == "error":
        raise DataError(
            f"{len(found)} clip(s) are longer than {port.name}'s {port.audio_window:g}-s audio window (first: "
            f"{found[0].attribute} {found[0].id}, {found[0].source()['seconds']:.1f} s); cut them, or pass "
            "--long-audio truncate (trace what the model hears) or skip"
        )
    return found


def _beyond(source: dict[str, Any] | None, window: float | None) -> bool:
    """Whether a clip (its `Sample.source()`) is longer than an audio window (None: no window)."""
    return source is not None and window is not None and source["seconds"] > window + 1e-9


def _trace_sample(model: HookedLALM, sample: Sample, samples: Sequence[Sample], config: TraceConfig) -> dict[str, Any]:
    """One sample's record; a data problem becomes an `error` record with its message."""
    source = sample.source() if sample.ok else None
    window = model.port.audio_window
    record: dict[str, Any] = dict(
        sample_id=sample.id, attribute=sample.attribute, label=sample.label,
        audio=str(sample.audio_path) if sample.audio_path is not None else None, audio_source=source,
        heard_seconds=None if source is None else min(source["seconds"], window or float("inf")),
        status="error", error=sample.error, swap_with=None, seconds=None, result=None,
    )  # fmt: skip
    if sample.error is not None:
        return record
    if config.long_audio == "skip" and _beyond(source, window):
        record["error"] = (f"the clip is {source['seconds']:.1f} s, longer than {model.port.name}'s {window:g}-s "
                           "audio window; skipped (--long-audio skip)")  # fmt: skip
        return record
    start = time.perf_counter()
    rate = model.port.sampling_rate
    try:
        wave = sample.load(rate)
        swap_audio = None
        if config.corruption == "swap":
            partner = swap_partner(sample, samples, config.seed)
            record["swap_with"] = partner.id
            swap_audio = _fit_length(partner.load(rate), len(wave))
        result = trace(
            model, wave, sample.prompt, sample.response_prefix, sample.label, sample.options, config, sampling_rate=rate, swap_audio=swap_audio, object_text=sample.object_text,
        )  # fmt: skip
    except SAMPLE_ERRORS as exc:
        record["error"] = str(exc)
        return record
    record.update(status="excluded" if result.excluded else "kept", seconds=round(time.perf_counter() - start, 3),
                  result=result.to_dict())  # fmt: skip
    return record


def swap_partner(sample: Sample, samples: Sequence[Sample], seed: int) -> Sample:
    """Another traceable clip of the same attribute with a different label, chosen by `seed` and the sample id."""
    candidates = sorted(
        (s for s in samples if s.attribute == sample.attribute and s.ok and s.label != sample.label), key=lambda s: s.id
    )
    if not candidates:
        raise InputError(f"sample {sample.id}: no clip of another label in attribute {sample.attribute!r} to swap in")
    return random.Random(f"{seed}:{sample.id}").choice(candidates)


def _fit_length(wave: np.ndarray, length: int) -> np.ndarray:
    """Cut or zero-pad `wave` to `length` samples."""
    return wave[:length] if len(wave) >= length else np.pad(wave, (0, length - len(wave)))
