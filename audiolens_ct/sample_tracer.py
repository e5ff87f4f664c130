"""`SampleTracer`: one sample of a data set traced into its record, the work every executor runs.

A data-set run (`experiment.run_experiment`) has one writer, the driver, and one or more tracers: in the driver's
own process (the local executor) or one per Ray worker (`executors.ray_executor`). Each tracer holds a loaded model,
the run's samples (a swap partner may be any of them) and its `TraceConfig`, and turns sample `i` into the record
the driver stores. Being the same code wherever it runs is what makes a Ray run's records equal a local run's.

A record is `kept` (RR maps), `excluded` (the paper's rule that dropped it) or `error` (why the sample could not be
traced: a label outside the options, a missing or unreadable audio file, ...): a data problem never stops a run.
"""

from __future__ import annotations

import os
import random
import socket
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from audiolens_ct.config import TraceConfig
from audiolens_ct.data.sample import Sample
from audiolens_ct.errors import SAMPLE_ERRORS, InputError
from audiolens_ct.tracing.clip import trace
from audiolens_ct.tracing.scoring import answer_tokens
from audiolens_ct.tracing.timeline import require_timeline

if TYPE_CHECKING:
    from audiolens_ct.model import HookedLALM


class SampleTracer:
    """A loaded model with a run's samples and options; `record(i)` traces sample `i` into its record.

    Building one makes the checks that need the loaded model, once, before any sample is traced: the options of
    every track must start with distinct tokens (`InputError` otherwise) and, with time windows, the port must
    give its audio rows a timeline.
    """

    def __init__(self, model: HookedLALM, samples: Sequence[Sample], config: TraceConfig) -> None:
        self.model, self.samples, self.config = model, list(samples), config
        for options in dict.fromkeys(tuple(s.options) for s in self.samples):
            answer_tokens(model.tokenizer, options)  # a clash of option tokens fails here, once
        if config.time_window is not None or "time" in config.atp:
            require_timeline(model)  # a port without one is refused before anything is written

    def about(self) -> dict[str, Any]:
        """Where this tracer runs, for the run manifest: host, process id, device, dtype and torch threads."""
        import torch

        device = next(self.model.hf_model.parameters()).device
        return dict(host=socket.gethostname(), pid=os.getpid(), device=str(device), dtype=self.model.dtype_name,
                    threads=torch.get_num_threads())  # fmt: skip

    def record(self, index: int) -> dict[str, Any]:
        """The record of sample `index`; a data problem becomes an `error` record with its message."""
        return trace_record(self.model, self.samples[index], self.samples, self.config)


def trace_record(model: HookedLALM, sample: Sample, samples: Sequence[Sample], config: TraceConfig) -> dict[str, Any]:
    """One sample's record (`samples`: the run's samples, where a swap partner is chosen)."""
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
    if config.long_audio == "skip" and beyond_window(source, window):
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


def beyond_window(source: dict[str, Any] | None, window: float | None) -> bool:
    """Whether a clip (its `Sample.source()`) is longer than an audio window (None: no window)."""
    return source is not None and window is not None and source["seconds"] > window + 1e-9


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
