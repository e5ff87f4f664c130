"""The `Port` protocol and the port registry.

A port is everything model-specific about one LALM family: how to load its checkpoint, its prompt format, how its
audio front-end turns a waveform into embedding rows, where those rows go in the sequence, and how to build the
causal-LM "shell" around its text decoder that TransformerLens bridges. The framework (`HookedLALM`, tracing, the
CLI) only talks to ports through this class, so adding a model never touches framework code.

Ports are found by name: the built-in ones in `model_ports/`, and third-party ones through the entry-point group
`audiolens_ct.ports` (value: `module:PortClass`), or registered at run time with `register_port`.
"""

from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import Any, ClassVar

import numpy as np
import torch
from jaxtyping import Bool, Float, Int
from torch import nn
from transformer_lens.hook_points import HookPoint

from audiolens_ct.errors import PortError

ENTRY_POINT_GROUP = "audiolens_ct.ports"


class AudioHooks(nn.Module):
    """Hook points on the audio path, fired by the port while it computes the audio embeddings.

    `hook_encoder_out` sees the audio encoder's output, `hook_embeds` the rows written into the sequence
    (after the projector), shaped `[batch, n_audio_rows, d_model]`. In `run_with_cache` they appear as
    `audio.hook_encoder_out` and `audio.hook_embeds`.
    """

    def __init__(self) -> None:
        super().__init__()
        self.hook_encoder_out = HookPoint()
        self.hook_embeds = HookPoint()
        self.hook_encoder_out.name = "audio.hook_encoder_out"
        self.hook_embeds.name = "audio.hook_embeds"

    def hook_points(self) -> dict[str, HookPoint]:
        return {"audio.hook_encoder_out": self.hook_encoder_out, "audio.hook_embeds": self.hook_embeds}


@dataclass
class PortInputs:
    """What a port's `encode_prompt` returns: one sequence (batch 1) before the framework adds segments."""

    tokens: Int[torch.Tensor, "1 pos"]
    audio_features: dict[str, torch.Tensor]
    audio_mask: Bool[torch.Tensor, "1 pos"]
    extras: dict[str, Any] = field(default_factory=dict)


@dataclass
class Backbone:
    """The text decoder as a causal LM module that `build_bridge_from_module` can wrap."""

    causal_lm: nn.Module
    architecture: str
    text_config: Any


@dataclass(frozen=True)
class TinyVariant:
    """One tiny configuration the conformance suite runs a port on (`tests/test_conformance.py`).

    Attributes:
        name: the test id suffix (e.g. "gqa").
        overrides: passed to `Port.tiny` (config overrides).
        clip_seconds: the clip lengths checked (the first is also silenced for the patching checks).
        prepare_kwargs: extra `HookedLALM.prepare` arguments (e.g. a DeSTA `transcript`, so no ASR runs).
        prompt: the question, when not the gender track's (a shorter one keeps the patching checks cheap).
        patching: also run the two patching checks (TransformerLens patching vs a plain HF loop, the fast engine
            vs the reference engine), which cost one forward per (layer, position): small variants only.
    """

    name: str
    overrides: dict[str, Any] = field(default_factory=dict)
    clip_seconds: tuple[float, ...] = (0.6, 3.0)
    prepare_kwargs: dict[str, Any] = field(default_factory=dict)
    prompt: str | None = None
    patching: bool = False


