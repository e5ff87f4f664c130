"""Group-wise, time-wise and head-wise grids, fast engine vs the TransformerLens reference, side by side in one run.

The model and clip are `bench_tracing.py`'s (a random Qwen2-Audio shaped like a real one where it sets the cost of
tracing: 8 layers, d_model 256, 8 query heads over 2 key/value heads, a 12.5-s clip = 312 audio rows). Three grids:

- spans: the four segments, the audio rows and the text after the audio, each restored jointly, per layer;
- time: 0.5-s windows of audio rows, per layer (the suffix of each window starts inside the audio: the fast
  engine's worst case, since a patch there changes almost the whole sequence);
- heads: each query head's output at the last position, per layer.

Each grid is evaluated by both engines in this process, one after the other; it prints seconds, the speed-up and
the max |diff| in probability.

    python benchmarks/bench_beyond.py                 # CPU, default sizes
"""

from __future__ import annotations

import argparse
import time
from functools import partial

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seconds", type=float, default=12.5, help="clip length (12.5 s gives 312 audio rows)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: steady timings on a shared CPU)")
    args = parser.parse_args()
    args.layers, args.d_model, args.max_batch = 8, 256, 64  # bench_tracing.py's model and batch bound

    import torch
    from bench_tracing import build

    from audiolens_ct.tracing.engine_fast import FastEngine
    from audiolens_ct.tracing.engine_reference import ReferenceEngine
    from audiolens_ct.tracing.patches import group_wise, head_wise
    from audiolens_ct.tracing.scoring import answer_probability, answer_token
    from audiolens_ct.tracing.spans import resolve_span
    from audiolens_ct.tracing.timeline import time_windows

    torch.set_num_threads(args.threads)
    model, _, clean, corrupted = build(args)
    metric = partial(answer_probability, target=answer_token(model.tokenizer, "male"))
    n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
    spans = ("early_prompt", "object", "late_prompt", "last", "audio", "after_audio")
    windows = time_windows(model, clean, corrupted, args.seconds)
    last = resolve_span(model, "last", clean, corrupted)
    grids = {
        f"spans ({len(spans)} spans)": group_wise(n_layers, [resolve_span(model, s, clean, corrupted) for s in spans]),
        f"time ({len(windows)} windows of 0.5 s)": group_wise(n_layers, [(w.src, w.dst) for w in windows]),
        f"heads ({n_heads} heads, last position)": head_wise(n_layers, n_heads, *last),
    }
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    with torch.no_grad():
        _, cache = model.run_with_cache(clean, names_filter=lambda n: n.endswith(("hook_resid_pre", "hook_z")))
        print(f"model: {n_layers} layers, d_model {args.d_model}, {n_heads} query heads over "
              f"{model.cfg.n_key_value_heads} key/value heads; sequence {clean.shape[1]} positions "
              f"({len(clean.audio_positions)} audio rows); device {args.device}")  # fmt: skip
        print(f"{'grid':<36}{'patches':>8}{'fast s':>9}{'reference s':>13}{'speed-up':>10}{'max |diff|':>12}")
        for name, patches in grids.items():
            seconds, values = [], []
            for engine in (FastEngine(max_batch=args.max_batch), ReferenceEngine()):
                sync()
                start = time.perf_counter()
                values.append(engine.evaluate(model, patches, cache, engine.run_corrupted(model, corrupted), metric))
                sync()
                seconds.append(time.perf_counter() - start)
            diff = float(np.abs(values[0].numpy() - values[1].numpy()).max())
            print(f"{name:<36}{len(patches.patches):>8}{seconds[0]:>9.2f}{seconds[1]:>13.2f}"
                  f"{seconds[1] / seconds[0]:>9.1f}x{diff:>12.1e}")  # fmt: skip


if __name__ == "__main__":
    main()
