"""The packaged demonstration: the whole product, end to end, on a small model that really listens.

`run_demo(out)` needs no GPU and no model hub. It loads the demo model shipped in `audiolens_ct/assets/demo_model/`
(a small `Qwen2AudioForConditionalGeneration` trained by `scripts/train_demo_model.py` to answer the four AudioLens
questions from synthetic clips) by the same code path as a hub checkpoint, writes a fresh held-out synthetic SAKURA
under `out/data` (clips the model never saw in training), traces every clip layer- and token-wise with silence as
the corruption, and writes what a researcher gets on a real model:

```
out/data/<Track>/...                 the clips, in SAKURA's GitHub layout
out/records/<attribute>/<id>.json    one record per clip: kept (RR maps), excluded (with the rule) or error
out/manifest.json, out/aggregate.json
out/figures/*.html                   layer-wise RR, segment RR and token-wise heatmaps (interactive, offline)
out/report.html                      the self-contained report
```

Re-running into the same `out` resumes: finished clips are skipped.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from audiolens_ct.data.sakura import load_sakura
from audiolens_ct.data.synthetic import write_synthetic_sakura
from audiolens_ct.errors import CheckpointError
from audiolens_ct.model import HookedLALM
from audiolens_ct.plots import load_runs, write_figures
from audiolens_ct.report import write_report
from audiolens_ct.sweep import run_sweep

DEMO_MODEL = Path(__file__).resolve().parent / "assets" / "demo_model"
DEMO_SEED = 7  # clip seed of the demo set; training used seeds 0 (train) and 1 (held-out)
CLIPS_PER_LABEL = {"animal": 4, "emotion": 6, "gender": 16, "language": 4}
"""30-36 clips per attribute: after the exclusions (silence answers one fixed option per track, so that option's
clips are excluded) each attribute keeps about 15-30 samples, enough for confidence intervals."""


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


def run_demo(out: str | Path, clips_per_label: dict[str, int] = CLIPS_PER_LABEL, progress: bool = True) -> Path:
    """Trace the demo model over a fresh synthetic SAKURA into `out`; returns the path of `out/report.html`."""
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
        summary = run_sweep(
            model, samples, out, modes=("layer", "token"), dataset=dataset, command=f"audiolens-ct demo --out {out}",
            progress=progress,
        )
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
        f"  figures: {figures[0].parent} ({len(figures)} files)\n"
        f"  report:  {report}"
    )
    return report
