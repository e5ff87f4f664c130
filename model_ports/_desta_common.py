"""What DeSTA2 and DeSTA2.5-Audio share: the "qformer_1" connector, Whisper layer taps, loading, tiny parts.

Both models read a frozen Whisper encoder at four intermediate layers ("taps"). For each tap a BERT-style
Q-Former (shared weights) lets 64 learned queries of that tap attend to the encoder states; the four query
outputs are mixed per query position with softmax weights, then a LayerNorm and a Linear map them into the LLM's
embedding space. State-dict names follow the releases exactly (`layer_prompts.{j}`, `layer_weights`,
`qformer.layer.{i}...`, `proj.{0,1}`), so released connector files load unchanged.

Tap conventions (which Whisper states an index names):
- `"hidden_states"`: the index into HF's `hidden_states` tuple: 0 = conv + position embedding, i = output of
  layer i (1-based), and the last index is the final layer *after* the encoder's final LayerNorm.
  DeSTA2's released inference code selects taps this way.
- `"layer_loop"`: the 0-based index of the encoder layer whose raw output is tapped (never layer-normed).
  DeSTA2.5 selects taps this way, and so does the DeSTA2 training code (NeMo, mode `qformer_1`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from jaxtyping import Float
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    AutoProcessor,
    AutoTokenizer,
    BertConfig,
    LlamaConfig,
    LlamaForCausalLM,
    WhisperConfig,
    WhisperFeatureExtractor,
    WhisperForConditionalGeneration,
    WhisperProcessor,
)
from transformers.models.bert.modeling_bert import BertEncoder

from audiolens_ct.errors import CheckpointError, InputError
from audiolens_ct.hub import checkpoint_file, read_checkpoint_config
from audiolens_ct.ports import AudioHooks, Backbone, Port, meta_shell
from model_ports._tiny import tiny_bpe_tokenizer

SAMPLING_RATE = 16000
TAP_CONVENTIONS = ("hidden_states", "layer_loop")
PLACEHOLDER_TOKEN = "<|reserved_special_token_87|>"

LLAMA3_SPECIAL_TOKENS = (
    "<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", PLACEHOLDER_TOKEN,
)
WHISPER_SPECIAL_TOKENS = ("<|endoftext|>", "<|startoftranscript|>", "<|en|>", "<|transcribe|>", "<|notimestamps|>")
LLAMA_CHAT_TEXT = (
    "system user assistant audio", "Focus on the input audio.", "Focus on the audio clips and instructions.",
    "Cutting Knowledge Date: December 2023", "Today Date: 26 Jul 2024",
)
"""The DeSTA prompts' own strings (roles, system prompts, the Llama-3.1 date header), learned by the tiny tokenizer."""


# -- the connector ---------------------------------------------------------------------------------------------------


class QformerConnector(nn.Module):
    """DeSTA's "qformer_1" connector: per-tap learned queries, a shared Q-Former, per-query layer mixing, proj.

    The Q-Former is transformers' `BertEncoder` built as in the releases (default `BertConfig` with the Whisper
    width and head count, `is_decoder=True`, `add_cross_attention=True`), with one fix: self-attention among
    the queries is bidirectional, as the released eager BERT computes it. (With SDPA, transformers makes a
    decoder BERT's self-attention causal; see `_bidirectional_bert_encoder`.)
    """

    def __init__(
        self, d_model: int, n_heads: int, n_layers: int, prompt_size: int, n_taps: int, llm_hidden_size: int
    ) -> None:
        super().__init__()
        self.layer_prompts = nn.ParameterList(
            [nn.Parameter(torch.randn(1, prompt_size, d_model)) for _ in range(n_taps)]
        )
        self.layer_weights = nn.Parameter(torch.zeros(prompt_size, n_taps))
        config = BertConfig(
            num_hidden_layers=n_layers, num_attention_heads=n_heads, hidden_size=d_model,
            is_decoder=True, add_cross_attention=True,
        )
        self.qformer = _bidirectional_bert_encoder(config)
        self.proj = nn.Sequential(nn.LayerNorm(d_model), nn.Linear(d_model, llm_hidden_size))

    def query(self, tap: int, states: Float[torch.Tensor, "batch frames d"]) -> Float[torch.Tensor, "batch P d"]:
        """The Q-Former output of tap `tap`'s queries attending to `states`."""
        prompts = self.layer_prompts[tap].expand(states.shape[0], -1, -1)
        return self.qformer(hidden_states=prompts, encoder_hidden_states=states).last_hidden_state

    def forward(self, taps: Sequence[Float[torch.Tensor, "batch frames d"]]) -> Float[torch.Tensor, "batch P d_llm"]:
        if len(taps) != len(self.layer_prompts):
            raise ValueError(f"the connector has {len(self.layer_prompts)} query sets but got {len(taps)} taps")
        per_tap = torch.stack([self.query(j, states) for j, states in enumerate(taps)], dim=2)  # [b, P, taps, d]
        weights = torch.softmax(self.layer_weights, dim=-1).unsqueeze(-1)  # [P, taps, 1]: per query position
        return self.proj((per_tap * weights).sum(dim=2))


