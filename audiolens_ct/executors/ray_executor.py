"""`RayExecutor`: a run's samples traced by Ray actors, one per worker, on as many GPUs or machines as a Ray cluster has.

Each worker is an actor that loads the model once, on its own device, and traces the samples it is sent with the
same `SampleTracer` the local executor uses; it returns each record to the driver and writes nothing. The driver
(`run_experiment`) stays the only writer of the output directory, so no shared filesystem is needed for the
results, and the directory's lock and resume logic are the local ones.

Samples are handed out as workers free up (at most `in_flight` per worker at a time), so a long clip never holds
back the samples queued behind it. A worker that dies (process killed, node lost) loses nothing: its samples in
flight go back to the queue, the others take them, and a replacement worker starts (`restarts` of them at most).
Only the records the driver receives are stored, so no sample is stored twice. A driver that dies ends its
workers with it (Ray ends the actors of a dead driver); re-running the same command resumes.

Workers read the clips by their paths, so the data set must be at the same path on every node (a shared or
copied folder); each worker checks that it sees every clip as the driver does before it traces any. Clips held in
memory travel with the samples.
"""

from __future__ import annotations

import itertools
import re
import socket
import sys
from collections import deque
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tqdm.auto import tqdm

from audiolens_ct.config import TraceConfig
from audiolens_ct.data.sample import Sample
from audiolens_ct.errors import AudiolensError, DataError, ExecutorError, InputError
from audiolens_ct.executors import ModelSpec
from audiolens_ct.sample_tracer import SampleTracer
from audiolens_ct.tracing.audit import versions

if TYPE_CHECKING:
    from audiolens_ct.model import HookedLALM

INSTALL = 'pip install "audiolens-ct[ray]"'


def import_ray() -> Any:
    """The `ray` module; `ExecutorError` with the install command when it is missing."""
    try:
        import ray
    except ImportError:
        raise ExecutorError(f"the Ray executor needs Ray, which is not installed here: {INSTALL}") from None
    return ray


class TracerActor:
    """A Ray worker: `start` loads the model and checks the data once; `record(i)` traces sample `i`."""

    def start(
        self, spec: ModelSpec, samples: list[Sample], config: TraceConfig, threads: int, sizes: dict[int, int]
    ) -> tuple[dict[str, Any], dict[str, str]]:
        """Load the model, check that every clip is here as the driver saw it; return (about, versions)."""
        import ray
        import torch
        from transformers.utils import logging as transformers_logging

        for index, size in sizes.items():  # before the model loads: a missing clip is found in seconds
            path = samples[index].audio_path
            here = path.stat().st_size if path.is_file() else None
            if here != size:
                seen = "does not exist" if here is None else f"has {here} bytes, not {size}"
                raise DataError(
                    f"{path} {seen} on worker host {socket.gethostname()}; workers read the clips at the driver's "
                    "paths: put the data set on a shared filesystem or copy it to the same path on every node"
                )
        torch.set_num_threads(threads)
        transformers_logging.disable_progress_bar()  # one "Loading weights" bar per worker would flood the driver
        gpus = ray.get_gpu_ids()
        self.tracer = SampleTracer(spec.load(spec.device or ("cuda" if gpus else None)), samples, config)
        about = {**self.tracer.about(), "node": ray.util.get_node_ip_address(), "gpus": [str(g) for g in gpus]}
        return about, versions()

    def record(self, index: int) -> dict[str, Any]:
        return self.tracer.record(index)


