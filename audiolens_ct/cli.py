"""`audiolens-ct`: the command line.

    audiolens-ct trace MODEL DATA_DIR --out runs/qwen2 [--attributes gender emotion] [--corruption silence] ...
    audiolens-ct trace MODEL --manifest clips.csv --out runs/mine
    audiolens-ct plot runs/qwen2 runs/voxtral --out figures     # overlay several runs
    audiolens-ct report runs/qwen2                              # runs/qwen2/report.html
    audiolens-ct demo

`trace` is resumable: re-running the same command skips finished samples; a different setting into the same
`--out` is refused. Bad input ends with a one-line message and exit code 2; an interrupted sweep exits with 130.
"""

from __future__ import annotations

import argparse
import importlib
import shlex
import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from audiolens_ct.choices import CORRUPTIONS, DTYPES, ENGINES, KINDS, LONG_AUDIO, MODES, TRANSCRIPT_POLICIES
from audiolens_ct.errors import AudiolensError

# The parser is built from `choices` alone; each command imports what it needs (torch among it) only after the
# arguments parsed, so `--help` and argument errors answer at once.




class CliError(AudiolensError, ValueError):
    """Bad command-line input that argparse cannot catch by itself."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="audiolens-ct", description="Causal tracing of audio-text fusion in large audio language models."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="{trace,plot,report,demo}")

    trace = commands.add_parser(
        "trace", help="trace a model over a data set into an output directory (resumable)",
        description="Trace every sample (layer-wise and/or token-wise), then write aggregate.json and report.html. "
        "Re-running the same command resumes; other settings into the same --out are refused.",
    )  # fmt: skip
    trace.add_argument("model", help="hub id (e.g. Qwen/Qwen2-Audio-7B-Instruct) or checkpoint directory")
    trace.add_argument("data", nargs="?", type=Path,
                       help="SAKURA folder (GitHub or audiofolder layout: <Track>/metadata.csv); or use --manifest")  # fmt: skip
    trace.add_argument("--manifest", type=Path, help="CSV or JSON Lines manifest of your own clips (instead of DATA)")
    trace.add_argument("--out", type=Path, required=True, help="output directory (records, manifest, aggregate, report)")
    trace.add_argument("--port", help="model port (default: inferred from the checkpoint's config.json)")
    trace.add_argument("--attributes", nargs="+", metavar="ATTRIBUTE",
                       help="tracks to trace: animal, emotion, gender, language (default: every one present)")  # fmt: skip
    trace.add_argument("--corruption", choices=CORRUPTIONS, default="silence",
                       help="how the audio is taken away: silence (paper), noise on the audio embeddings (ROME), "
                       "or swap in another clip of a different label (default: %(default)s)")  # fmt: skip
    trace.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES),
                       help="layer: RR(l), all text after the audio restored; token: RR(l, i) (default: both)")  # fmt: skip
    trace.add_argument("--engine", choices=ENGINES, default="fast",
                       help="fast suffix engine, or transformer_lens patching (reference; same numbers, slower) "
                       "(default: %(default)s)")  # fmt: skip
    trace.add_argument("--kind", choices=KINDS, default="resid_pre",
                       help="activation restored; resid_pre is the paper's hidden state (default: %(default)s)")  # fmt: skip
    trace.add_argument("--window", type=int, default=1,
                       help="restore this many consecutive layers centred on each layer (ROME uses 10 for "
                       "attn_out/mlp_out) (default: %(default)s)")  # fmt: skip
    trace.add_argument("--noise-scale", type=float, default=3.0,
                       help="with --corruption noise: noise std as a multiple of the embeddings' std (default: %(default)s)")  # fmt: skip
    trace.add_argument("--noise-copies", type=int, default=10,
                       help="with --corruption noise: noisy copies averaged (default: %(default)s)")  # fmt: skip
    trace.add_argument("--transcript-policy", choices=TRANSCRIPT_POLICIES, default="clean",
                       help="for models that read an ASR transcript (DeSTA): the one the corrupted run reads "
                       "(default: %(default)s)")  # fmt: skip
    trace.add_argument("--long-audio", choices=LONG_AUDIO, default="truncate",
                       help="a clip longer than the model's audio window (each port declares it; 30 s for the Whisper-based ones): "
                       "trace the part the model hears (truncate, with a warning), record it as an error (skip), or "
                       "refuse the run (error) (default: %(default)s)")  # fmt: skip
    trace.add_argument("--device", help="torch device, e.g. cuda or cpu (default: the port's choice)")
    trace.add_argument("--dtype", choices=DTYPES, help="weights' dtype (default: the port's choice)")
    trace.add_argument("--limit", type=int, help="at most this many samples per attribute, in data order")
    trace.add_argument("--seed", type=int, default=0,
                       help="seed of the noise corruption and of swap partners (default: %(default)s)")  # fmt: skip
    trace.add_argument("--max-batch", type=int, default=64,
                       help="rows per forward pass of the fast engine; lower it if memory runs out (default: %(default)s)")  # fmt: skip
    trace.add_argument("--no-audit", action="store_true",
                       help="skip the fast engine's exactness audit (a few full TransformerLens forwards per sample "
                       "that re-check its cells)")  # fmt: skip
    trace.add_argument("--accept-versions", action="store_true",
                       help="resume an --out traced with other versions of audiolens-ct, torch, transformers or "
                       "transformer-lens (refused otherwise)")  # fmt: skip
    trace.add_argument("--no-progress", action="store_true", help="hide the progress bar")

    plot = commands.add_parser("plot", help="write figures of one or more output directories (overlaid)",
                               description="Layer-wise curves, token-wise heatmaps and segment curves as interactive "
                               "HTML; PNG/SVG too with --static when kaleido is installed.")  # fmt: skip
    plot.add_argument("runs", nargs="+", type=Path, metavar="OUT_DIR", help="output directories of `trace`")
    plot.add_argument("--out", type=Path, help="folder for the figures (default: <first OUT_DIR>/figures)")
    plot.add_argument("--static", nargs="+", choices=("png", "svg"), default=[],
                      help="also write static images (needs the kaleido package)")  # fmt: skip

    report = commands.add_parser("report", help="write OUT_DIR/report.html (self-contained) for each directory")
    report.add_argument("runs", nargs="+", type=Path, metavar="OUT_DIR", help="output directories of `trace`")

    demo = commands.add_parser("demo", help="run the packaged demonstration")
    demo.add_argument("--out", type=Path, default=Path("audiolens-ct-demo"), help="output folder (default: %(default)s)")
    return parser


def _samples(args: argparse.Namespace) -> tuple[list[Any], dict[str, str]]:
    """The samples asked for, and a description of their source for the run manifest."""
    from audiolens_ct.data.manifest import load_manifest
    from audiolens_ct.data.sakura import load_sakura
    from audiolens_ct.errors import DataError

    if (args.data is None) == (args.manifest is None):
        raise CliError("give either a SAKURA data folder or --manifest FILE (exactly one)")
    if args.limit is not None and args.limit < 1:
        raise CliError(f"--limit must be at least 1, got {args.limit}")
    if args.data is not None:
        samples = load_sakura(args.data, args.attributes, limit=args.limit)
        if not samples:
            raise DataError(f"{args.data}: the metadata lists no samples")
        return samples, {"source": "sakura", "path": str(args.data.resolve())}
    samples = load_manifest(args.manifest)
    present = list(dict.fromkeys(s.attribute for s in samples))
    if args.attributes is not None:
        wanted = {a.strip().casefold() for a in args.attributes}
        missing = sorted(wanted - {a.casefold() for a in present})
        if missing:
            raise DataError(f"{args.manifest}: no samples of attribute(s) {', '.join(missing)}; it holds {', '.join(present)}")
        samples = [s for s in samples if s.attribute.casefold() in wanted]
    if args.limit is not None:
        seen: Counter[str] = Counter()
        limited = []
        for sample in samples:
            seen[sample.attribute] += 1
            if seen[sample.attribute] <= args.limit:
                limited.append(sample)
        samples = limited
    return samples, {"source": "manifest", "path": str(args.manifest.resolve())}


def _model_ref(name: str) -> str:
    """A local checkpoint as an absolute path (so the manifest names it unambiguously); a hub id as given."""
    path = Path(name).expanduser()
    return str(path.resolve()) if path.is_dir() else name


def _trace(args: argparse.Namespace, argv: Sequence[str]) -> int:
    import torch

    from audiolens_ct.model import HookedLALM, check_device, read_checkpoint_config
    from audiolens_ct.ports import get_port, port_for_config
    from audiolens_ct.report import write_report
    from audiolens_ct.store import RunStore
    from audiolens_ct.sweep import longer_than_window, prompts_of, run_sweep, sweep_settings
    from audiolens_ct.tracing.audit import versions

    if args.max_batch < 1:
        raise CliError(f"--max-batch must be at least 1, got {args.max_batch}")
    check_device(args.device)
    samples, dataset = _samples(args)
    model_ref = _model_ref(args.model)
    port = get_port(args.port) if args.port else port_for_config(read_checkpoint_config(model_ref), model_ref)
    options = dict(corruption=args.corruption, modes=args.modes, engine=args.engine, kind=args.kind,
                   window=args.window, seed=args.seed, noise_scale=args.noise_scale,
                   noise_copies=args.noise_copies, transcript_policy=args.transcript_policy,
                   long_audio=args.long_audio)  # fmt: skip
    store = RunStore(args.out)
    store.check(sweep_settings(model_ref, port.name, dataset, **options), prompts_of(samples), versions(),
                args.accept_versions)  # fmt: skip
    longer_than_window(samples, port, args.long_audio)  # --long-audio error: refused before the model loads
    command = shlex.join(["audiolens-ct", *argv])
    dtype = getattr(torch, args.dtype) if args.dtype else None
    with store.lock(command):  # a second writer is refused here, before the model loads
        model = HookedLALM.from_pretrained(model_ref, port=args.port, device=args.device, dtype=dtype)
        summary = run_sweep(model, samples, args.out, max_batch=args.max_batch, audit=not args.no_audit,
                            dataset=dataset, command=command, progress=not args.no_progress,
                            accept_versions=args.accept_versions, **options)  # fmt: skip
        report = write_report(args.out)
    print(
        f"{summary.total} samples: {summary.kept} kept, {summary.excluded} excluded, {summary.errors} errors "
        f"({summary.resumed} from an earlier run); report: {report}"
    )
    return 0


def _run_dirs(paths: Sequence[Path]) -> None:
    for path in paths:
        if not (path / "manifest.json").is_file():
            raise CliError(f"{path}: not an audiolens-ct output directory (no manifest.json)")


def _plot(args: argparse.Namespace) -> int:
    from audiolens_ct.plots import load_runs, static_export_available, write_figures

    _run_dirs(args.runs)
    if args.static and not static_export_available():
        raise CliError(f"--static {' '.join(args.static)} needs the kaleido package (pip install kaleido)")
    written = write_figures(load_runs(args.runs), args.out or args.runs[0] / "figures", static=args.static)
    print(f"wrote {len(written)} figures to {written[0].parent}")
    return 0


def _report(args: argparse.Namespace) -> int:
    from audiolens_ct.report import write_report

    _run_dirs(args.runs)
    for path in args.runs:
        print(f"wrote {write_report(path)}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    try:
        demo = importlib.import_module("audiolens_ct.demo")
    except ModuleNotFoundError as exc:
        if exc.name != "audiolens_ct.demo":
            raise
        demo = None
    run_demo: Any = getattr(demo, "run_demo", None)
    if run_demo is None:
        print("audiolens-ct: the demo is not available yet", file=sys.stderr)
        return 2
    print(f"demo written to {run_demo(args.out).resolve()}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code (0 on success, 2 for bad input, 130 when interrupted)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    try:
        if args.command == "trace":
            return _trace(args, argv)
        if args.command == "plot":
            return _plot(args)
        if args.command == "report":
            return _report(args)
        return _demo(args)
    except (AudiolensError, OSError) as exc:
        print(f"audiolens-ct: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("audiolens-ct: interrupted; re-run the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
