"""`audiolens-ct`: the command line.

    audiolens-ct run MODEL DATA_DIR --out runs/qwen2 [--attributes gender emotion] [--corruption silence] ...
    audiolens-ct run MODEL --manifest clips.csv --out runs/mine
    audiolens-ct run MODEL DATA_DIR --out runs/qwen2 --executor ray --ray-address auto   # every GPU of a Ray cluster
    audiolens-ct plot runs/qwen2 runs/voxtral --out figures     # overlay several runs
    audiolens-ct report runs/qwen2                              # runs/qwen2/report.html
    audiolens-ct lens MODEL DATA_DIR --out runs/qwen2            # logit lens: runs/qwen2/lens.json, in its report
    audiolens-ct steer MODEL DATA_DIR --out runs/qwen2 --betas -1 0 1 2   # audio–silence steering: steering.json
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
    "spans": dict(nargs="+", metavar="SPAN", help="also RR(l, span): each span's positions restored jointly at each "
                  f"layer; a span is one of {', '.join(choices.SPAN_NAMES)}, pos:START:STOP (positions, e.g. pos:-3:) "
                  "or text:WORDS (e.g. 'text:the speaker'); off unless given"),
    "time_window": dict(type=float, nargs="?", const=0.5, metavar="SECONDS", help="also RR(l, t): windows of this "
                        "many seconds of audio rows restored at each layer (bare flag: 0.5 s); off unless given"),
    "time_hop": dict(type=float, metavar="SECONDS",
                     help="with --time-window: seconds between window starts (default: the window, no overlap)"),
    "heads": dict(nargs="+", metavar="SPAN", help="also RR(l, head): one attention head's output (hook_z) restored "
                  "at the span's positions (e.g. last) at each layer, per span; off unless given"),
    "attention": dict(action="store_true", help="also the attention mass onto the audio rows per (layer, head), from "
                      "the last position and the object tokens, clean and corrupted, and the heads ranked by how it "
                      "goes with answering right (every traced clip, kept or excluded)"),
    "atp": dict(nargs="+", choices=choices.ATP_GRIDS, metavar="GRID", help="also an AtP* triage of these grids "
                f"({', '.join(choices.ATP_GRIDS)}): every cell estimated from one backward pass, the top cells "
                "recomputed exactly, compared with the exact grid when the run computes it too; off unless given"),
    "atp_budget": dict(type=float, metavar="FRACTION",
                       help="with --atp: the exact verification may cost this fraction of the exact grid"),
    "atp_graddrop": dict(action="store_true", help="with --atp: rank the cells with AtP*'s GradDrop (one more "
                         "backward pass per layer)"),
    "max_batch": dict(type=int, help="rows per forward pass of the fast engine; lower it if memory runs out"),
    "audit": dict(action="store_false", help="skip the fast engine's exactness audit (a few full TransformerLens "
                  "forwards per sample that re-check its cells)"),
}
"""The `run` flag of each `TraceConfig` field (`--no-audit` for `audit`), as argparse arguments; defaults come from
`TraceConfig()`, so the two never disagree."""



class CliError(AudiolensError, ValueError):
    """Bad command-line input that argparse cannot catch by itself."""


VIEW_ARGS: dict[str, dict[str, Any]] = {
    "model": dict(help="hub id (e.g. Qwen/Qwen2-Audio-7B-Instruct) or checkpoint directory"),
    "data": dict(nargs="?", type=Path, help="SAKURA folder (as for `run`); or use --manifest"),
    "--manifest": dict(type=Path, help="CSV or JSON Lines manifest of your own clips (instead of DATA)"),
    "--out": dict(type=Path, required=True, help="output directory; a `run` directory shows the view in its report"),
    "--port": dict(help="model port (default: inferred from the checkpoint's config.json)"),
    "--attributes": dict(nargs="+", metavar="ATTRIBUTE", help="tracks to read (default: every one present)"),
    "--device": dict(help="torch device, e.g. cuda or cpu (default: the port's choice)"),
    "--dtype": dict(choices=choices.DTYPES, help="weights' dtype (default: the port's choice)"),
    "--limit": dict(type=int, help="at most this many samples per attribute, in data order"),
    "--no-progress": dict(action="store_true", help="hide the progress bar"),
}
"""The data and model arguments of `lens` and `steer` (the same as `run`'s)."""
STEER_FLAGS: dict[str, dict[str, Any]] = {
    "--betas": dict(nargs="+", type=float, metavar="BETA", default=list(choices.STEERING_BETAS),
                    help="the β to sweep; 0 (unsteered) is always added "
                    f"(default: {' '.join(f'{b:g}' for b in choices.STEERING_BETAS)})"),
    "--layers": dict(nargs="+", type=int, metavar="LAYER",
                     help="layers the direction is averaged over and added at (default: the last layer)"),
    "--positions": dict(choices=choices.STEERING_POSITIONS, default="last", help="add β·s at the last position of "
                        "every pass (the paper) or at every position (default: %(default)s)"),
    "--calibration": dict(type=float, metavar="FRACTION", help="one direction per attribute from this seeded share of "
                          "its clips, evaluated on the rest (default: each clip steered along its own s(x))"),
    "--seed": dict(type=int, default=0, help="draws the calibration split (default: %(default)s)"),
}  # fmt: skip
VIEW_VERBS: dict[str, tuple[str, str, dict[str, dict[str, Any]]]] = {
    "lens": ("logit lens of every clip, with its audio and with silence: OUT/lens.json and figures",
             "Read P(each option) from every layer's residual stream (final norm + unembedding) at the last position "
             "and at the attribute-mentioning position of AudioLens's reversed prefix, with the clip and with "
             "silence; per attribute, means with 95% intervals and the critical layer.", {}),
    "steer": ("sweep audio–silence steering strengths β on held-out clips: OUT/steering.json and figures",
              "Add β times the audio–silence direction (clip minus silence at the last position) to the residual "
              "stream and report, per attribute and β, the option accuracy and the share of answers that change.",
              STEER_FLAGS),
}
"""The observational views beside tracing: help, description and own flags of each verb."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="audiolens-ct", description="Causal tracing of audio-text fusion in large audio language models."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="{run,lens,steer,plot,report,demo}")

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
        shown = "" if "action" in spec or value in ((), None) else f" (default: {' '.join(value) if isinstance(value, tuple) else value})"
        trace.add_argument(flag, dest=name, default=value, **{**spec, "help": spec["help"] + shown})
    trace.add_argument("--out", type=Path, required=True, help="output directory (records, manifest, aggregate, report)")
    trace.add_argument("--port", help=f"model port: {', '.join(choices.PORTS)} or an installed one (default: inferred "
                       "from the checkpoint's config.json)")  # fmt: skip
    trace.add_argument("--attributes", nargs="+", metavar="ATTRIBUTE",
                       help="tracks to trace: animal, emotion, gender, language (default: every one present)")  # fmt: skip
    trace.add_argument("--device", help="torch device, e.g. cuda or cpu (default: the port's choice)")
    trace.add_argument("--dtype", choices=choices.DTYPES, help="weights' dtype (default: the port's choice)")
    trace.add_argument("--limit", type=int, help="at most this many samples per attribute, in data order")
    trace.add_argument("--accept-versions", action="store_true",
                       help="resume an --out traced with other versions of audiolens-ct, torch, transformers or "
                       "transformer-lens (refused otherwise)")  # fmt: skip
    trace.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    spread = trace.add_argument_group("where the clips are traced (never changes the numbers; a run resumes on "
                                      "either executor)")  # fmt: skip
    spread.add_argument("--executor", choices=choices.EXECUTORS, default="local",
                        help="this process (default), or Ray workers that each load the model once on their own "
                        "device (needs pip install \"audiolens-ct[ray]\")")  # fmt: skip
    spread.add_argument("--ray-address", metavar="auto|HOST:PORT",
                        help="join a running Ray cluster (default: start a local Ray instance for this run)")
    spread.add_argument("--workers", type=int, metavar="N", help="Ray workers (default: as many as the cluster holds)")
    spread.add_argument("--gpus-per-worker", type=float, metavar="G",
                        help="GPUs each Ray worker reserves (default: 1 when the cluster has GPUs, else 0)")
    spread.add_argument("--cpus-per-worker", type=float, metavar="C",
                        help="CPUs each Ray worker reserves, and its torch threads (default: 1)")

    plot = commands.add_parser("plot", help="write figures of one or more output directories (overlaid)",
                               description="Layer-wise curves, token-wise heatmaps and segment curves as interactive "
                               "HTML; PNG/SVG too with --static when kaleido is installed.")  # fmt: skip
    plot.add_argument("runs", nargs="+", type=Path, metavar="OUT_DIR", help="output directories of `run`")
    plot.add_argument("--out", type=Path, help="folder for the figures (default: <first OUT_DIR>/figures)")
    plot.add_argument("--static", nargs="+", choices=("png", "svg"), default=[],
                      help="also write static images (needs the kaleido package)")  # fmt: skip

    report = commands.add_parser("report", help="write OUT_DIR/report.html (self-contained) for each directory")
    report.add_argument("runs", nargs="+", type=Path, metavar="OUT_DIR", help="output directories of `run`")

    for verb, (help_text, description, flags) in VIEW_VERBS.items():
        view = commands.add_parser(verb, help=help_text, description=description)
        for flag, spec in {**VIEW_ARGS, **flags}.items():
            view.add_argument(flag, **spec)

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


RAY_FLAGS = {"ray_address": "address", "workers": "workers", "gpus_per_worker": "gpus_per_worker",
             "cpus_per_worker": "cpus_per_worker"}  # fmt: skip
"""The `run` flags of a `RayExecutor` (argument -> field); None when not given."""


def run_executor(args: argparse.Namespace) -> Any:
    """The executor of parsed `run` arguments (`--executor`, and the Ray flags only with `--executor ray`)."""
    from audiolens_ct.executors import make_executor

    given = {dest: getattr(args, dest) for dest in RAY_FLAGS if getattr(args, dest) is not None}
    if given and args.executor != "ray":
        flag = "--" + next(iter(given)).replace("_", "-")
        raise CliError(f"{flag} is an option of the Ray executor; add --executor ray, or drop {flag}")
    return make_executor(args.executor, **{RAY_FLAGS[dest]: value for dest, value in given.items()})


def _run(args: argparse.Namespace, argv: Sequence[str]) -> int:
    from audiolens_ct.executors import ModelSpec
    from audiolens_ct.experiment import longer_than_window, prompts_of, run_experiment, run_settings
    from audiolens_ct.hub import read_checkpoint_config
    from audiolens_ct.model import check_device
    from audiolens_ct.ports import get_port, port_for_config
    from audiolens_ct.report import write_report
    from audiolens_ct.store import RunStore
    from audiolens_ct.tracing.audit import versions

    config = trace_config(args)
    executor = run_executor(args)
    if args.executor == "local":
        check_device(args.device)  # a Ray worker checks its own
    samples, dataset = _samples(args)
    model_ref = _model_ref(args.model)
    port = get_port(args.port) if args.port else port_for_config(read_checkpoint_config(model_ref), model_ref)
    store = RunStore(args.out)
    store.check(run_settings(model_ref, port, dataset, config), prompts_of(samples), versions(), args.accept_versions)
    longer_than_window(samples, port, config.long_audio)  # --long-audio error: refused before the model loads
    command = shlex.join(["audiolens-ct", *argv])
    model = ModelSpec(model_ref, port=args.port, device=args.device, dtype=args.dtype)
    with store.lock(command):  # a second writer is refused here, before the model loads
        summary = run_experiment(model, samples, args.out, config, executor=executor, dataset=dataset, command=command,
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


def _view(args: argparse.Namespace, argv: Sequence[str]) -> int:
    """`lens` / `steer`: one observational view of a data set, written to OUT beside any tracing run there."""
    if getattr(args, "calibration", None) is not None and not 0 < args.calibration < 1:
        raise CliError(f"--calibration must be a fraction between 0 and 1, got {args.calibration}")
    import torch

    from audiolens_ct.lens import lens_over_samples
    from audiolens_ct.model import HookedLALM, check_device
    from audiolens_ct.observations import LENS, STEERING, write_view
    from audiolens_ct.plots import view_figures
    from audiolens_ct.report import write_report
    from audiolens_ct.steering import steering_sweep
    from audiolens_ct.store import MANIFEST, RunStore, safe_name

    check_device(args.device)
    samples, _ = _samples(args)
    command = shlex.join(["audiolens-ct", *argv])
    dtype = getattr(torch, args.dtype) if args.dtype else None
    with RunStore(args.out).lock(command):
        model = HookedLALM.from_pretrained(_model_ref(args.model), port=args.port, device=args.device, dtype=dtype)
        progress = not args.no_progress
        if args.command == "lens":
            name, view = LENS, lens_over_samples(model, samples, progress=progress)
        else:
            name, view = STEERING, steering_sweep(model, samples, args.betas, args.layers, args.positions,
                                                  args.calibration, args.seed, progress=progress)  # fmt: skip
        path = write_view(args.out, name, {**view, "command": command})
        for stem, fig in view_figures(args.out, safe_name(Path(args.model).name)).items():
            (args.out / "figures").mkdir(exist_ok=True)
            fig.write_html(args.out / "figures" / f"{stem}.html", include_plotlyjs="directory")
        report = write_report(args.out) if (args.out / MANIFEST).is_file() else None
    errors = sum("error" in record for record in view["samples"])
    print(f"{len(view['samples'])} samples ({errors} errors): {path}, figures in {args.out / 'figures'}"
          + (f"; report: {report}" if report else "; `audiolens-ct run` into the same --out shows it in the report"))
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
        if args.command in VIEW_VERBS:
            return _view(args, argv)
        return _demo(args)
    except (AudiolensError, OSError) as exc:
        print(f"audiolens-ct: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("audiolens-ct: interrupted; re-run the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
