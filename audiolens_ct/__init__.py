"""audiolens-ct: causal tracing of audio-text fusion in large audio language models, on TransformerLens."""

from audiolens_ct import testing
from audiolens_ct.audio import AudioLoadError, load_audio
from audiolens_ct.inputs import InputError, LALMInput
from audiolens_ct.model import HookedLALM
from audiolens_ct.ports import CheckpointError, Port, PortError, available_ports, get_port, register_port
from audiolens_ct.tracing import ExactnessError, TraceResult, trace

__version__ = "0.2.0"

__all__ = [
    "AudioLoadError",
    "CheckpointError",
    "ExactnessError",
    "HookedLALM",
    "InputError",
    "LALMInput",
    "Port",
    "PortError",
    "available_ports",
    "get_port",
    "load_audio",
    "register_port",
    "testing",
    "trace",
    "TraceResult",
]
