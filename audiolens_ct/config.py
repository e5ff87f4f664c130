"""`TraceConfig`: every option of causal tracing, in one frozen, validated value.

`trace` (one clip), `run_experiment` (a data set), the command line and the run manifest all read the same
object, so an option is added in one place: a field here (with its check in `__post_init__`), and the code that
uses it. Like TransformerLens's `HookedTransformerConfig`, it is plain data: `dataclasses.asdict(config)` is
JSON-ready, and a run manifest stores `config.settings()`, the fields that change the numbers.

This module imports nothing heavy (the command line builds a config before torch is imported).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

from audiolens_ct.choices import (
    ATP_GRIDS,
    CORRUPTIONS,
    ENGINES,
    KINDS,
    LAYER_POSITIONS,
    LONG_AUDIO,
    MODES,
    TRANSCRIPT_POLICIES,
    parse_span,
)
from audiolens_ct.errors import InputError

_SPEED_ONLY = {"speed_only": True}
"""Field metadata: the option changes how fast or how checked a run is, never its numbers (not in `settings()`)."""


@dataclass(frozen=True)
class TraceConfig:
    """The options of causal tracing (defaults: the paper's setting).

    Attributes:
        corruption: how the audio is taken away: "silence" (the paper), "noise" (ROME: `noise_scale` x the audio
            rows' std, `noise_copies` copies averaged, drawn from `seed`), or "swap" (another clip's audio).
        modes: "layer" (RR(l): every text position after the audio restored at layer l) and/or "token" (RR(l, i)).
        engine: "fast" (suffix recomputation) or "transformer_lens" (one full forward per patch, the reference).
        kind: the activation restored: "resid_pre" (the paper's hidden state), "resid_post", "attn_out", "mlp_out".
        window: restore `window` consecutive layers centred on each layer (ROME's option for attn/mlp).
        layer_positions: layer-wise tracing restores the text "after_audio" (the paper) or "all_text".
        seed: draws the noise, the swap partner and the audited cells.
        transcript_policy: for ports that read an ASR transcript (`Port.reads_transcript`, DeSTA): the corrupted
            run reads the clean clip's transcript ("clean": only the audio rows differ) or its own ("corrupted").
        trace_excluded: also compute the patched probabilities of clips the paper's rules exclude (no RR).
        long_audio: data-set runs: a clip longer than the model's audio window is traced as heard ("truncate"),
            recorded as an error ("skip"), or refuses the run ("error").
        spans: group-wise tracing, RR(l, span): each span's positions restored jointly at layer l (with `kind`
            and `window`), e.g. ("object", "audio", "pos:-3:", "text:the speaker"); `choices.SPAN_NAMES` lists the
            named ones (`tracing/spans.py`). Empty: not run.
        time_window: time-wise tracing, RR(l, t): windows of this many seconds of audio rows restored at layer l
            (with `kind` and `window`; `tracing/timeline.py`). None: not run.
        time_hop: seconds between the starts of two time windows (None: `time_window`, no overlap).
        heads: head-wise tracing, RR(l, head) for each span: one query head's output (`hook_z`) restored at the
            span's positions at layer l, e.g. ("last",). Empty: not run.
        attention: attention to the audio: per (layer, head), the attention mass from the last position and from
            the object tokens onto the audio rows, clean and corrupted (`tracing/attention.py`); every traced clip,
            kept or excluded, so that a set ranks heads by how their attention goes with answering right.
        atp: the grids to triage with AtP* (`choices.ATP_GRIDS`: "token", "time", "head"): every cell estimated
            from two forwards and one backward, the top cells recomputed exactly (`tracing/triage.py`); compared
            with the exact grid when the same run computes it too. The time grid uses `time_window` (0.5 s when
            None), the head grid the first of `heads` ("last" when empty). Empty: not run.
        atp_budget: the top cells' exact verification may cost this fraction of the exact grid (0 < b <= 1).
        atp_graddrop: rank the cells with AtP*'s GradDrop (one more backward pass per layer).
        max_batch: the fast engine's memory bound: rows (patches x corrupted copies) per pass.
        audit: recompute a few fast-engine cells with full TransformerLens forwards and raise `ExactnessError`
            beyond the dtype's tolerance (`tracing/audit.py`).
    """

    corruption: str = "silence"
    modes: tuple[str, ...] = MODES
    engine: str = "fast"
    kind: str = "resid_pre"
    window: int = 1
    layer_positions: str = "after_audio"
    seed: int = 0
    noise_scale: float = 3.0
    noise_copies: int = 10
    transcript_policy: str = "clean"
    trace_excluded: bool = False
    long_audio: str = "truncate"
    spans: tuple[str, ...] = ()
    time_window: float | None = None
    time_hop: float | None = None
    heads: tuple[str, ...] = ()
    attention: bool = False
    atp: tuple[str, ...] = ()
    atp_budget: float = 0.1
    atp_graddrop: bool = False
    max_batch: int = field(default=64, metadata=_SPEED_ONLY)
    audit: bool = field(default=True, metadata=_SPEED_ONLY)

    def __post_init__(self) -> None:
        for name, allowed in (
            ("corruption", CORRUPTIONS), ("engine", ENGINES), ("kind", KINDS), ("layer_positions", LAYER_POSITIONS),
            ("transcript_policy", TRANSCRIPT_POLICIES), ("long_audio", LONG_AUDIO),
        ):  # fmt: skip
            value = getattr(self, name)
            if value not in allowed:
                raise InputError(f"unknown {name} {value!r}; use one of {', '.join(allowed)}")
        modes = (self.modes,) if isinstance(self.modes, str) else tuple(self.modes)
        unknown = [m for m in modes if m not in MODES]
        if unknown or not modes:
            raise InputError(f"unknown tracing modes {unknown or list(modes)}; use any of {', '.join(MODES)}")
        object.__setattr__(self, "modes", tuple(m for m in MODES if m in modes))
        for name in ("window", "noise_copies", "max_batch"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise InputError(f"{name} must be an integer >= 1, got {getattr(self, name)!r}")
        if not self.noise_scale > 0:
            raise InputError(f"noise_scale must be > 0, got {self.noise_scale!r}")
        for name in ("spans", "heads"):
            specs = (getattr(self, name),) if isinstance(getattr(self, name), str) else tuple(getattr(self, name))
            for spec in specs:
                try:
                    parse_span(spec)
                except ValueError as exc:
                    raise InputError(f"{name}: {exc}") from None
            object.__setattr__(self, name, tuple(dict.fromkeys(specs)))
        for name in ("time_window", "time_hop"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not (isinstance(value, (int, float)) and value > 0)):
                raise InputError(f"{name} must be a number of seconds > 0, got {value!r}")
        if self.time_hop is not None and self.time_window is None:
            raise InputError("time_hop needs time_window (the seconds each window spans)")
        grids = (self.atp,) if isinstance(self.atp, str) else tuple(self.atp)
        if any(grid not in ATP_GRIDS for grid in grids):
            raise InputError(f"unknown AtP* grid(s) in {list(grids)}; use any of {', '.join(ATP_GRIDS)}")
        object.__setattr__(self, "atp", tuple(g for g in ATP_GRIDS if g in grids))
        if self.atp and self.window != 1:
            raise InputError(f"AtP* estimates patches of one layer each; atp needs window=1, got window={self.window}")
        if not (isinstance(self.atp_budget, (int, float)) and 0 < self.atp_budget <= 1):
            raise InputError(f"atp_budget must be a fraction in (0, 1], got {self.atp_budget!r}")

    @classmethod
    def make(cls, config: TraceConfig | None = None, **options: Any) -> TraceConfig:
        """`config` (default: the paper's setting) with `options` replaced; an unknown option names the valid ones."""
        unknown = sorted(set(options) - {f.name for f in fields(cls)})
        if unknown:
            raise InputError(
                f"unknown tracing option(s) {', '.join(unknown)}; TraceConfig has {', '.join(f.name for f in fields(cls))}"
            )
        return replace(config or cls(), **options)

    def settings(self, reads_transcript: bool = True) -> dict[str, Any]:
        """The options that change a run's numbers, JSON-ready: what a run manifest records and a resume checks.

        Options that cannot matter are None: the noise parameters unless `corruption == "noise"`, the transcript
        policy for a port that reads no transcript.
        """
        out = {f.name: getattr(self, f.name) for f in fields(self) if not f.metadata.get("speed_only")}
        out["modes"] = list(self.modes)
        if self.corruption != "noise":
            out["noise_scale"] = out["noise_copies"] = None
        if not reads_transcript:
            out["transcript_policy"] = None
        off = {"spans": not self.spans, "heads": not self.heads, "time_window": self.time_window is None,
               "time_hop": self.time_window is None, "attention": not self.attention, "atp": not self.atp,
               "atp_budget": not self.atp, "atp_graddrop": not self.atp}  # fmt: skip
        out.update({name: list(out[name]) for name in ("spans", "heads", "atp")})
        return {key: value for key, value in out.items() if not off.get(key)}  # runs traced before stay resumable

    def to_dict(self) -> dict[str, Any]:
        """Every option, JSON-ready (tuples as lists)."""
        return {key: list(value) if isinstance(value, tuple) else value for key, value in asdict(self).items()}
