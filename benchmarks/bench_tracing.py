"""Token-wise tracing grid, three ways, side by side in one run: fast engine, reference engine, naive HF loop.

The model is a random Qwen2-Audio shaped like a real one in the dimensions that set the cost of tracing: a clip
long enough for >= 300 audio rows, ~40 text positions after the audio, 8 decoder layers. Each method runs in its
own child process (so its peak memory is its own) on the same weights and input, and the parent prints the
times, the speed-up ratios, the FLOP-ideal ratio of the fast engine, the max |diff| of the P grids, and peak
memory.

    python benchmarks/bench_tracing.py                 # CPU, default sizes
    python benchmarks/bench_tracing.py --device cuda   # on a GPU
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

PROMPT = "What is the gender of the speaker in the speech? Listen carefully. Possible options: male, female."
PREFIX = "The speaker's gender is"


def build(args: argparse.Namespace):
    """The benchmark model (HookedLALM + an untouched copy for the HF loop) and the clean/corrupted inputs."""
    import copy

    import torch

    import audiolens_ct as act
    from audiolens_ct.testing import tiny_model, tone

    hf_model, processor = tiny_model(
        "qwen2-audio",
        seed=0,
        text_config=dict(hidden_size=args.d_model, intermediate_size=4 * args.d_model, num_hidden_layers=args.layers,
                         num_attention_heads=8, num_key_value_heads=2),
    )
    hf_model = hf_model.to(args.device)
    reference = copy.deepcopy(hf_model).eval()
    model = act.HookedLALM.from_hf(hf_model, processor, port="qwen2-audio")
    wave = tone(args.seconds, 220.0)
    clean = model.prepare(wave, PROMPT, PREFIX, options=["male", "female"]).to(args.device)
    corrupted = model.prepare_like(clean, np.zeros_like(wave)).to(args.device)
    torch.manual_seed(0)
    return model, reference, clean, corrupted


def run_method(args: argparse.Namespace) -> None:
    """Child process: time one method's token-wise grid and write it with the timing to `args.out`."""
    import torch

    from audiolens_ct.data.answers import answer_token
    from audiolens_ct.testing import hf_patch_loop
    from audiolens_ct.tracing import token_wise
    from audiolens_ct.tracing.engine_fast import evaluate_fast
    from audiolens_ct.tracing.engine_reference import evaluate_reference

    torch.set_num_threads(args.threads)
    model, reference, clean, corrupted = build(args)
    target = answer_token(model.tokenizer, "male")
    positions = clean.text_positions
    n_layers = model.cfg.n_layers

    def metric(logits: torch.Tensor) -> torch.Tensor:
        return logits[:, -1].float().softmax(-1)[:, target].mean()

    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    with torch.no_grad():
        _, cache = model.run_with_cache(clean, names_filter=lambda n: n.endswith("hook_resid_pre"))
        model(corrupted)  # warm-up; audio rows cached on the inputs
        sync()
        t0 = time.perf_counter()
        sweep = token_wise(n_layers, positions, positions)
        if args.method == "fast":
            grid = evaluate_fast(model, sweep, cache, corrupted, target, max_batch=args.max_batch)
        elif args.method == "reference":
            grid = evaluate_reference(model, sweep, cache, corrupted, metric)
        else:
            grid = hf_patch_loop("qwen2-audio", reference, clean, corrupted, range(n_layers), positions, metric)
        sync()
        seconds = time.perf_counter() - t0
    peak = (torch.cuda.max_memory_allocated() / 2**20 if args.device.startswith("cuda")
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    np.save(args.out, np.asarray(grid, dtype=np.float64).reshape(n_layers, len(positions)))
    Path(args.out).with_suffix(".json").write_text(json.dumps(dict(
        seconds=seconds, peak_mib=peak, seq_len=clean.shape[1], audio_rows=len(clean.audio_positions),
        text_after_audio=len(positions), layers=n_layers,
    )))


def flop_ideal_ratio(layers: int, seq_len: int, positions: list[int]) -> float:
    """Layer-token evaluations of the reference sweep over those of the ideal suffix-and-growing-batch sweep."""
    reference = layers * len(positions) * layers * seq_len
    fast = sum(layers * (layers + 1) / 2 * (seq_len - p) for p in positions)
    return reference / fast


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--seconds", type=float, default=12.5, help="clip length (12.5 s gives 312 audio rows)")
    parser.add_argument("--max-batch", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads per method (1: steady timings on a shared 2-core machine)")
    parser.add_argument("--method", choices=["fast", "reference", "hf_loop"], help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.method:
        run_method(args)
        return

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for method in ("fast", "reference", "hf_loop"):
            out = str(Path(tmp) / f"{method}.npy")
            cmd = [sys.executable, __file__, "--method", method, "--out", out, "--device", args.device,
                   "--layers", str(args.layers), "--d-model", str(args.d_model), "--seconds", str(args.seconds),
                   "--max-batch", str(args.max_batch), "--threads", str(args.threads)]
            print(f"running {method} ...", flush=True)
            subprocess.run(cmd, check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
            results[method] = (np.load(out), json.loads(Path(out).with_suffix(".json").read_text()))

    info = results["fast"][1]
    seq_len, n_text = info["seq_len"], info["text_after_audio"]
    positions = list(range(seq_len - n_text, seq_len))
    ideal = flop_ideal_ratio(info["layers"], seq_len, positions)
    t = {m: r[1]["seconds"] for m, r in results.items()}
    print()
    print(f"model: {info['layers']} layers, d_model {args.d_model}; sequence {seq_len} positions "
          f"({info['audio_rows']} audio rows, {n_text} text positions after the audio); device {args.device}; "
          f"{info['layers'] * n_text} patches")
    print(f"{'method':<12}{'seconds':>10}{'peak MiB':>12}{'max |diff| vs reference':>26}")
    for method, (grid, meta) in results.items():
        diff = np.abs(grid - results["reference"][0]).max()
        print(f"{method:<12}{meta['seconds']:>10.2f}{meta['peak_mib']:>12.0f}{diff:>26.2e}")
    print(f"fast vs reference: {t['reference'] / t['fast']:.1f}x   fast vs HF loop: {t['hf_loop'] / t['fast']:.1f}x   "
          f"FLOP-ideal ratio: {ideal:.1f}x   (fast reaches {t['reference'] / t['fast'] / ideal:.0%} of ideal)")


if __name__ == "__main__":
    main()