class Port:
    """Base class of a model port. Subclasses fill in the class attributes and the methods below.

    Class attributes:
        name: the registry name (e.g. "qwen2-audio").
        hf_ids: example hub ids; the registry names them when no port recognises a checkpoint.
        sampling_rate: the waveform rate the audio front-end expects.
        architectures: `config.architectures` / `config.model_type` values this port loads.
        audio_window: the seconds of audio the model hears: its processor cuts a longer clip to its first
            `audio_window` seconds (None: no limit in this port).
        reads_transcript: whether the model reads an ASR transcript beside the audio, so that the tracing option
            `transcript_policy` means something for it (`twin_kwargs`, `input_record`).
        model_class, processor_class: for a native transformers family, the classes whose `from_pretrained` the
            default `load` calls (None: the port overrides `load`).
        tiny_variants: the tiny configurations the conformance suite checks this port on.
    """

    name: ClassVar[str] = ""
    hf_ids: ClassVar[tuple[str, ...]] = ()
    sampling_rate: ClassVar[int] = 16000
    architectures: ClassVar[tuple[str, ...]] = ()
    audio_window: ClassVar[float | None] = None
    reads_transcript: ClassVar[bool] = False
    model_class: ClassVar[type[nn.Module] | None] = None
    processor_class: ClassVar[type | None] = None
    tiny_variants: ClassVar[tuple[TinyVariant, ...]] = (TinyVariant("default", patching=True),)

    # -- loading -----------------------------------------------------------------------------------------------------
    def load(self, name_or_path: str, device: Any = None, dtype: torch.dtype | None = None) -> tuple[nn.Module, Any]:
        """Load `(hf_model, processor)` from a hub id or a local directory in the release layout.

        The default calls `model_class.from_pretrained` (fp32 unless `dtype`) and `processor_class.from_pretrained`.
        """
        if self.model_class is None or self.processor_class is None:
            raise NotImplementedError(f"{type(self).__name__} sets no model_class / processor_class; override load()")
        model = self.model_class.from_pretrained(name_or_path, dtype=dtype or torch.float32)
        processor = self.processor_class.from_pretrained(name_or_path)
        if device is not None:
            model = model.to(device)
        return model.eval(), processor

    def matches(self, config: dict[str, Any]) -> bool:
        """Whether a checkpoint's `config.json` (as a dict) belongs to this port."""
        names = set(config.get("architectures") or []) | {config.get("model_type")}
        return bool(names & set(self.architectures))

    def tiny(self, **config_overrides: Any) -> tuple[nn.Module, Any]:
        """A random-weight model and a working processor, built offline (`model_ports._tiny` has the parts)."""
        raise NotImplementedError

    # -- structure ---------------------------------------------------------------------------------------------------
    def backbone(self, hf_model: nn.Module) -> Backbone:
        """The causal-LM shell sharing `hf_model`'s decoder and `lm_head` (no weight copy).

        TransformerLens bridges the shell. The fast tracing engine also runs the decoder layers itself, so the
        backbone must be a decoder-only RoPE model laid out as every current transformers one (Llama, Qwen2,
        Mistral, Gemma...):
        - each decoder layer is called as a Hugging Face decoder layer,
          `layer(hidden, attention_mask=None, position_ids=..., position_embeddings=(cos, sin))`, and returns the
          hidden states (or a tuple starting with them); its attention and MLP are child modules of the layer
          (the bridge's `attn` / `mlp` components);
        - the attention module dispatches through transformers' `ALL_ATTENTION_FUNCTIONS`, chosen by
          `config._attn_implementation` (the engine registers its own function and selects it there);
        - the decoder (`causal_lm.model`) has `rotary_emb(hidden, position_ids)` giving the `(cos, sin)` the layers
          take.
        `audiolens_ct.testing.check_fast_engine` checks a port against these requirements.
        """
        raise NotImplementedError

    def tokenizer(self, processor: Any) -> Any:
        return getattr(processor, "tokenizer", processor)

    # -- inputs ------------------------------------------------------------------------------------------------------
    def encode_prompt(
        self,
        hf_model: nn.Module,
        processor: Any,
        audio: Float[np.ndarray, " samples"],
        prompt: str,
        response_prefix: str,
        **kwargs: Any,
    ) -> PortInputs:
        """Tokens, audio features and audio rows for one clip in the model's own prompt format.

        `response_prefix` is written as the start of the assistant turn, with no end-of-turn token after it.
        """
        raise NotImplementedError

    def audio_embeddings(
        self, hf_model: nn.Module, features: dict[str, torch.Tensor], extras: dict[str, Any], hooks: AudioHooks
    ) -> Float[torch.Tensor, "batch n_audio d_model"]:
        """The rows to write at the audio positions, computed by the model's own audio tower and projector.

        Must pass the encoder output through `hooks.hook_encoder_out` and the final rows through
        `hooks.hook_embeds`.
        """
        raise NotImplementedError

    def hf_logits(self, hf_model: nn.Module, inputs: Any) -> Float[torch.Tensor, "batch pos vocab"]:
        """The original model's own forward pass on `inputs` (an `LALMInput`): the conformance oracle."""
        raise NotImplementedError

    def audio_row_seconds(self, hf_model: nn.Module, processor: Any, n_rows: int) -> Float[np.ndarray, " n_rows"] | None:
        """When each of a clip's `n_rows` audio rows starts, in seconds from the clip's start (NaN for a row that
        stands for no moment, e.g. a boundary embedding), for time-wise tracing. Default None: the rows are not
        frames in time (e.g. Q-Former queries), and time windows are refused."""
        return None

    # -- the corrupted twin ------------------------------------------------------------------------------------------
    def twin_kwargs(self, extras: dict[str, Any], transcript_policy: str) -> dict[str, Any]:
        """Extra `HookedLALM.prepare` arguments for the corrupted twin of a batch-1 input whose port extras are
        `extras` (beyond the clean input's own), under the tracing option `transcript_policy`. Default: none."""
        return {}

    def input_record(self, extras: dict[str, Any]) -> dict[str, Any]:
        """JSON-ready facts about one prepared batch-1 input worth keeping in a trace record. Default: none."""
        return {}