def _bidirectional_bert_encoder(config: BertConfig) -> BertEncoder:
    """A `BertEncoder` whose query self-attention is unmasked under every attention implementation.

    Eager attention is pinned (the released numerics); `is_causal=False` on each self-attention module keeps it
    bidirectional should another implementation be selected later.
    """
    config._attn_implementation = "eager"
    encoder = BertEncoder(config)
    for layer in encoder.layer:
        layer.attention.self.is_causal = False
    return encoder


# -- the audio model ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DestaSettings:
    """What the forward pass needs beyond the weights.

    Attributes:
        prompt_size: queries per tap = audio rows from the connector (64 in both releases).
        target_layer_ids: the Whisper taps, read with `tap_convention`.
        tap_convention: `"hidden_states"` or `"layer_loop"` (module docstring).
        placeholder_token: the token held by audio rows in `LALMInput.tokens`.
    """

    prompt_size: int
    target_layer_ids: tuple[int, ...]
    tap_convention: str
    placeholder_token: str = PLACEHOLDER_TOKEN

    def __post_init__(self) -> None:
        if self.tap_convention not in TAP_CONVENTIONS:
            raise ValueError(f"tap_convention must be one of {TAP_CONVENTIONS}, got {self.tap_convention!r}")


class DestaAudioModel(nn.Module):
    """Whisper (encoder taps + ASR), the connector and the Llama LLM of one DeSTA model, as one module."""

    def __init__(
        self, whisper: WhisperForConditionalGeneration, connector: QformerConnector, llm: nn.Module,
        settings: DestaSettings,
    ) -> None:
        super().__init__()
        self.whisper = whisper
        self.connector = connector
        self.llm = llm
        self.settings = settings
        check_taps(settings, whisper.config.encoder_layers)

    def encoder_taps(self, input_features: Float[torch.Tensor, "batch mels frames"]) -> list[torch.Tensor]:
        """The Whisper states the connector reads, `[batch, 1500, d_whisper]` each, per `settings`."""
        encoder = self.whisper.model.encoder
        check_taps(self.settings, len(encoder.layers))
        states = whisper_layer_states(encoder, input_features.to(encoder.conv1.weight.device, encoder.conv1.weight.dtype))
        last = len(encoder.layers)
        if self.settings.tap_convention == "layer_loop":
            return [states[i + 1] for i in self.settings.target_layer_ids]
        return [encoder.layer_norm(states[i]) if i == last else states[i] for i in self.settings.target_layer_ids]

    def connector_rows(
        self, input_features: Float[torch.Tensor, "batch mels frames"], hooks: AudioHooks | None = None
    ) -> Float[torch.Tensor, "batch P d_llm"]:
        """The connector's `prompt_size` rows; `hooks.hook_encoder_out` sees the stacked taps `[b, taps, 1500, d]`."""
        taps = torch.stack(self.encoder_taps(input_features), dim=1)
        if hooks is not None:
            taps = hooks.hook_encoder_out(taps)
        return self.connector(taps.unbind(dim=1))

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        embedding = self.llm.get_input_embeddings()
        return embedding(ids.to(embedding.weight.device))


def check_taps(settings: DestaSettings, n_layers: int) -> None:
    """Every tap names an existing Whisper state under the convention, or a ValueError naming it."""
    top = n_layers if settings.tap_convention == "hidden_states" else n_layers - 1
    bad = [i for i in settings.target_layer_ids if not 0 <= i <= top]
    if bad:
        raise ValueError(
            f"target_layer_ids {list(settings.target_layer_ids)}: {bad} out of range 0..{top} for a {n_layers}-layer "
            f"Whisper encoder under tap_convention={settings.tap_convention!r}"
        )


def whisper_layer_states(encoder: nn.Module, features: Float[torch.Tensor, "batch mels frames"]) -> list[torch.Tensor]:
    """`[embeddings, output of layer 1, ..., output of layer N]`, none passed through the final LayerNorm.

    The same computation as HF `WhisperEncoder.forward` (eval mode), layer by layer, as DeSTA2.5 runs it.
    """
    x = nn.functional.gelu(encoder.conv1(features))
    x = nn.functional.gelu(encoder.conv2(x)).permute(0, 2, 1)  # [batch, 1500, d]
    x = x + encoder.embed_positions.weight[: x.shape[1]]
    states = [x]
    for layer in encoder.layers:
        x = layer(x, None)
        states.append(x)
    return states


