"""`audiolens-ct`: the command line.

    audiolens-ct run MODEL DATA_DIR --out runs/qwen2 [--attributes gender emotion] [--corruption silence] ...
    audiolens-ct run MODEL --manifest clips.csv --out runs/mine
    audiolens-ct plot runs/qwen2 runs/voxtral --out figures     # overlay several runs
    audiolens-ct report runs/qwen2                              # runs/qwen2/report.html
    audiolens-ct demo

`run` traces every clip of a data set (`audiolens_ct.run_experiment`); it is resumable: re-running the same
command skips finished samples; a different setting into the same `--out` is refused. (`trace`, its name before
0.3, still works and says so; it goes in 0.4.) Bad input ends with a one-line message and exit code 2; an interrupted sweep exits with 130.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from collections import Counter
from collections.abc import Sequence
from dataclasses import fields
from pathlib import Path
from typing import Any

from audiolens_ct import choices
from audiolens_ct.config import TraceConfig
from audiolens_ct.errors import AudiolensError

# The parser is built from `choices` and `TraceConfig` alone; each command imports what it needs (torch among it)
# only after the arguments parsed, so `--help` and argument errors answer at once.

RENAMED_VERBS = {"trace": "run"}
"""Old verb -> new verb: the old one still works for one release, with a note on stderr."""

TRACE_FLAGS: dict[str, dict[str, Any]] = {
    "corruption": dict(choices=choices.CORRUPTIONS, help="how the audio is taken away: silence (paper), noise on the "
                       "audio embeddings (ROME), or swap in another clip of a different label"),
    "modes": dict(nargs="+", choices=choices.MODES,
                  help="layer: RR(l), all text after the audio restored; token: RR(l, i)"),
    "engine": dict(choices=choices.ENGINES,
                   help="fast suffix engine, or transformer_lens patching (reference; same numbers, slower)"),
    "kind": dict(choices=choices.KINDS, help="activation restored; resid_pre is the paper's hidden state"),
    "window": dict(type=int, help="restore this many consecutive layers centred on each layer (ROME uses 10 for "
                   "attn_out/mlp_out)"),
    "layer_positions": dict(choices=choices.LAYER_POSITIONS,
                            help="text restored by layer-wise tracing: after the audio (paper) or all text"),
    "seed": dict(type=int, help="seed of the noise corruption, of swap partners and of the audited cells"),
    "noise_scale": dict(type=float, help="with --corruption noise: noise std as a multiple of the embeddings' std"),
    "noise_copies": dict(type=int, help="with --corruption noise: noisy copies averaged"),
    "transcript_policy": dict(choices=choices.TRANSCRIPT_POLICIES, help="for models that read an ASR transcript "
                              "(DeSTA): the one the corrupted run reads"),
    "trace_excluded": dict(action="store_true",
                           help="also compute the patched probabilities of clips the paper's rules exclude"),
    "long_audio": dict(choices=choices.LONG_AUDIO, help="a clip longer than the model's audio window (each port "
                       "declares it; 30 s for the Whisper-based ones): trace the part the model hears (truncate, "
                       "with a warning), record it as an error (skip), or refuse the run (error)"),
    "max_batch": dict(type=int, help="rows per forward pass of the fast engine; lower it if memory runs out"),
    "audit": dict(action="store_false", help="skip the fast engine's exactness audit (a few full TransformerLens "
                  "forwards per sample that re-check its cells)"),
}
"""The `run` flag of each `TraceConfig` field (`--no-audit` for `audit`), as argparse arguments; defaults come from
`TraceConfig()`, so the two never disagree."""



class CliError(AudiolensError, ValueError):
    """Bad command-line input that argparse cannot catch by itself."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="audiolens-ct", description="Causal tracing of audio-text fusion in large audio language models."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="{run,plot,report,demo}")

    trace = commands.add_parser(
        "run", aliases=list(RENAMED_VERBS), help="trace every clip of a data set into an output directory (resumable)",
        description="Trace every sample (layer-wise and/or token-wise), then write aggregate.json and report.html. "
        "Re-running the same command resumes; other settings into the same --out are refused.",
    )  # fmt: skip
    trace.add_argument("model", help="hub id (e.g. Qwen/Qwen2-Audio-7B-Instruct) or checkpoint directory")
    trace.add_argument("data", nargs="?", type=Path,
                       help="SAKURA folder (GitHub or audiofolder layout: <Track>/metadata.csv); or use --manifest")  # fmt: skip
    trace.add_argument("--manifest", type=Path, help="CSV or JSON Lines manifest of your own clips (instead of DATA)")
    default = TraceConfig()
    for name, spec in TRACE_FLAGS.items():
        flag = "--no-audit" if name == "audit" else f"--{name.replace('_', '-')}"
        value = getattr(default, name)
        shown = "" if "action" in spec else f" (default: {' '.join(value) if isinstance(value, tuple) else value})"
        trace.add_argument(flag, dest=name, default=value, **{**spec, "help": spec["help"] + shown})
    trace.add_argument("--out", type=Path, required=True, help="output directory (records, manifest, aggregate, report)")
    trace.add_argument("--port", help="model port (default: inferred from the checkpoint's config.json)")
    trace.add_argument("--attributes", nargs="+", metavar="ATTRIBUTE",
                       help="tracks to trace: animal, emotion, gender, language (default: every one present)")  # fmt: skip
    trace.add_argument("--device", help="torch device, e.g. cuda or cpu (default: the port's choice)")
    trace.add_argument("--dtype", choices=choices.DTYPES, help="weights' dtype (default: the port's choice)")
    trace.add_argument("--limit", type=int, help="at most this many samples per attribute, in data order")
    trace.add_argument("--accept-versions", action="store_true",
                       help="resume an --out traced with other versions of audiolens-ct, torch, transformers or "
                       "transformer-lens (refused otherwise)")  # fmt: skip
    trace.add_argument("--no-progress", action="store_true", help="hide the progress bar")

    plot = commands.add_parser("plot", help="write figures of one or more output directories (overlaid)",
                               description="Layer-wise curves, token-wise heatmaps and segment curves as interactive "
                               "HTML; PNG/SVG too with --static when kaleido is installed.")  # fmt: skip
    plot.add_argument("runs", nargs="+", type=Path, metavar="OUT_DIR", help="output directories of `run`")
    plot.add_argument("--out", type=Path, help="folder for the figures (default: <first OUT_DIR>/figures)")
    plot.add_argument("--static", nargs="+", choices=("png", "svg"), default=[],
                      help="also write static images (needs the kaleido package)")  # fmt: skip

    report = commands.add_parser("report", help="write OUT_DIR/report.html (self-contained) for each directory")
    report.add_argument("runs", nargs="+", type=Path, metavar="OUT_DIR", help="output directories of `run`")

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


