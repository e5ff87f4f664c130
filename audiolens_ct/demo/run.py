"""Running the demo: the demo model traced over a fresh held-out synthetic SAKURA, then figures and a report."""

from __future__ import annotations

import time
from itertools import zip_longest
from pathlib import Path

import torch

from audiolens_ct.aggregate import load_runs
from audiolens_ct.data.sakura import load_sakura
from audiolens_ct.data.sample import Sample
from audiolens_ct.demo import DEMO_MODEL, DEMO_SEED
from audiolens_ct.demo.synthetic import write_synthetic_sakura
from audiolens_ct.errors import CheckpointError
from audiolens_ct.experiment import run_experiment
from audiolens_ct.lens import lens_over_samples
from audiolens_ct.model import HookedLALM
from audiolens_ct.observations import LENS, STEERING, load_view, write_view
from audiolens_ct.plots import write_figures
from audiolens_ct.report import write_report
from audiolens_ct.steering import steering_sweep

CLIPS_PER_LABEL = {"animal": 4, "emotion": 6, "gender": 16, "language": 4}
"""30-36 clips per attribute: after the exclusions (silence answers one fixed option per track, so that option's
clips are excluded) each attribute keeps about 15-30 samples, enough for confidence intervals."""
VIEW_CLIPS = 6
"""Clips per attribute (labels taken in turn) that the logit lens and the steering sweep read: their cost is two
audio-tower runs a clip (the clip and its silence); measured, about a seventh of the tracing's CPU time."""


def demo_model_path() -> Path:
    """The shipped demo checkpoint (a Hugging Face model directory)."""
    if not (DEMO_MODEL / "config.json").is_file():
        raise CheckpointError(f"{DEMO_MODEL}: the demo model is missing; run scripts/train_demo_model.py")
    return DEMO_MODEL


def write_demo_data(root: str | Path, clips_per_label: dict[str, int] = CLIPS_PER_LABEL, seed: int = DEMO_SEED) -> Path:
    """Write the held-out synthetic SAKURA of the demo under `root` (GitHub layout) and return `root`."""
    for attribute, n in clips_per_label.items():
        write_synthetic_sakura(root, n, seed=seed, layout="github", attributes=[attribute])
    return Path(root)


def clips_in_turn(samples: list[Sample], per_attribute: int) -> list[Sample]:
    """Up to `per_attribute` samples of each attribute, taking its labels in turn (so every option has clips)."""
    out = []
    for attribute in dict.fromkeys(s.attribute for s in samples):
        by_label: dict[str, list[Sample]] = {}
        for sample in samples:
            if sample.attribute == attribute:
                by_label.setdefault(sample.label, []).append(sample)
        in_turn = [s for row in zip_longest(*by_label.values()) for s in row if s is not None]
        out += in_turn[:per_attribute]
    return out


def _has_view(out: Path, name: str, views: list[Sample]) -> bool:
    """Whether `out` holds the view `name` of exactly these clips (the demo's clips are the same on every run)."""
    view = load_view(out, name)
    return view is not None and sorted(r["sample_id"] for r in view["samples"]) == sorted(s.id for s in views)


def run_demo(
    out: str | Path, clips_per_label: dict[str, int] = CLIPS_PER_LABEL, progress: bool = True,
    view_clips: int = VIEW_CLIPS,
) -> Path:
    """Trace the demo model over a fresh synthetic SAKURA into `out`, and read the logit lens and a steering sweep
    on `view_clips` clips per attribute; returns the path of `out/report.html`."""
    out = Path(out)
    start = time.perf_counter()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the model is tiny: one thread is fastest and never oversubscribes a shared machine
    say = print if progress else (lambda *args, **kwargs: None)
    try:
        say(f"loading the demo model ({demo_model_path()})", flush=True)
        model = HookedLALM.from_pretrained(str(demo_model_path()))
        say(f"writing held-out synthetic clips in the SAKURA layout to {out / 'data'}", flush=True)
        data = write_demo_data(out / "data", clips_per_label)
        samples = load_sakura(data)
        dataset = dict(source="synthetic", path=str(data.resolve()), seed=DEMO_SEED, clips_per_label=clips_per_label)
        summary = run_experiment(
            model, samples, out, modes=("layer", "token"), dataset=dataset, command=f"audiolens-ct demo --out {out}",
            progress=progress,
        )
        views = clips_in_turn(samples, view_clips)
        if not all(_has_view(out, name, views) for name in (LENS, STEERING)):  # a resumed demo keeps its views
            say(f"reading the logit lens and sweeping steering strengths on {len(views)} of the clips", flush=True)
            prepared: dict = {}  # each clip and its silent twin, prepared once for both views
            write_view(out, LENS, lens_over_samples(model, views, progress=progress, prepared=prepared))
            write_view(out, STEERING, steering_sweep(model, views, progress=progress, prepared=prepared))
        say(f"writing figures and the report to {out}", flush=True)
        figures = write_figures(load_runs([out]), out / "figures")
        report = write_report(out)
    finally:
        torch.set_num_threads(threads)
    resumed = f" ({summary.resumed} from an earlier run)" if summary.resumed else ""
    print(
        f"traced {summary.total} clips{resumed} in {time.perf_counter() - start:.0f} s: {summary.kept} kept, "
        f"{summary.excluded} excluded, {summary.errors} errors\n"
        f"  data:    {data}\n"
        f"  records: {out / 'records'}\n"
        f"  views:   {out / LENS}, {out / STEERING} ({len(views)} clips)\n"
        f"  figures: {figures[0].parent} ({len(figures)} files)\n"
        f"  report:  {report}"
    )
    return report