@dataclass
class DestaProcessor:
    """The two preprocessors of a DeSTA model: Whisper's (features + ASR decoding) and the LLM tokenizer."""

    whisper: Any
    tokenizer: Any

    def features(self, wave: Any) -> Float[torch.Tensor, "1 mels 3000"]:
        """Whisper log-mel features of one 16-kHz clip, padded or cut to 30 s."""
        return self.whisper.feature_extractor(wave, sampling_rate=SAMPLING_RATE, return_tensors="pt")["input_features"]

    def transcribe(self, whisper: WhisperForConditionalGeneration, features: torch.Tensor, **generate: Any) -> str:
        """Greedy Whisper ASR with the checkpoint's own generation config, special tokens dropped."""
        device = next(whisper.parameters()).device
        with torch.no_grad():
            ids = whisper.generate(features.to(device, whisper.dtype), **generate)
        return self.whisper.batch_decode(ids, skip_special_tokens=True)[0]


class DestaPortBase(Port):
    """What both DeSTA ports do alike: loading the release layout, the backbone shell, the connector, the tiny model,
    and the transcript hooks of the corrupted twin.

    A subclass sets the class attributes below and `connector_state` (how its release stores the connector).
    Release `config.json` keys read, each with the release default when absent: the Whisper and LLM ids
    (`whisper_key`, `llm_key`), `prompt_size`, `target_layer_ids` (else `release_target_layers[whisper id]`),
    `qformer_num_hidden_layers`, `placeholder_token`, `connector_mode` and `use_lora` (both refused unless as
    released).
    """

    sampling_rate = SAMPLING_RATE
    audio_window = 30.0  # Whisper features (and its transcript) cover the first 30 s of a clip
    reads_transcript = True
    model_class: ClassVar[type[DestaAudioModel]]
    whisper_key: ClassVar[str]
    llm_key: ClassVar[str]
    default_whisper: ClassVar[str]
    default_llm: ClassVar[str]
    connector_file: ClassVar[str]
    tap_convention: str = "layer_loop"
    # The release's taps per Whisper model (`QformerConnector.__init__`); the releases differ for whisper-large-v3.
    release_target_layers: ClassVar[dict[str, list[int]]] = {
        "openai/whisper-tiny": [0, 1, 2, 3],
        "openai/whisper-small": [2, 5, 8, 11],
        "openai/whisper-medium": [5, 11, 17, 23],
    }
    # The tiny model: Whisper mel bins, chat template, LLM config and Q-Former depth of the release it mimics.
    tiny_mels: ClassVar[int]
    tiny_chat_template: ClassVar[str]
    tiny_llm_config: ClassVar[dict[str, Any]] = {}
    tiny_qformer_layers: ClassVar[int] = 2

    def __init__(self, whisper: str | None = None, llm: str | None = None) -> None:
        self.whisper_override = whisper
        self.llm_override = llm

    def matches(self, config: dict[str, Any]) -> bool:
        return super().matches(config) or {self.whisper_key, self.llm_key} <= config.keys()

    def connector_state(self, path: Path) -> dict[str, torch.Tensor]:
        """The connector's state dict from the release file `path` (`connector_file`)."""
        raise NotImplementedError

    def load(self, name_or_path: str, device: Any = None, dtype: torch.dtype | None = None) -> tuple[nn.Module, Any]:
        config = read_checkpoint_config(name_or_path)
        source = f"{name_or_path}/config.json"
        if config.get("connector_mode", "qformer_1") != "qformer_1":
            raise CheckpointError(f"{source}: connector_mode {config['connector_mode']!r} is not supported (qformer_1 is)")
        if config.get("use_lora"):
            raise CheckpointError(f"{source}: use_lora=true checkpoints (LoRA on the LLM) are not supported")
        whisper_id = config.get(self.whisper_key, self.default_whisper)
        llm_id = config.get(self.llm_key, self.default_llm)
        settings = DestaSettings(
            prompt_size=int(config.get("prompt_size", 64)),
            target_layer_ids=target_layers(config, whisper_id, self.release_target_layers, source),
            tap_convention=self.tap_convention,
            placeholder_token=config.get("placeholder_token", PLACEHOLDER_TOKEN),
        )
        path = checkpoint_file(name_or_path, self.connector_file, f"the {self.name} connector weights")
        state = self.connector_state(path)
        whisper, whisper_processor = load_pretrained(
            "Whisper model", "whisper", WhisperForConditionalGeneration, AutoProcessor,
            self.whisper_override or whisper_id, torch.float32, name_or_path,
        )  # fmt: skip
        llm, tokenizer = load_pretrained(
            "LLM", "llm", AutoModelForCausalLM, AutoTokenizer, self.llm_override or llm_id, dtype or torch.float32,
            name_or_path,
        )  # fmt: skip
        connector = build_connector(whisper.config, llm.config, settings, int(config.get("qformer_num_hidden_layers", 2)))
        load_connector_state(connector, state, str(path))
        model = self.model_class(whisper, connector, llm, settings).eval()
        if device is not None:
            model = model.to(device)
        return model, DestaProcessor(whisper_processor, tokenizer)

    def tiny(self, **overrides: Any) -> tuple[nn.Module, Any]:
        """Random weights: a 4-layer Whisper (d 32) tapped at [0, 1, 2, 3], a Q-Former with 64 queries, a 2-layer
        Llama (d 64, GQA). Overrides: `whisper_config`, `llm_config` (dicts), `prompt_size`, `target_layer_ids`,
        `qformer_layers`, `tap_convention`."""
        whisper, whisper_processor = tiny_whisper(self.tiny_mels, **overrides.pop("whisper_config", {}))
        tokenizer = tiny_llama_tokenizer(self.tiny_chat_template)
        llm = tiny_llama(tokenizer, **{**self.tiny_llm_config, **overrides.pop("llm_config", {})})
        settings = DestaSettings(
            prompt_size=overrides.pop("prompt_size", 64),
            target_layer_ids=tuple(overrides.pop("target_layer_ids", (0, 1, 2, 3))),
            tap_convention=overrides.pop("tap_convention", self.tap_convention),
        )
        qformer_layers = overrides.pop("qformer_layers", self.tiny_qformer_layers)
        connector = build_connector(whisper.config, llm.config, settings, qformer_layers)
        if overrides:
            raise TypeError(f"{self.name} tiny() got unknown overrides {sorted(overrides)}")
        return self.model_class(whisper, connector, llm, settings).eval(), DestaProcessor(whisper_processor, tokenizer)

    def backbone(self, hf_model: nn.Module) -> Backbone:
        llm = hf_model.llm
        shell = meta_shell(type(llm), llm.config, llm.model, llm.lm_head)
        return Backbone(shell, type(llm).__name__, llm.config)

    def twin_kwargs(self, extras: dict[str, Any], transcript_policy: str) -> dict[str, Any]:
        """The clean clip's transcript ("clean": only the audio rows differ), or None so that the twin's own
        audio is transcribed ("corrupted")."""
        if transcript_policy == "clean":
            return {"transcript": extras["transcript"]}
        if transcript_policy == "corrupted":
            return {"transcript": None}
        raise InputError(f"unknown transcript policy {transcript_policy!r}; use 'clean' or 'corrupted'")

    def input_record(self, extras: dict[str, Any]) -> dict[str, Any]:
        return {"transcript": extras["transcript"]}


