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
    CORRUPTIONS,
    ENGINES,
    KINDS,
    LAYER_POSITIONS,
    LONG_AUDIO,
    MODES,
    TRANSCRIPT_POLICIES,
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
        return out

    def to_dict(self) -> dict[str, Any]:
        """Every option, JSON-ready (`modes` as a list)."""
        return {**asdict(self), "modes": list(self.modes)}
