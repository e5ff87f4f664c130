"""`run_experiment`: trace every clip of a data set with one model into an output directory, resumably.

The directory ends with `aggregate.json` (per-attribute means and 95% intervals, `aggregate.py`) beside the records.

Each sample ends as one record (`store.RunStore`): `kept` (RR maps), `excluded` (the paper's rule that dropped it),
or `error` (why it could not be traced: a label outside the options, a missing or unreadable audio file, ...). A
bad sample never stops the run and is never dropped silently. Re-running the same experiment skips every sample that
has a kept or excluded record (for the same label), so a killed run loses at most the sample it was tracing; error
records are redone (they cost nothing, and the data may have been fixed since).

This function is the driver: it alone writes the output directory, while an executor (`executors`) traces the
samples — in this process (the default), or on the workers of a Ray cluster — with the same `SampleTracer`, so
records and aggregate do not depend on where they were computed, and a run started on one resumes on the other.

With `corruption="swap"`, each clip's corrupted run hears another clip of the same attribute with a different
label (chosen by `seed` and the sample id, so the choice is stable across resumes), cut or zero-padded to the
clean clip's length so the number of audio rows matches; the record names the partner in `swap_with`.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tqdm.auto import tqdm

from audiolens_ct.aggregate import write_aggregate
from audiolens_ct.config import TraceConfig
from audiolens_ct.data.sample import Sample
from audiolens_ct.errors import DataError
from audiolens_ct.executors import Executor, ModelSpec, NoWorkers, Workers, make_executor
from audiolens_ct.sample_tracer import beyond_window
from audiolens_ct.store import RunStore
from audiolens_ct.tracing.audit import versions

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
    model: HookedLALM | ModelSpec,
    samples: Sequence[Sample],
    out_dir: str | Path,
    config: TraceConfig | None = None,
    *,
    executor: Executor | str | None = None,
    dataset: Any = None,
    command: str | None = None,
    progress: bool = True,
    accept_versions: bool = False,
    **overrides: Any,
) -> ExperimentSummary:
    """Trace every sample with `model` into `out_dir`, skipping samples already traced there.

    Args:
        model: a loaded `HookedLALM`, or a `ModelSpec` (what to load: the Ray executor's workers load it
            themselves, so the driver needs neither the weights nor a GPU).
        samples: from `load_sakura`, `load_sakura_hf` or `load_manifest`; ids must be unique per attribute.
        config: the tracing options (`TraceConfig`; `overrides` replace fields of it). Each record keeps its
            audit; an `ExactnessError` stops the run, with every finished record kept. `config.long_audio`: a clip
            longer than the model's audio window (`Port.audio_window`) is traced as the model hears it, its first
            seconds ("truncate", one warning per run), recorded as an error ("skip"), or the whole run is refused
            before anything is written ("error"). Every record keeps the clip's `audio_source` (seconds, sample
            rate, channels) and `heard_seconds`.
        executor: where the samples are traced: "local" (default: this process) or "ray" (a local Ray instance),
            or an executor such as `RayExecutor(address="auto", workers=8, gpus_per_worker=1)`
            (`audiolens_ct.executors`). It never changes the numbers; the manifest records it per invocation.
        dataset: a JSON-ready description of the data source, kept in the manifest (and checked on resume).
        command: the command line, kept in the manifest.
        progress: show a tqdm bar (postfix: done, kept, excluded, errors). Each error is printed to stderr anyway.
        accept_versions: resume a directory traced with other versions of audiolens-ct, torch, transformers or
            transformer-lens (refused otherwise).

    Raises `RunMismatchError` when `out_dir` holds a run with other settings or (see `accept_versions`) other
    library versions, `RunLockedError` when another process is writing to it, and `ExecutorError` when the
    executor's workers cannot be had (Ray not installed, a cluster too small, every worker dead).
    """
    config = TraceConfig.make(config, **overrides)
    executor = make_executor(executor)
    name, port = (model.name_or_path, model.resolve_port()) if isinstance(model, ModelSpec) else (model.model_name, model.port)
    settings = run_settings(name, port, dataset, config)
    _check_unique(samples)
    too_long = longer_than_window(samples, port, config.long_audio)
    prompts = prompts_of(samples)
    store = RunStore(out_dir)
    with store.lock(command):
        store.check(settings, prompts, versions(), accept_versions)  # before any model loads
        counts = {"kept": 0, "excluded": 0, "error": 0}
        pending = []
        for index, sample in enumerate(samples):
            record = store.read_record(sample.attribute, sample.id)
            if record is None or record["status"] == "error" or record["label"] != sample.label:
                pending.append(index)
            else:
                counts[record["status"]] += 1
        resumed = len(samples) - len(pending)
        with _workers(executor, model, samples, config, pending) as workers:
            described = workers.description
            settings["dtype"] = described["workers"][0]["dtype"] if described["workers"] else _dtype(model, store)
            store.open(settings, prompts, versions(), command, accept_versions, executor=described)
            where = "" if described["name"] == "local" else f" on {len(described['workers'])} {described['name']} workers"
            bar = tqdm(total=len(samples), initial=resumed, desc=f"tracing {Path(name).name}{where}", unit="sample",
                       disable=not progress, dynamic_ncols=True)  # fmt: skip
            with bar:
                bar.set_postfix(_postfix(counts, resumed))
                if too_long and config.long_audio == "truncate":
                    tqdm.write(
                        f"warning: {len(too_long)} clip(s) are longer than {port.name}'s {port.audio_window:g}-s audio "
                        "window; the model hears only their first seconds, and so does the trace (records: "
                        "heard_seconds; --long-audio skip|error to change this)", file=sys.stderr,
                    )  # fmt: skip
                for index, record in workers.records(pending):
                    store.write_record(record)
                    counts[record["status"]] += 1
                    if record["status"] == "error":
                        tqdm.write(f"error: {_where(samples[index], record['error'])}{record['error']}", file=sys.stderr)
                    bar.set_postfix(_postfix(counts, bar.n + 1), refresh=False)
                    bar.update(1)
        write_aggregate(out_dir)
    return ExperimentSummary(Path(out_dir), len(samples), counts["kept"], counts["excluded"], counts["error"], resumed)


@contextmanager
def _workers(
    executor: Executor, model: HookedLALM | ModelSpec, samples: Sequence[Sample], config: TraceConfig, pending: list[int]
) -> Iterator[Workers]:
    """The executor's started workers, or none when nothing is left to trace (then no model loads)."""
    if not pending:
        yield NoWorkers(executor.name)
        return
    with executor.start(model, samples, config) as workers:
        yield workers


def _dtype(model: HookedLALM | ModelSpec, store: RunStore) -> str | None:
    """The weights' dtype without loading them: the model's, the spec's, else the one the run recorded."""
    if not isinstance(model, ModelSpec):
        return model.dtype_name
    return model.dtype or (store.manifest() or {}).get("settings", {}).get("dtype")


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
    found = [s for s in samples if s.ok and beyond_window(s.source(), port.audio_window)]
    if found and long_audio == "error":
        raise DataError(
            f"{len(found)} clip(s) are longer than {port.name}'s {port.audio_window:g}-s audio window (first: "
            f"{found[0].attribute} {found[0].id}, {found[0].source()['seconds']:.1f} s); cut them, or pass "
            "--long-audio truncate (trace what the model hears) or skip"
        )
    return found