# -- loading release layouts -------------------------------------------------------------------------------------------


def load_pretrained(
    what: str, option: str, model_class: Any, processor_class: Any, model_id: str, dtype: torch.dtype, source: str
) -> tuple[nn.Module, Any]:
    """`model_class` and `processor_class` from a hub id or a local directory (Whisper or the LLM of a release,
    named by id in its config.json); a CheckpointError names the id and the port option that replaces it."""
    try:
        model = model_class.from_pretrained(model_id, dtype=dtype)
        processor = processor_class.from_pretrained(model_id)
    except Exception as exc:  # from_pretrained raises OSError, ValueError, hub errors...
        raise CheckpointError(
            f"{source}: cannot load the {what} {model_id!r} ({type(exc).__name__}: {exc}); "
            f"download it, or pass {option}=<local directory> to the port"
        ) from exc
    return model.eval(), processor


def build_connector(whisper_config: Any, llm_config: Any, settings: DestaSettings, qformer_layers: int) -> QformerConnector:
    """The connector the configs and settings describe, with random weights."""
    return QformerConnector(
        d_model=whisper_config.d_model, n_heads=whisper_config.encoder_attention_heads, n_layers=qformer_layers,
        prompt_size=settings.prompt_size, n_taps=len(settings.target_layer_ids), llm_hidden_size=llm_config.hidden_size,
    )