def trace_config(args: argparse.Namespace) -> TraceConfig:
    """The `TraceConfig` of parsed `run` arguments (`TRACE_FLAGS` gives every field its flag)."""
    return TraceConfig(**{f.name: getattr(args, f.name) for f in fields(TraceConfig)})


def _run(args: argparse.Namespace, argv: Sequence[str]) -> int:
    import torch

    from audiolens_ct.experiment import longer_than_window, prompts_of, run_experiment, run_settings
    from audiolens_ct.hub import read_checkpoint_config
    from audiolens_ct.model import HookedLALM, check_device
    from audiolens_ct.ports import get_port, port_for_config
    from audiolens_ct.report import write_report
    from audiolens_ct.store import RunStore
    from audiolens_ct.tracing.audit import versions

    config = trace_config(args)
    check_device(args.device)
    samples, dataset = _samples(args)
    model_ref = _model_ref(args.model)
    port = get_port(args.port) if args.port else port_for_config(read_checkpoint_config(model_ref), model_ref)
    store = RunStore(args.out)
    store.check(run_settings(model_ref, port, dataset, config), prompts_of(samples), versions(), args.accept_versions)
    longer_than_window(samples, port, config.long_audio)  # --long-audio error: refused before the model loads
    command = shlex.join(["audiolens-ct", *argv])
    dtype = getattr(torch, args.dtype) if args.dtype else None
    with store.lock(command):  # a second writer is refused here, before the model loads
        model = HookedLALM.from_pretrained(model_ref, port=args.port, device=args.device, dtype=dtype)
        summary = run_experiment(model, samples, args.out, config, dataset=dataset, command=command,
                                 progress=not args.no_progress, accept_versions=args.accept_versions)  # fmt: skip
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
    from audiolens_ct.demo import run_demo

    print(f"demo written to {run_demo(args.out).resolve()}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code (0 on success, 2 for bad input, 130 when interrupted)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if args.command in RENAMED_VERBS:
        print(f"audiolens-ct: note: `{args.command}` is now `{RENAMED_VERBS[args.command]}`; the old name goes in 0.4",
              file=sys.stderr)  # fmt: skip
    try:
        if args.command in ("run", *RENAMED_VERBS):
            return _run(args, argv)
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