@dataclass
class RayExecutor:
    """Trace on a Ray cluster: one actor per worker, each loading the model once on its own device.

    Attributes:
        address: a running cluster to join ("auto", or the head's "HOST:PORT"); None starts a local Ray instance
            (ended with the run). A Ray already initialised in this process (`ray.init`) is used as it is.
        workers: how many (default: as many as the cluster holds: its GPUs / `gpus_per_worker`, or its CPUs /
            `cpus_per_worker`).
        gpus_per_worker: GPUs each worker reserves (default: 1 when the cluster has GPUs, else 0); a worker with
            GPUs runs on "cuda" unless the `ModelSpec` names a device.
        cpus_per_worker: CPUs each worker reserves, and its torch threads.
        restarts: how many dead workers are replaced over the run (default: as many as there are workers).
        in_flight: samples sent to a worker ahead of its results, so it never waits for the driver.
    """

    address: str | None = None
    workers: int | None = None
    gpus_per_worker: float | None = None
    cpus_per_worker: float = 1.0
    restarts: int | None = None
    in_flight: int = 2
    name: str = field(default="ray", init=False)

    def __post_init__(self) -> None:
        for key, least in (("workers", 1), ("restarts", 0), ("in_flight", 1)):
            value = getattr(self, key)
            if value is not None and (not isinstance(value, int) or value < least):
                raise InputError(f"{key} must be an integer >= {least}, got {value!r}")
        if not self.cpus_per_worker > 0:
            raise InputError(f"cpus_per_worker must be > 0, got {self.cpus_per_worker!r}")
        if self.gpus_per_worker is not None and not self.gpus_per_worker >= 0:
            raise InputError(f"gpus_per_worker must be >= 0, got {self.gpus_per_worker!r}")

    @contextmanager
    def start(self, model: HookedLALM | ModelSpec, samples: Sequence[Sample], config: TraceConfig) -> Iterator[RayWorkers]:
        """Connect to Ray, start the workers (each loads the model) and yield them; end them on exit."""
        ray = import_ray()
        spec = model if isinstance(model, ModelSpec) else ModelSpec.of(model)
        owned = not ray.is_initialized()
        if owned:
            self.connect(ray)
        workers = RayWorkers(ray, self, spec, samples, config)
        try:
            workers.launch(strict=owned and self.address is None)
            yield workers
        finally:
            workers.stop()
            if owned:
                ray.shutdown()

    def connect(self, ray: Any) -> None:
        """Join the cluster at `address` (a clear `ExecutorError` when none answers there), or start a local
        Ray instance."""
        if self.address is None:
            ray.init(include_dashboard=False, logging_level="WARNING")
            return
        way_out = "start one with `ray start --head`, or leave out --ray-address to start a local Ray for this run"
        if re.fullmatch(r"[\w.-]+:\d+", self.address):  # HOST:PORT: Ray itself would retry for minutes
            host, port = self.address.rsplit(":", 1)
            try:
                socket.create_connection((host, int(port)), timeout=10).close()
            except OSError as exc:
                raise ExecutorError(f"no Ray cluster answers at {self.address} ({exc.strerror or exc}); {way_out}") from None
        try:
            ray.init(address=self.address, logging_level="WARNING")
        except ConnectionError as exc:
            raise ExecutorError(f"cannot join a Ray cluster at {self.address!r} ({exc}); {way_out}") from None

    def plan(self, resources: dict[str, float], strict: bool) -> tuple[int, float]:
        """(workers, GPUs per worker) for a cluster of `resources`; `strict`: refuse workers that do not fit (a
        Ray instance started for this run cannot grow; a cluster may, so there it is a warning)."""
        cpus, gpus_here = resources.get("CPU", 0.0), resources.get("GPU", 0.0)
        gpus = self.gpus_per_worker if self.gpus_per_worker is not None else (1.0 if gpus_here >= 1 else 0.0)
        fit = int(gpus_here // gpus) if gpus else int(cpus // self.cpus_per_worker)
        workers = self.workers or max(fit, 1)
        if workers > fit:
            need = f"{workers} workers of {self.cpus_per_worker:g} CPU(s)" + (f" and {gpus:g} GPU(s)" if gpus else "")
            have = f"the Ray cluster has {cpus:g} CPUs and {gpus_here:g} GPUs"
            if strict:
                raise ExecutorError(f"{need} each do not fit: {have}; ask for fewer workers or fewer CPUs/GPUs each")
            tqdm.write(f"warning: {need} each do not fit yet: {have}; the others wait until it has room",
                       file=sys.stderr)  # fmt: skip
        return workers, gpus


class RayWorkers:
    """The actors of one run, and the scheduling of its samples over them."""

    def __init__(self, ray: Any, executor: RayExecutor, spec: ModelSpec, samples: Sequence[Sample],
                 config: TraceConfig) -> None:  # fmt: skip
        from ray.exceptions import RayActorError, RayTaskError

        self.ray, self.executor, self.spec, self.samples, self.config = ray, executor, spec, samples, config
        self._lost_errors, self._task_errors = RayActorError, RayTaskError
        self.numbers = itertools.count()
        self.actors: dict[int, Any] = {}
        self.about: dict[int, dict[str, Any]] = {}
        self.starting: dict[Any, int] = {}
        self.description: dict[str, Any] = {"name": "ray"}

    def launch(self, strict: bool) -> None:
        """Start the workers and wait until each has loaded the model; the run's first error stops it here."""
        ray, executor = self.ray, self.executor
        n_workers, self.gpus = executor.plan(ray.cluster_resources(), strict)
        self.restarts_left = n_workers if executor.restarts is None else executor.restarts
        threads = max(1, int(executor.cpus_per_worker))
        sizes = {i: s.audio_path.stat().st_size for i, s in enumerate(self.samples)
                 if s.ok and s.waveform is None and s.audio_path is not None and s.audio_path.is_file()}  # fmt: skip
        self.start_args = (self.spec, ray.put(list(self.samples)), self.config, threads, sizes)
        self.actor_class = ray.remote(TracerActor)
        tqdm.write(f"starting {n_workers} Ray worker(s); each loads {Path(self.spec.name_or_path).name} once",
                   file=sys.stderr)  # fmt: skip
        for _ in range(n_workers):
            self._spawn()
        while self.starting:
            (ref,), _ = ray.wait(list(self.starting), num_returns=1)
            self._join(ref, {}, deque())
        if not self.about:
            raise ExecutorError("no Ray worker could start (each died while loading the model; see the log above)")
        self.description.update(
            address=ray.get_runtime_context().gcs_address, cpus_per_worker=executor.cpus_per_worker,
            gpus_per_worker=self.gpus, workers=[self.about[w] for w in sorted(self.about)],
        )  # fmt: skip

    def _spawn(self) -> None:
        worker = next(self.numbers)
        actor = self.actor_class.options(num_cpus=self.executor.cpus_per_worker, num_gpus=self.gpus, max_restarts=0,
                                         max_task_retries=0).remote()  # fmt: skip
        self.actors[worker] = actor
        self.starting[actor.start.remote(*self.start_args)] = worker

    def _join(self, ref: Any, flight: dict[Any, tuple[int, int]], queue: deque[int]) -> None:
        """Take the answer of a worker's `start`: it joins, dies (and is replaced), or the run stops with the
        reason it gave."""
        worker = self.starting.pop(ref)
        try:
            about, found = self._get(ref)
        except self._lost_errors as exc:
            self._lost(worker, exc, flight, queue)
            return
        if found != versions():
            raise ExecutorError(
                f"Ray worker on {about['host']} runs other library versions ({found}) than the driver ({versions()}); "
                "install the same environment on every node (pip install -c constraints.txt ...)"
            )
        self.about[worker] = {"worker": worker, **about}

    def _get(self, ref: Any) -> Any:
        """`ray.get(ref)`, with an error a worker raised on purpose re-raised here as itself."""
        try:
            return self.ray.get(ref)
        except self._task_errors as exc:
            if isinstance(exc.cause, AudiolensError):
                raise exc.cause from None
            raise

    def records(self, indices: Sequence[int]) -> Iterator[tuple[int, dict[str, Any]]]:
        queue = deque(indices)
        flight: dict[Any, tuple[int, int]] = {}  # result ref -> (worker, sample index)
        while queue or flight:
            for worker in self.about:
                load = sum(1 for w, _ in flight.values() if w == worker)
                while queue and load < self.executor.in_flight:
                    index = queue.popleft()
                    flight[self.actors[worker].record.remote(index)] = (worker, index)
                    load += 1
            if not flight and not self.starting:
                raise ExecutorError(f"every Ray worker died and no replacement is left ({len(queue)} sample(s) not "
                                    "traced); re-run the same command to resume")  # fmt: skip
            (ref,), _ = self.ray.wait([*flight, *self.starting], num_returns=1)
            if ref in self.starting:
                self._join(ref, flight, queue)
                continue
            worker, index = flight.pop(ref)
            try:
                record = self._get(ref)
            except self._lost_errors as exc:
                queue.appendleft(index)
                self._lost(worker, exc, flight, queue)
                continue
            yield index, record

    def _lost(self, worker: int, exc: Exception, flight: dict[Any, tuple[int, int]], queue: deque[int]) -> None:
        """A worker died: its samples in flight go back to the front of the queue, and a replacement starts."""
        back = [ref for ref, (w, _) in flight.items() if w == worker]
        for ref in reversed(back):
            queue.appendleft(flight.pop(ref)[1])
        about = self.about.pop(worker, {"host": "?", "pid": "?"})
        self.ray.kill(self.actors.pop(worker), no_restart=True)
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        replace = self.restarts_left > 0
        tqdm.write(
            f"warning: Ray worker {worker} (host {about['host']}, pid {about['pid']}) died ({reason}); its samples "
            f"go back to the queue; {'starting a replacement' if replace else 'no replacement left'}", file=sys.stderr,
        )  # fmt: skip
        if replace:
            self.restarts_left -= 1
            self._spawn()

    def stop(self) -> None:
        """End every worker (their unfinished samples are simply not stored)."""
        for actor in self.actors.values():
            self.ray.kill(actor, no_restart=True)
        self.actors.clear()