def load_connector_state(connector: QformerConnector, state: dict[str, torch.Tensor], source: str) -> None:
    """Load a released connector state dict strictly; a CheckpointError names missing, extra or misshaped keys."""
    own = connector.state_dict()
    missing, unexpected = sorted(own.keys() - state.keys()), sorted(state.keys() - own.keys())
    if missing or unexpected:
        raise CheckpointError(
            f"{source}: connector keys do not match the model built from config.json: "
            f"missing {missing[:6]}{' ...' if len(missing) > 6 else ''}, "
            f"unexpected {unexpected[:6]}{' ...' if len(unexpected) > 6 else ''}"
        )
    for key, tensor in state.items():
        if tuple(tensor.shape) != tuple(own[key].shape):
            raise CheckpointError(
                f"{source}: {key} has shape {tuple(tensor.shape)} but the model built from config.json expects "
                f"{tuple(own[key].shape)}"
            )
    connector.load_state_dict(state)


def target_layers(config: dict[str, Any], whisper_id: str, table: dict[str, list[int]], source: str) -> tuple[int, ...]:
    """The taps: `target_layer_ids` of config.json when present, else the release's table keyed by Whisper id."""
    if "target_layer_ids" in config:
        return tuple(int(i) for i in config["target_layer_ids"])
    if whisper_id not in table:
        raise CheckpointError(
            f"{source}: config.json names Whisper {whisper_id!r}, for which the release defines no target layers "
            f"(known: {sorted(table)}); add \"target_layer_ids\" to config.json"
        )
    return tuple(table[whisper_id])


# -- tiny parts (offline, random weights) -----------------------------------------------------------------------------

# Llama-3 chat format: <|begin_of_text|> once, then per message a header, the trimmed content and <|eot_id|>.
LLAMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n' + m['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

# Llama-3.1 chat format: as Llama-3, but the system turn always opens with the knowledge/today date header.
LLAMA31_CHAT_TEMPLATE = (
    "{{ bos_token }}{% if date_string is not defined %}{% set date_string = '26 Jul 2024' %}{% endif %}"
    "{% if messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] | trim %}"
    "{% set rest = messages[1:] %}{% else %}{% set system = '' %}{% set rest = messages %}{% endif %}"
    "{{ '<|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: December 2023\nToday Date: '"
    " + date_string + '\n\n' + system + '<|eot_id|>' }}"
    "{% for m in rest %}"
    "{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n' + m['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)


def tiny_llama_tokenizer(chat_template: str) -> Any:
    """A small BPE tokenizer that behaves like Llama-3's where DeSTA depends on it.

    It has the Llama-3 special tokens and the placeholder, prepends `<|begin_of_text|>` when called with
    `add_special_tokens=True`, keeps "\\n\\n" as one token (Llama-3's 271), and carries `chat_template`.
    """
    tokenizer = tiny_bpe_tokenizer(
        LLAMA3_SPECIAL_TOKENS, LLAMA_CHAT_TEXT, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>",
        pad_token="<|eot_id|>",
    )
    tokenizer.add_tokens(["\n\n"])
    tokenizer.add_bos_token = True
    tokenizer.chat_template = chat_template
    return tokenizer


def tiny_whisper(n_mels: int, **overrides: Any) -> tuple[WhisperForConditionalGeneration, WhisperProcessor]:
    """A random-weight Whisper (1500 encoder positions, 30-s features) and a `WhisperProcessor` built in code."""
    tokenizer = tiny_bpe_tokenizer(
        WHISPER_SPECIAL_TOKENS, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
    )
    eot, sot = tokenizer.convert_tokens_to_ids(["<|endoftext|>", "<|startoftranscript|>"])
    config = dict(
        vocab_size=len(tokenizer), num_mel_bins=n_mels, d_model=32, encoder_layers=4, decoder_layers=1,
        encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64,
        max_source_positions=1500, max_target_positions=448, pad_token_id=eot, bos_token_id=eot, eos_token_id=eot,
        decoder_start_token_id=sot, begin_suppress_tokens=None,
    )
    config.update(overrides)
    whisper = WhisperForConditionalGeneration(WhisperConfig(**config)).eval()
    whisper.generation_config.max_length = 12
    processor = WhisperProcessor(feature_extractor=WhisperFeatureExtractor(feature_size=n_mels), tokenizer=tokenizer)
    return whisper, processor


def tiny_llama(tokenizer: Any, **overrides: Any) -> LlamaForCausalLM:
    """A random-weight Llama (GQA, untied head, rope theta 500000 as in Llama-3) over `tokenizer`'s vocabulary."""
    config = dict(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=16384, rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
        rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    config.update(overrides)
    return LlamaForCausalLM(LlamaConfig(**config)).eval()
