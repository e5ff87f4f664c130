"""AtP* triage against the exact grids, side by side in one run, on the demo model and held-out synthetic clips.

For each clip the paper's rules keep (silence as the corruption), and for each grid -- layer x position after the
audio (`token`), layer x 0.5-s window of audio rows (`time`), layer x attention head at the last position
(`head`) -- it times

- the exact grid: a clean forward caching the patched activations, the engine's corrupted run, every cell
  (the fast engine, the product's default; `--engine transformer_lens` for the reference);
- the triage: a clean forward, the corrupted forward with gradients and one backward (`tracing/attribution.py`),
  AtP*'s QK fix, then the engine's corrupted run and the top cells within a 10 % cost budget (`tracing/triage.py`),

and prints per grid: Spearman's rank correlation of AtP* (and of plain AtP) with the exact grid, the largest |RR|
the triage missed, the largest error of an estimated RR and where it is (layer), how many cells were verified,
the largest |verified - exact| (it must be <= 1e-6: the verified cells are the grid's own values), and the
speed-up of the triage over the exact grid (total times over all clips).

`--shaped` times the same on a random Qwen2-Audio shaped like a real one where the cost of tracing is set
(bench_tracing.py's: 8 layers, d_model 256, a 12.5-s tone, 312 audio rows), one clip, the exclusion rules not
applied (a random model's RR means nothing; its times and the verified cells' exactness do).

    python benchmarks/bench_atp.py                       # the demo model, 2 clips per label of each track
    python benchmarks/bench_atp.py --per-label 1 --grids token time
    python benchmarks/bench_atp.py --shaped              # timing at a real model's shape
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict
from functools import partial

import numpy as np
import torch

CHECK = 1e-6


def clips(per_label: int, seed: int) -> list[tuple[str, str, np.ndarray]]:
    """Held-out synthetic clips: (attribute, label, waveform) for `per_label` clips of every label."""
    from audiolens_ct.data.prompts import ATTRIBUTES, get_track
    from audiolens_ct.demo.synthetic import clip_rng, synthetic_clip

    return [
        (attribute, label, synthetic_clip(attribute, label, clip_rng(seed, attribute, label, i)))
        for attribute in ATTRIBUTES
        for label in get_track(attribute).labels
        for i in range(per_label)
    ]


def shaped_model():
    """bench_tracing.py's random Qwen2-Audio (8 layers, d_model 256, 8 query heads over 2 key/value heads)."""
    import audiolens_ct as act
    from audiolens_ct.testing import tiny_model

    hf_model, processor = tiny_model("qwen2-audio", seed=0, text_config=dict(
        hidden_size=256, intermediate_size=1024, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=2))
    return act.HookedLALM.from_hf(hf_model, processor, port="qwen2-audio")


def exact_grid(model, engine, patches, clean, corrupted, metric) -> tuple[np.ndarray, float]:
    """Every cell with the engine, timed from the clean forward on."""
    from transformer_lens.utilities import get_act_name

    start = time.perf_counter()
    names = {get_act_name(patches.kind, layer) for p in patches.patches for layer in p.layers}
    with torch.no_grad():
        _, cache = model.run_with_cache(clean, names_filter=lambda n: n in names)
    values = engine.evaluate(model, patches, cache, engine.run_corrupted(model, corrupted), metric).numpy()
    return values, time.perf_counter() - start


