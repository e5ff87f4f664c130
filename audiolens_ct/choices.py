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
LONG_AUDIO = ("truncate", "skip", "error")
"""What a sweep does with a clip longer than the model's audio window: trace what the model hears (its first
`Port.audio_window` seconds, as the model's own processor cuts it), record it as an error, or refuse the run."""