def meta_shell(causal_lm_cls: type[nn.Module], text_config: Any, decoder: nn.Module, lm_head: nn.Module) -> nn.Module:
    """Build `causal_lm_cls(text_config)` on the meta device and point it at an existing decoder and head.

    No weights are allocated or copied: the shell's `.model` and `.lm_head` are the audio model's own modules.
    """
    with torch.device("meta"):
        shell = causal_lm_cls(text_config)
    shell.model = decoder
    shell.lm_head = lm_head
    left = [n for n, t in [*shell.named_parameters(), *shell.named_buffers()] if t.is_meta]
    if left:
        raise RuntimeError(f"{causal_lm_cls.__name__} shell still has meta tensors after sharing: {left[:5]}")
    shell.eval()
    return shell


# -- registry ----------------------------------------------------------------------------------------------------------

# The built-in ports, written here only (not also as entry points of this package): they then resolve from a source
# checkout and never from installed metadata that may be stale. Third-party ports use the entry-point group.
_BUILTIN = {
    "qwen2-audio": "model_ports.qwen2_audio:Qwen2AudioPort",
    "voxtral": "model_ports.voxtral:VoxtralPort",
    "qwen-audio": "model_ports.qwen_audio:QwenAudioPort",
    "desta2": "model_ports.desta2:Desta2Port",
    "desta2.5": "model_ports.desta25:Desta25Port",
    "qwen2.5-omni": "model_ports.qwen2_5_omni:Qwen25OmniPort",
    "audioflamingo3": "model_ports.audioflamingo3:AudioFlamingo3Port",
    "granite-speech": "model_ports.granite_speech:GraniteSpeechPort",
}
_registry: dict[str, Port] = {}


def _load_target(target: str) -> Port:
    module_name, _, attr = target.partition(":")
    obj = getattr(importlib.import_module(module_name), attr)
    return obj() if isinstance(obj, type) else obj


def register_port(port: Port | type[Port]) -> Port:
    """Register a port instance (or class) under its `name`; returns the instance."""
    instance = port() if isinstance(port, type) else port
    if not instance.name:
        raise PortError(f"{type(instance).__name__} has no `name`")
    _registry[instance.name] = instance
    return instance


def _discover() -> dict[str, str]:
    targets = {}
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        targets[ep.name] = ep.value
    return targets


def available_ports() -> list[str]:
    """Names of every port that can be resolved: registered, built-in and installed entry points."""
    names = set(_registry) | set(_discover())
    for name, target in _BUILTIN.items():
        module_name = target.partition(":")[0]
        if importlib.util.find_spec(module_name) is not None:
            names.add(name)
    return sorted(names)


def get_port(name: str | Port) -> Port:
    """Resolve a port by name: registered at run time, else built-in, else an installed entry point."""
    if isinstance(name, Port):
        return name
    if name in _registry:
        return _registry[name]
    target = _BUILTIN.get(name) or _discover().get(name)
    if target is None:
        raise PortError(f"unknown port {name!r}; available ports: {', '.join(available_ports())}")
    try:
        port = _load_target(target)
    except ModuleNotFoundError as exc:
        raise PortError(f"port {name!r} ({target}) cannot be imported: {exc}") from exc
    _registry[name] = port
    return port


def port_for_config(config: dict[str, Any], source: str) -> Port:
    """The port whose `matches` accepts a checkpoint config; a clear error naming `source` otherwise."""
    for name in available_ports():
        try:
            port = get_port(name)
        except PortError:
            continue
        if port.matches(config):
            return port
    arch = config.get("architectures") or config.get("model_type")
    raise PortError(
        f"{source}: no port recognises architecture {arch!r}; available ports: {_described(available_ports())}. "
        "Pass port=... explicitly or add a port (see CONTRIBUTING.md)."
    )


def _described(names: list[str]) -> str:
    """`name (e.g. hub id, ...)` for each port that imports, so a user sees which checkpoints each one loads."""
    out = []
    for name in names:
        try:
            ids = get_port(name).hf_ids
        except PortError:
            ids = ()
        out.append(f"{name} (e.g. {', '.join(ids)})" if ids else name)
    return "; ".join(out)