def _largest(values: list) -> float:
    """The largest of the values that exist (NaN when none does)."""
    return max((v for v in values if v is not None), default=float("nan"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--per-label", type=int, default=2, help="clips per label of each track")
    parser.add_argument("--seed", type=int, default=11, help="clip seed (the demo model trained on 0, held out 1)")
    parser.add_argument("--grids", nargs="+", default=["token", "time", "head"], choices=["token", "time", "head"])
    parser.add_argument("--engine", default="fast", choices=["fast", "transformer_lens"])
    parser.add_argument("--budget", type=float, default=0.1)
    parser.add_argument("--graddrop", action="store_true")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--shaped", action="store_true", help="a random model shaped like a real one (see above)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    import audiolens_ct as act
    from audiolens_ct.config import TraceConfig
    from audiolens_ct.demo import DEMO_MODEL
    from audiolens_ct.testing import tone
    from audiolens_ct.tracing.engine import get_engine
    from audiolens_ct.tracing.scoring import (
        answer_probability,
        answer_tokens,
        exclusion_reason,
        predicted_option,
    )
    from audiolens_ct.tracing.triage import atp_grid, compare, triage

    model = shaped_model() if args.shaped else act.HookedLALM.from_pretrained(DEMO_MODEL)
    chosen = [("gender", "male", tone(12.5))] if args.shaped else clips(args.per_label, args.seed)
    config = TraceConfig(engine=args.engine)
    engine = get_engine(config)
    stats: dict[str, dict[str, list]] = defaultdict(lambda: defaultdict(list))
    kept = 0
    for n, (attribute, label, wave) in enumerate(chosen):
        track = act.get_track(attribute)
        clean = model.prepare(wave, track.prompt, track.response_prefix, options=track.labels)
        corrupted = model.prepare_like(clean, np.zeros_like(wave))
        ids = answer_tokens(model.tokenizer, track.labels)
        metric = partial(answer_probability, target=ids[label])
        with torch.no_grad():
            p = {name: model(x)[:, -1] for name, x in (("clean", clean), ("corrupted", corrupted))}
        preds = {name: predicted_option(logits.float().softmax(-1).double().mean(0), ids) for name, logits in p.items()}
        p_clean, p_corrupted = float(metric(p["clean"])), float(metric(p["corrupted"]))
        if not args.shaped and exclusion_reason(label, p_clean, p_corrupted, preds["clean"], preds["corrupted"]):
            continue
        heard = len(wave) / model.port.sampling_rate
        for grid in args.grids:
            _, patches, _ = atp_grid(model, grid, config, clean, corrupted, heard)
            if n == 0 or kept == 0:  # warm-up on the first kept clip: nothing of it is counted
                exact_grid(model, engine, patches, clean, corrupted, metric)
                triage(model, patches, clean, corrupted, metric, engine, budget=args.budget, graddrop=args.graddrop)
            values, seconds = exact_grid(model, engine, patches, clean, corrupted, metric)
            result = triage(model, patches, clean, corrupted, metric, engine, budget=args.budget,
                            graddrop=args.graddrop)  # fmt: skip
            report = compare(result, values, p_clean, seconds, model.cfg.n_layers)
            rr_exact = (values - p_corrupted) / (p_clean - p_corrupted)
            rr_estimate = (result.attribution.atp_star - p_corrupted) / (p_clean - p_corrupted)
            s = stats[grid]
            s["cells"].append(len(values))
            s["verified"].append(len(result.verified))
            for key in ("rank_correlation", "rank_correlation_atp", "worst_missed_rr", "max_error_rr",
                        "verified_max_abs_diff"):  # fmt: skip
                s[key].append(report[key])
            s["exact_s"].append(seconds)
            s["triage_s"].append(result.seconds["estimate"] + result.seconds["verify"])
            s["verify_s"].append(result.seconds["verify"])
            s["error_by_layer"].append(report["error_by_layer"])
            top = int(np.argmax(np.abs(rr_exact)))
            s["top_cell"].append((rr_exact[top], rr_estimate[top], top in result.verified))
        kept += 1

    print(f"{'shaped random' if args.shaped else 'demo'} model ({model.cfg.n_layers} layers, {model.cfg.n_heads} heads); "
          f"{kept} {'clip' if args.shaped else 'kept clips'}; engine "
          f"{args.engine}; budget {args.budget:.0%}{'; GradDrop' if args.graddrop else ''}")
    print(f"{'grid':<6}{'cells':>6}{'verified':>9}{'rho AtP*':>10}{'rho AtP':>9}{'worst missed RR':>17}"
          f"{'max |RR err|':>14}{'max |ver-exact|':>17}{'exact s':>9}{'triage s':>10}{'verify/exact':>14}"
          f"{'speed-up':>10}")
    for grid, s in stats.items():
        rho = [r for r in s["rank_correlation"] if r is not None]
        rho_atp = [r for r in s["rank_correlation_atp"] if r is not None]
        missed = max((m for m in s["worst_missed_rr"] if m is not None), key=abs, default=float("nan"))
        diff = max(s["verified_max_abs_diff"])
        exact, tri = sum(s["exact_s"]), sum(s["triage_s"])
        print(f"{grid:<6}{np.mean(s['cells']):>6.0f}{np.mean(s['verified']):>9.1f}{np.mean(rho):>10.3f}"
              f"{np.mean(rho_atp):>9.3f}{missed:>17.4f}{_largest(s['max_error_rr']):>14.3f}{diff:>17.1e}{exact:>9.2f}"
              f"{tri:>10.2f}{sum(s['verify_s']) / exact:>14.0%}{exact / tri:>9.2f}x")  # fmt: skip
        assert diff <= CHECK, f"{grid}: a verified cell differs from the exact grid by {diff:.2e} > {CHECK:g}"
    print("\nwhere the linear estimate fails: mean |estimated RR - exact RR| per layer (layer 0 first), and the top")
    print("cell of each clip (exact RR -> AtP* estimate, * = verified by the triage)")
    for grid, s in stats.items():
        layered = [e for e in s["error_by_layer"] if e is not None]
        by_layer = " ".join(f"{e:.3f}" for e in np.mean(layered, axis=0)) if layered else "(P clean <= P corrupted)"
        tops = ", ".join(f"{e:.2f}->{a:.2f}{'*' if v else ''}" for e, a, v in s["top_cell"])
        print(f"{grid:<6}{by_layer}   top cells: {tops}")


if __name__ == "__main__":
    main()
