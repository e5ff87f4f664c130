"""Executors: where a data-set run's samples are traced, while the driver alone writes the output directory.

`run_experiment` is the driver: it holds the output directory's lock, decides which samples are still to trace,
writes each record as it arrives and the aggregate at the end. An executor only turns samples into records, with
the same `SampleTracer` wherever it runs:

- `LocalExecutor` (the default): one tracer in the driver's own process, samples in data order. Needs no Ray.
- `RayExecutor` (`executors/ray_executor.py`; Ray is imported only when a run starts): one Ray actor per worker,
  each loading the model once on its own device; samples are handed out as workers free up, and the samples of a
  worker that dies go to the others.

Which executor ran never changes the numbers, so it is not one of the run's settings: a run started on Ray can
be resumed locally and the other way round. The manifest records it with each invocation (`executor`: its name
and each worker's host, process and device).

    from audiolens_ct.executors import ModelSpec, RayExecutor

    run_experiment(model, samples, "runs/qwen2")                                       # local
    run_experiment(ModelSpec("Qwen/Qwen2-Audio-7B-Instruct", dtype="bfloat16"), samples, "runs/qwen2",
                   executor=RayExecutor(workers=8, gpus_per_worker=1))                 # 8 GPUs of a Ray cluster
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from audiolens_ct.choices import DTYPES, EXECUTORS
from audiolens_ct.config import TraceConfig
from audiolens_ct.data.sample import Sample
from audiolens_ct.errors import InputError
from audiolens_ct.sample_tracer import SampleTracer

if TYPE_CHECKING:
    from audiolens_ct.model import HookedLALM
    from audiolens_ct.ports import Port


@dataclass(frozen=True)
class ModelSpec:
    """A model as `HookedLALM.from_pretrained` loads it: what each worker of a `RayExecutor` loads for itself.

    Attributes:
        name_or_path: hub id or checkpoint directory (the same path on every node).
        port: port name or `Port` (default: inferred from the checkpoint's config.json).
        device: torch device of every worker (default: "cuda" for a worker given GPUs, else the port's choice).
        dtype: "float32", "bfloat16" or "float16" (default: the port's choice).
    """

    name_or_path: str
    port: str | Port | None = None
    device: str | None = None
    dtype: str | None = None

    def __post_init__(self) -> None:
        if self.dtype is not None and self.dtype not in DTYPES:
            raise InputError(f"unknown dtype {self.dtype!r}; use one of {', '.join(DTYPES)}")

    @classmethod
    def of(cls, model: HookedLALM) -> ModelSpec:
        """The spec that loads `model` again: its name or path, its port and its weights' dtype.

        `InputError` for a model that cannot be loaded by name (one built in memory by `HookedLALM.from_hf`)."""
        from audiolens_ct.errors import CheckpointError
        from audiolens_ct.hub import read_checkpoint_config

        try:
            read_checkpoint_config(model.model_name)
        except CheckpointError as exc:
            raise InputError(
                f"workers load the model by its name or path, and {model.model_name!r} cannot be loaded ({exc}); "
                "save an in-memory model with save_pretrained(DIR) and pass HookedLALM.from_pretrained(DIR)"
            ) from None
        return cls(model.model_name, port=model.port, dtype=model.dtype_name)

    def resolve_port(self) -> Port:
        """The port, without loading the model (read from config.json when not given)."""
        from audiolens_ct.hub import read_checkpoint_config
        from audiolens_ct.ports import get_port, port_for_config

        if self.port is not None:
            return get_port(self.port)
        return port_for_config(read_checkpoint_config(self.name_or_path), self.name_or_path)

    def load(self, device: str | None = None) -> HookedLALM:
        """Load the model (on `device`, default: the spec's)."""
        import torch

        from audiolens_ct.model import HookedLALM

        dtype = getattr(torch, self.dtype) if self.dtype else None
        return HookedLALM.from_pretrained(self.name_or_path, port=self.port, device=device or self.device, dtype=dtype)


class Workers(Protocol):
    """Started workers: what they are, and the records of the samples they are given."""

    description: dict[str, Any]
    """JSON-ready, for the run manifest: `name` (the executor), `workers` (each one's host, pid, device, dtype)."""

    def records(self, indices: Sequence[int]) -> Iterator[tuple[int, dict[str, Any]]]:
        """(index, record) of each sample in `indices`, in the order they are finished, each exactly once."""
        ...


class Executor(Protocol):
    """Where samples are traced: `start` loads the model where the work happens and yields the `Workers`."""

    name: str

    def start(
        self, model: HookedLALM | ModelSpec, samples: Sequence[Sample], config: TraceConfig
    ) -> AbstractContextManager[Workers]: ...


@dataclass
class LocalWorkers:
    """The driver's own process as the one worker."""

    tracer: SampleTracer

    @property
    def description(self) -> dict[str, Any]:
        return {"name": "local", "workers": [self.tracer.about()]}

    def records(self, indices: Sequence[int]) -> Iterator[tuple[int, dict[str, Any]]]:
        for index in indices:
            yield index, self.tracer.record(index)


@dataclass
class NoWorkers:
    """The workers of a run with nothing left to trace: none are started, and no model loads."""

    name: str

    @property
    def description(self) -> dict[str, Any]:
        return {"name": self.name, "workers": []}

    def records(self, indices: Sequence[int]) -> Iterator[tuple[int, dict[str, Any]]]:
        return iter(())


class LocalExecutor:
    """Trace in this process, one sample after another, in data order (the default; needs no Ray)."""

    name = "local"

    @contextmanager
    def start(self, model: HookedLALM | ModelSpec, samples: Sequence[Sample], config: TraceConfig) -> Iterator[LocalWorkers]:
        yield LocalWorkers(SampleTracer(model.load() if isinstance(model, ModelSpec) else model, samples, config))


def __getattr__(name: str) -> Any:
    if name == "RayExecutor":  # its module imports Ray only when a run starts
        from audiolens_ct.executors.ray_executor import RayExecutor

        return RayExecutor
    raise AttributeError(f"module 'audiolens_ct.executors' has no attribute {name!r}")


def make_executor(executor: Executor | str | None = None, **options: Any) -> Executor:
    """An executor by name ("local", "ray"; `options` go to its constructor) or as given; None is local."""
    if executor is None or executor == "local":
        if options:
            raise InputError(f"the local executor takes no options, got {', '.join(sorted(options))}; "
                             "they are for executor='ray'")  # fmt: skip
        return LocalExecutor()
    if executor == "ray":
        return __getattr__("RayExecutor")(**options)
    if isinstance(executor, str):
        raise InputError(f"unknown executor {executor!r}; use one of {', '.join(EXECUTORS)}")
    return executor
