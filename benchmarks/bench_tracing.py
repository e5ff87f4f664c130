"""Token-wise tracing grid, four ways, side by side in one run: the fast engine (with its exactness audit), the
TransformerLens reference engine, a one-trace-per-patch nnsight loop on the plain Hugging Face model (the strongest
peer: its overhead over plain PyTorch is ~0), and a plain PyTorch pre-hook loop on the same HF model.

The model is a random Qwen2-Audio shaped like a real one in the dimensions that set the cost of tracing: a clip
long enough for >= 300 audio rows, ~40 text positions after the audio, 8 decoder layers. Each method runs in its
own child process (so its peak memory is its own) on the same weights and input, and the parent prints the
times, the speed-up ratios (the fast engine's with and without its audit), the audit's cost, the FLOP-ideal
ratio of the suffix recomputation, the max |diff| of the P grids, and peak memory.

    python benchmarks/bench_tracing.py                 # CPU, default sizes (make bench)
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

METHODS = ("fast", "reference", "nnsight", "hf_loop")
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


def nnsight_patch_loop(reference, clean, corrupted, layers, positions, target) -> np.ndarray:
    """One nnsight trace per patch on the plain HF model: the clean input's decoder-layer inputs are saved once,
    then each trace of the corrupted input writes one clean position into one layer's input."""
    from nnsight import NNsight

    from audiolens_ct.ports import get_port
    from audiolens_ct.testing import decoder_layers as layers_of

    decoder_layers = layers_of(get_port("qwen2-audio"), reference)
    names = {id(module): name for name, module in reference.named_modules()}
    lm = NNsight(reference)

    def envoy(layer: int):
        node = lm
        for part in names[id(decoder_layers[layer])].split("."):
            node = node[int(part)] if part.isdigit() else getattr(node, part)
        return node

    saved: dict = {}  # values saved inside a trace reach the enclosing function through a container
    with lm.trace(input_ids=clean.tokens, **clean.audio_features):
        for layer in layers:
            saved[layer] = envoy(layer).input.save()
    grid = np.zeros((len(layers), len(positions)))
    for i, layer in enumerate(layers):
        for j, p in enumerate(positions):
            with lm.trace(input_ids=corrupted.tokens, **corrupted.audio_features):
                envoy(layer).input[:, p] = saved[layer][:, p]
                saved["prob"] = lm.output.logits[:, -1].float().softmax(-1)[:, target].mean().save()
            grid[i, j] = float(saved["prob"])
    return grid


def run_method(args: argparse.Namespace) -> None:
    """Child process: time one method's token-wise grid and write it with the timing to `args.out`."""
    import torch

    from audiolens_ct.testing import hf_patch_loop
    from audiolens_ct.tracing import audit, token_wise
    from audiolens_ct.tracing.engine_fast import FastEngine
    from audiolens_ct.tracing.engine_reference import ReferenceEngine
    from audiolens_ct.tracing.scoring import answer_probability, answer_token

    torch.set_num_threads(args.threads)
    model, reference, clean, corrupted = build(args)
    target = answer_token(model.tokenizer, "male")
    positions = clean.text_positions
    n_layers = model.cfg.n_layers

    def metric(last_logits: torch.Tensor) -> torch.Tensor:
        return answer_probability(last_logits, target)

    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    audit_seconds = None
    with torch.no_grad():
        _, cache = model.run_with_cache(clean, names_filter=lambda n: n.endswith("hook_resid_pre"))
        model(corrupted)  # warm-up; audio rows cached on the inputs
        sync()
        t0 = time.perf_counter()
        patches = token_wise(n_layers, positions, positions)
        if args.method == "fast":
            engine = FastEngine(max_batch=args.max_batch)
            run = engine.run_corrupted(model, corrupted)
            grid = engine.evaluate(model, patches, cache, run, metric)
            sync()
            t_audit = time.perf_counter()
            # what trace() adds with audit on (token mode): the corrupted run and TOKEN_CELLS cells, full forwards
            cells = [audit.corrupted_cell(model, run, metric)]
            picks = audit.token_cells(n_layers, len(positions), seed=0, first_live_layer=1)
            cells += audit.recompute(model, "token-wise", patches, grid.numpy(), picks, cache, corrupted, metric,
                                     lambda i: dict(layer=i // len(positions), position=positions[i % len(positions)]))
            verdict = audit.verdict(cells, model)
            sync()
            audit_seconds = time.perf_counter() - t_audit
        elif args.method == "reference":
            engine = ReferenceEngine()
            grid = engine.evaluate(model, patches, cache, engine.run_corrupted(model, corrupted), metric)
        elif args.method == "nnsight":
            grid = nnsight_patch_loop(reference, clean, corrupted, range(n_layers), positions, target)
        else:
            grid = hf_patch_loop("qwen2-audio", reference, clean, corrupted, range(n_layers), positions,
                                 lambda logits: metric(logits[:, -1]))
        sync()
        seconds = time.perf_counter() - t0
    peak = (torch.cuda.max_memory_allocated() / 2**20 if args.device.startswith("cuda")
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    np.save(args.out, np.asarray(grid, dtype=np.float64).reshape(n_layers, len(positions)))
    Path(args.out).with_suffix(".json").write_text(json.dumps(dict(
        seconds=seconds, audit_seconds=audit_seconds, peak_mib=peak, seq_len=clean.shape[1],
        audit_max_abs_diff=verdict["max_abs_diff"] if audit_seconds is not None else None,
        audio_rows=len(clean.audio_positions), text_after_audio=len(positions), layers=n_layers,
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
    parser.add_argument("--method", choices=METHODS, help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.method:
        run_method(args)
        return

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for method in METHODS:
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
    fast_only = t["fast"] - info["audit_seconds"]
    print()
    print(f"model: {info['layers']} layers, d_model {args.d_model}; sequence {seq_len} positions "
          f"({info['audio_rows']} audio rows, {n_text} text positions after the audio); device {args.device}; "
          f"{info['layers'] * n_text} patches")
    print(f"{'method':<22}{'seconds':>10}{'peak MiB':>12}{'max |diff| vs reference':>26}")
    for method, (grid, meta) in results.items():
        diff = np.abs(grid - results["reference"][0]).max()
        label = "fast (audit on)" if method == "fast" else method
        print(f"{label:<22}{meta['seconds']:>10.2f}{meta['peak_mib']:>12.0f}{diff:>26.2e}")
    print(f"audit: {info['audit_seconds']:.2f} s of the fast engine's {t['fast']:.2f} s "
          f"({info['audit_seconds'] / t['fast']:.0%}); audited max |diff| {info['audit_max_abs_diff']:.1e}")
    for peer in ("reference", "nnsight", "hf_loop"):
        print(f"fast vs {peer:<10} {t[peer] / t['fast']:5.1f}x with the audit, {t[peer] / fast_only:5.1f}x without")
    print(f"FLOP-ideal ratio of suffix recomputation vs reference: {ideal:.1f}x "
          f"(fast without audit reaches {t['reference'] / fast_only / ideal:.0%} of it)")

if __name__ == "__main__":
    main()
