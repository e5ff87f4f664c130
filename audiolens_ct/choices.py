"""The values each tracing option may take, in one module that imports nothing heavy.

The command line builds its parser from these before anything imports torch, so `audiolens-ct --help` and argument
errors answer at once.
"""

CORRUPTIONS = ("silence", "noise", "swap")
TRANSCRIPT_POLICIES = ("clean", "corrupted")
ENGINES = ("fast", "transformer_lens")
MODES = ("layer", "token")
LAYER_POSITIONS = ("after_audio", "all_text")
KINDS = ("resid_pre", "resid_post", "attn_out", "mlp_out")
DTYPES = ("float32", "bfloat16", "float16")
PORTS = (
    "qwen2-audio", "voxtral", "qwen-audio", "desta2", "desta2.5", "qwen2.5-omni", "audioflamingo3", "granite-speech",
)
"""The built-in ports' names, for the command line's help (`ports._BUILTIN` maps each to its class; a test keeps the
two equal). Installed third-party ports come on top."""
LONG_AUDIO = ("truncate", "skip", "error")
"""What a sweep does with a clip longer than the model's audio window: trace what the model hears (its first
`Port.audio_window` seconds, as the model's own processor cuts it), record it as an error, or refuse the run."""
EXECUTORS = ("local", "ray")
"""Where a data-set run traces its samples (`executors`): this process, or the workers of a Ray cluster."""
STEERING_POSITIONS = ("last", "all")
"""Where a steering hook adds β·s (`steering.py`): the last position of every pass (the paper), or every position."""
STEERING_BETAS = (-2.0, -1.0, 0.0, 1.0, 2.0, 4.0)
"""The β a steering evaluation sweeps unless told otherwise (`audiolens-ct steer --betas`)."""

SPAN_NAMES = ("early_prompt", "object", "late_prompt", "last", "audio", "before_audio", "after_audio")
"""Named spans of a sequence (`TraceConfig.spans`, `TraceConfig.heads`): the paper's four segments, every audio row,
the text before the audio, and every text position after it. A span may also be written `pos:START:STOP` (a
Python slice of the sequence's positions; negative counts from the end) or `text:WORDS` (the tokens of the last
occurrence of WORDS in the text after the audio)."""


def parse_span(spec: str) -> tuple[str, str | slice]:
    """The form of a span spec: `("named", name)`, `("pos", slice)` or `("text", words)`; `ValueError` naming the
    spec and the forms otherwise."""
    form, _, rest = spec.partition(":")
    if not rest and spec in SPAN_NAMES:
        return "named", spec
    if form == "text" and rest:
        return "text", rest
    if form == "pos":
        bounds = rest.split(":")
        try:
            start, stop = (int(b) if b.strip() else None for b in bounds)
        except ValueError:
            pass
        else:
            return "pos", slice(start, stop)
    raise ValueError(
        f"unknown span {spec!r}; use one of {', '.join(SPAN_NAMES)}, pos:START:STOP (e.g. pos:-3:) or text:WORDS"
    )


ATP_GRIDS = ("token", "time", "head")
"""The grids an AtP* triage estimates (`TraceConfig.atp`, `tracing/triage.py`): layer x position after the audio,
layer x time window of the audio rows, layer x attention head."""
