"""One sweep, three executors, side by side in one run: the local runner, and the Ray executor with 1 and 2 workers.

The sweep is `run_experiment` on the shipped demo model over a fresh synthetic SAKURA (layer- and token-wise,
silence, the exactness audit on), every configuration in its own child process with one torch thread per worker
(Ray's workers at the driver's priority, not Ray's default nice 15). Each child times three phases through the
`Executor` protocol: starting (a local Ray instance, then the workers, each loading the model), tracing (from the
first sample handed out to the aggregate written), and the whole call.
Each configuration runs `--repeats` times, interleaved, and the fastest run of each is shown (the machine may be
shared). The parent prints samples/s while tracing, the speed-up over the local runner, the Ray path's overhead per
sample (tracing time with one Ray worker minus the local runner's, per sample), its start-up cost, and the largest
difference between the records and aggregates of the runs (0 expected: the executor never changes the numbers).

    python benchmarks/bench_scaling.py                        # 2 clips per label: 48 clips
    python benchmarks/bench_scaling.py --clips-per-label 4    # a longer sweep
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

CONFIGS = {"local": None, "ray-1": 1, "ray-2": 2}
"""Each configuration: None runs the local executor, a number that many Ray workers."""


class Timed:
    """An executor that notes when its workers are ready, around another one (the `Executor` protocol)."""

    def __init__(self, inner) -> None:
        self.inner, self.name, self.ready = inner, inner.name, None

    @contextmanager
    def start(self, model, samples, config):
        with self.inner.start(model, samples, config) as workers:
            self.ready = time.perf_counter()
            yield workers


def run_config(args: argparse.Namespace) -> None:
    """Child: one configuration, timed; writes its phases as JSON next to the run."""
    import torch

    torch.set_num_threads(1)
    from audiolens_ct.data.sakura import load_sakura
    from audiolens_ct.demo import DEMO_MODEL
    from audiolens_ct.executors import LocalExecutor, ModelSpec
    from audiolens_ct.experiment import run_experiment

    samples = load_sakura(args.data)
    workers = CONFIGS[args.config]
    begin = time.perf_counter()
    if workers is None:
        executor, ray_start = Timed(LocalExecutor()), 0.0
    else:
        import ray

        from audiolens_ct.executors.ray_executor import RayExecutor

        # Ray starts its workers at nice 15; at 0 they compete for the CPU as the local runner does
        os.environ["RAY_worker_niceness"] = "0"
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, logging_level="WARNING")
        ray_start = time.perf_counter() - begin
        executor = Timed(RayExecutor(workers=workers, cpus_per_worker=1))
    run_experiment(ModelSpec(str(DEMO_MODEL)), samples, args.out, executor=executor, progress=False)
    end = time.perf_counter()
    Path(args.out, "timing.json").write_text(json.dumps(dict(
        samples=len(samples), ray_init=ray_start, start=executor.ready - begin, tracing=end - executor.ready,
        total=end - begin,
    )))  # fmt: skip


def max_difference(a, b) -> float:
    """Largest |difference| of the numbers of two JSON trees (timing fields left out); inf if they differ in
    shape or in anything else."""
    if isinstance(a, dict):
        if a.keys() != b.keys():
            return float("inf")
        return max([max_difference(a[k], b[k]) for k in a if k != "seconds"], default=0.0)
    if isinstance(a, list):
        if len(a) != len(b):
            return float("inf")
        return max([max_difference(x, y) for x, y in zip(a, b, strict=True)], default=0.0)
    if isinstance(a, float) or isinstance(b, float):
        return abs(a - b)
    return 0.0 if a == b else float("inf")


def run_tree(out: Path) -> dict:
    """The records (by file) and aggregate of a run directory."""
    records = {p.relative_to(out).as_posix(): json.loads(p.read_text()) for p in (out / "records").glob("*/*.json")}
    return {"records": records, "aggregate": json.loads((out / "aggregate.json").read_text())["attributes"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clips-per-label", type=int, default=2, help="synthetic clips per label (24 labels)")
    parser.add_argument("--repeats", type=int, default=2, help="runs of each executor; the fastest is shown")
    parser.add_argument("--config", choices=CONFIGS, help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.config:
        run_config(args)
        return

    from audiolens_ct.demo import DEMO_SEED
    from audiolens_ct.demo.synthetic import write_synthetic_sakura

    load = os.getloadavg()[0]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    with tempfile.TemporaryDirectory() as tmp:
        data = write_synthetic_sakura(Path(tmp) / "data", args.clips_per_label, seed=DEMO_SEED)
        timing, diffs, reference = {}, {}, None
        for repeat in range(args.repeats):  # interleaved, so a busy spell on a shared machine hits every executor
            for config in CONFIGS:
                out = Path(tmp) / f"{config}-{repeat}"
                print(f"running {config} ({repeat + 1} of {args.repeats}) ...", flush=True)
                subprocess.run([sys.executable, __file__, "--config", config, "--data", str(data), "--out", str(out)],
                               check=True, env=env, stderr=subprocess.DEVNULL)  # fmt: skip
                measured = json.loads((out / "timing.json").read_text())
                if config not in timing or measured["tracing"] < timing[config]["tracing"]:
                    timing[config] = measured  # the fastest repeat: the least disturbed by other processes
                tree = run_tree(out)
                reference = reference or tree  # the first local run
                diffs[config] = max(diffs.get(config, 0.0), max_difference(reference, tree))

    n = timing["local"]["samples"]
    print()
    print(f"demo model, {n} synthetic clips (layer- and token-wise, silence, audit on), one torch thread per worker, "
          f"{os.cpu_count()} CPU cores; best of {args.repeats} runs each; load average before/after: {load:.1f} / "
          f"{os.getloadavg()[0]:.1f}")  # fmt: skip
    print(f"{'executor':<10}{'start s':>9}{'tracing s':>11}{'total s':>9}{'samples/s':>11}{'speed-up':>10}"
          f"{'speed-up (total)':>18}{'max |diff| vs local':>21}")  # fmt: skip
    local = timing["local"]
    for config, t in timing.items():
        diff = diffs[config]
        print(f"{config:<10}{t['start']:>9.1f}{t['tracing']:>11.1f}{t['total']:>9.1f}{n / t['tracing']:>11.2f}"
              f"{local['tracing'] / t['tracing']:>9.2f}x{local['total'] / t['total']:>17.2f}x{diff:>21.1e}")  # fmt: skip
    overhead = (timing["ray-1"]["tracing"] - local["tracing"]) / n
    print(f"Ray path overhead per sample (1 worker vs local, tracing): {overhead * 1000:+.0f} ms "
          f"({overhead / (local['tracing'] / n):+.0%} of a sample's {local['tracing'] / n * 1000:.0f} ms)")
    print(f"Ray start-up: {timing['ray-2']['ray_init']:.1f} s for the local Ray instance, then "
          f"{timing['ray-2']['start'] - timing['ray-2']['ray_init']:.1f} s until 2 workers had each loaded the model "
          f"(local runner: {local['start']:.1f} s to load it)")

if __name__ == "__main__":
    main()
