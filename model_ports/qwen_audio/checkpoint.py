"""The Qwen-Audio release checkpoint layout: `config.json` (QWen v1 names), `qwen.tiktoken`, and the weights under
release names (`transformer.h.{i}.attn.c_attn` = q | k | v ...), read into and written from `QwenAudioModel`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from transformers import Qwen2AudioEncoderConfig, Qwen2Config
from transformers.models.qwen2.modeling_qwen2 import Qwen2RotaryEmbedding

from audiolens_ct.errors import CheckpointError
from audiolens_ct.hub import checkpoint_directory, read_json
from model_ports.qwen_audio.modeling import QwenAudioModel
from model_ports.qwen_audio.processing import CHAT_FORMATS, QwenAudioProcessor
from model_ports.qwen_audio.tokenization import QwenAudioTokenizer


def _release_names(n_layers: int, n_audio_layers: int) -> list[tuple[str, tuple[str, ...]]]:
    """(release key, native keys) for every tensor; a release tensor with several native keys is their row-wise
    concatenation (`c_attn` = q | k | v). The SiLU of the release MLP is on `w2`, so `w2` is the gate."""
    pairs = [("transformer.wte.weight", ("llm.model.embed_tokens.weight",))]
    for i in range(n_layers):
        r, n = f"transformer.h.{i}.", f"llm.model.layers.{i}."
        pairs += [
            (r + "ln_1.weight", (n + "input_layernorm.weight",)),
            (r + "attn.c_attn.weight", tuple(f"{n}self_attn.{p}_proj.weight" for p in "qkv")),
            (r + "attn.c_attn.bias", tuple(f"{n}self_attn.{p}_proj.bias" for p in "qkv")),
            (r + "attn.c_proj.weight", (n + "self_attn.o_proj.weight",)),
            (r + "ln_2.weight", (n + "post_attention_layernorm.weight",)),
            (r + "mlp.w1.weight", (n + "mlp.up_proj.weight",)),
            (r + "mlp.w2.weight", (n + "mlp.gate_proj.weight",)),
            (r + "mlp.c_proj.weight", (n + "mlp.down_proj.weight",)),
        ]
    pairs += [("transformer.ln_f.weight", ("llm.model.norm.weight",)), ("lm_head.weight", ("llm.lm_head.weight",))]
    a, e = "transformer.audio.", "audio.encoder."
    audio = [
        ("conv1.weight", "conv1.weight"), ("conv1.bias", "conv1.bias"), ("conv2.weight", "conv2.weight"),
        ("conv2.bias", "conv2.bias"), ("positional_embedding", "embed_positions.weight"),
        ("ln_post.weight", "layer_norm.weight"), ("ln_post.bias", "layer_norm.bias"),
    ]
    for i in range(n_audio_layers):
        block = {
            "attn.query.weight": "self_attn.q_proj.weight", "attn.query.bias": "self_attn.q_proj.bias",
            "attn.key.weight": "self_attn.k_proj.weight",
            "attn.value.weight": "self_attn.v_proj.weight", "attn.value.bias": "self_attn.v_proj.bias",
            "attn.out.weight": "self_attn.out_proj.weight", "attn.out.bias": "self_attn.out_proj.bias",
            "attn_ln.weight": "self_attn_layer_norm.weight", "attn_ln.bias": "self_attn_layer_norm.bias",
            "mlp.0.weight": "fc1.weight", "mlp.0.bias": "fc1.bias", "mlp.2.weight": "fc2.weight", "mlp.2.bias": "fc2.bias",
            "mlp_ln.weight": "final_layer_norm.weight", "mlp_ln.bias": "final_layer_norm.bias",
        }
        audio += [(f"blocks.{i}.{k}", f"layers.{i}.{v}") for k, v in block.items()]
    pairs += [(a + k, (e + v,)) for k, v in audio]
    pairs += [(a + k, ("audio." + k,)) for k in ("proj.weight", "proj.bias", "audio_bos_eos_token.weight")]
    return pairs


def _configs_from_release(cfg: dict[str, Any], source: str) -> tuple[Qwen2Config, Qwen2AudioEncoderConfig, int, int | None]:
    """Native configs, `audio_start_id` and `seq_length` from a release `config.json` (defaults as `QWenConfig`)."""
    audio = cfg.get("audio")
    if not isinstance(audio, dict):
        raise CheckpointError(f"{source}: no 'audio' section; this is a text-only QWen checkpoint, not Qwen-Audio")

    def need(section: dict[str, Any], key: str, where: str = "") -> Any:
        if key not in section:
            raise CheckpointError(f"{source}: missing {where}{key!r}")
        return section[key]

    hidden, heads = need(cfg, "hidden_size"), need(cfg, "num_attention_heads")
    unsupported = {
        "rotary_pct": cfg.get("rotary_pct", 1.0) != 1.0,
        "no_bias": not cfg.get("no_bias", True),
        "tie_word_embeddings": cfg.get("tie_word_embeddings", False),
        "kv_channels": cfg.get("kv_channels", 128) * heads != hidden,
        "audio.avg_pool": not audio.get("avg_pool", True),
        "audio.add_audio_bos_eos_token": not audio.get("add_audio_bos_eos_token", True),
        "audio.output_dim": need(audio, "output_dim", "audio.") != hidden,
    }
    bad = [key for key, is_bad in unsupported.items() if is_bad]
    if bad:
        raise CheckpointError(f"{source}: unsupported values for the Qwen-Audio port: {', '.join(bad)}")
    text_config = Qwen2Config(
        vocab_size=need(cfg, "vocab_size"), hidden_size=hidden, intermediate_size=need(cfg, "intermediate_size") // 2,
        num_hidden_layers=need(cfg, "num_hidden_layers"), num_attention_heads=heads, num_key_value_heads=heads,
        rms_norm_eps=cfg.get("layer_norm_epsilon", 1e-6), max_position_embeddings=cfg.get("max_position_embeddings", 8192),
        rope_parameters={"rope_type": "default", "rope_theta": float(cfg.get("rotary_emb_base", 10000))},
        tie_word_embeddings=False,
    )
    n_state = need(audio, "n_state", "audio.")
    audio_config = Qwen2AudioEncoderConfig(
        num_mel_bins=need(audio, "n_mels", "audio."), d_model=n_state, encoder_layers=need(audio, "n_layer", "audio."),
        encoder_attention_heads=need(audio, "n_head", "audio."), encoder_ffn_dim=4 * n_state,
        max_source_positions=need(audio, "n_ctx", "audio."),
    )
    long_context = cfg.get("use_dynamic_ntk", True) or cfg.get("use_logn_attn", True)
    seq_length = cfg.get("seq_length", 2048) if long_context else None
    return text_config, audio_config, need(audio, "audio_start_id", "audio."), seq_length


def release_config(model: QwenAudioModel) -> dict[str, Any]:
    """The release `config.json` of a model (QWen v1 names)."""
    text, enc = model.llm.config, model.audio.encoder.config
    if text.num_key_value_heads != text.num_attention_heads:
        raise ValueError("the Qwen-Audio release layout needs num_key_value_heads == num_attention_heads")
    if enc.encoder_ffn_dim != 4 * enc.d_model:
        raise ValueError("the Qwen-Audio release layout needs encoder_ffn_dim == 4 * d_model")
    return {
        "architectures": ["QWenLMHeadModel"], "model_type": "qwen",
        "hidden_size": text.hidden_size, "num_attention_heads": text.num_attention_heads,
        "num_hidden_layers": text.num_hidden_layers, "kv_channels": text.hidden_size // text.num_attention_heads,
        "intermediate_size": 2 * text.intermediate_size, "layer_norm_epsilon": text.rms_norm_eps,
        "rotary_emb_base": text.rope_parameters["rope_theta"], "rotary_pct": 1.0,
        "seq_length": model.seq_length or 2048, "max_position_embeddings": text.max_position_embeddings,
        "use_dynamic_ntk": model.seq_length is not None, "use_logn_attn": model.seq_length is not None,
        "no_bias": True, "tie_word_embeddings": False, "vocab_size": text.vocab_size,
        # as the release file: precision chosen by the loader (QWenConfig defaults to fp16=True otherwise)
        "bf16": False, "fp16": False, "fp32": False, "emb_dropout_prob": 0.0, "attn_dropout_prob": 0.0,
        "auto_map": {"AutoConfig": "configuration_qwen.QWenConfig", "AutoModelForCausalLM": "modeling_qwen.QWenLMHeadModel"},
        "audio": {
            "n_mels": enc.num_mel_bins, "n_ctx": enc.max_source_positions, "n_state": enc.d_model,
            "n_head": enc.encoder_attention_heads, "n_layer": enc.encoder_layers, "output_dim": text.hidden_size,
            "avg_pool": True, "add_audio_bos_eos_token": True, "audio_start_id": model.audio_start_id,
        },
    }


def release_state_dict(model: QwenAudioModel) -> dict[str, torch.Tensor]:
    """The model's weights under their release names (c_attn re-concatenated from q, k, v).

    Parameters are looked up by attribute path, which also works once a `HookedLALM` has wrapped the LLM's modules.
    """
    names = _release_names(model.llm.config.num_hidden_layers, model.audio.encoder.config.encoder_layers)
    return {key: torch.cat([model.get_parameter(n).detach() for n in parts]).contiguous() for key, parts in names}


def save_release_checkpoint(
    model: QwenAudioModel, processor: QwenAudioProcessor, directory: str | Path, shards: int = 1,
    weights_format: str = "safetensors",
) -> Path:
    """Write `model` in the release layout: config.json, generation_config.json (chat_format), qwen.tiktoken and
    the weights as `model.safetensors` / `pytorch_model.bin`, or `shards` files plus an index json."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(release_config(model), indent=2))
    generation = {"chat_format": processor.chat_format, "eos_token_id": processor.tokenizer.eos_token_id}
    (directory / "generation_config.json").write_text(json.dumps(generation, indent=2))
    processor.tokenizer.save(directory / "qwen.tiktoken")
    weights = release_state_dict(model)
    stem, ext = {"safetensors": ("model", "safetensors"), "bin": ("pytorch_model", "bin")}[weights_format]
    keys = list(weights)
    groups = [keys[i::shards] for i in range(shards)] if shards > 1 else [keys]
    files = [f"{stem}.{ext}"] if shards == 1 else [f"{stem}-{i + 1:05d}-of-{shards:05d}.{ext}" for i in range(shards)]
    for name, group in zip(files, groups, strict=True):
        part = {k: weights[k] for k in group}
        if weights_format == "safetensors":
            from safetensors.torch import save_file

            save_file(part, str(directory / name), metadata={"format": "pt"})
        else:
            torch.save(part, directory / name)
    if shards > 1:
        index = {
            "metadata": {"total_size": sum(t.numel() * t.element_size() for t in weights.values())},
            "weight_map": {k: name for name, group in zip(files, groups, strict=True) for k in group},
        }
        (directory / f"{stem}.{ext}.index.json").write_text(json.dumps(index, indent=2))
    return directory


class _ReleaseWeights:
    """The release tensors of a checkpoint directory, with the file each came from (for error messages)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.tensors: dict[str, torch.Tensor] = {}
        self.file_of: dict[str, Path] = {}
        files, self.listing = self._files()
        for path in files:
            for key, tensor in self._read(path).items():
                self.tensors[key] = tensor
                self.file_of[key] = path

    def _files(self) -> tuple[list[Path], Path]:
        d = self.directory
        for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
            index = d / index_name
            if index.is_file():
                try:
                    weight_map = json.loads(index.read_text())["weight_map"]
                except (json.JSONDecodeError, KeyError) as exc:
                    raise CheckpointError(f"{index}: not a weight index with a 'weight_map' ({exc})") from exc
                files = [d / name for name in dict.fromkeys(weight_map.values())]
                for path in files:
                    if not path.is_file():
                        raise CheckpointError(f"{index}: lists {path.name}, which is not in {d}")
                return files, index
        for pattern in ("*.safetensors", "pytorch_model*.bin"):
            files = sorted(d.glob(pattern))
            if files:
                return files, files[0] if len(files) == 1 else d
        raise CheckpointError(f"{d}: no weights (model.safetensors, pytorch_model.bin, or their shards and index)")

    @staticmethod
    def _read(path: Path) -> dict[str, torch.Tensor]:
        try:
            if path.suffix == ".safetensors":
                from safetensors.torch import load_file

                return load_file(str(path))
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # safetensors and torch raise several unrelated types for bad files
            raise CheckpointError(f"{path}: not a readable weights file ({type(exc).__name__}: {exc})") from exc

    def take(self, key: str) -> tuple[torch.Tensor, Path]:
        if key not in self.tensors:
            raise CheckpointError(f"{self.listing}: missing key {key}")
        return self.tensors.pop(key), self.file_of[key]

    def check_nothing_left(self) -> None:
        left = list(self.tensors)
        if left:
            raise CheckpointError(
                f"{self.file_of[left[0]]}: unexpected key {left[0]} (not in the Qwen-Audio release layout"
                + (f"; {len(left) - 1} more" if len(left) > 1 else "") + ")"
            )


def load_release_checkpoint(
    directory: str | Path, dtype: torch.dtype = torch.float32
) -> tuple[QwenAudioModel, QwenAudioProcessor]:
    """Build `QwenAudioModel` and its processor from a directory in the release layout."""
    directory = Path(directory)
    config_file = directory / "config.json"
    if not config_file.is_file():
        raise CheckpointError(f"{directory}: no config.json in this directory")
    text_config, audio_config, start_id, seq_length = _configs_from_release(read_json(config_file), str(config_file))
    tokenizer = QwenAudioTokenizer.from_file(directory / "qwen.tiktoken")
    if (tokenizer.audio_start_id, tokenizer.audio_end_id) != (start_id, start_id + 1):
        raise CheckpointError(
            f"{config_file}: audio.audio_start_id is {start_id}, but {tokenizer.source} gives <audio> "
            f"{tokenizer.audio_start_id} and </audio> {tokenizer.audio_end_id}"
        )
    if len(tokenizer) > text_config.vocab_size:
        raise CheckpointError(
            f"{tokenizer.source}: {len(tokenizer)} token ids, but config.json has only {text_config.vocab_size} rows"
        )
    with torch.device("meta"):
        model = QwenAudioModel(text_config, audio_config, start_id, seq_length)
    expected = model.state_dict()
    weights = _ReleaseWeights(directory)
    native: dict[str, torch.Tensor] = {}
    for key, parts in _release_names(text_config.num_hidden_layers, audio_config.encoder_layers):
        tensor, path = weights.take(key)
        want = (sum(expected[p].shape[0] for p in parts), *expected[parts[0]].shape[1:])
        if tuple(tensor.shape) != want:
            raise CheckpointError(f"{path}: key {key} has shape {tuple(tensor.shape)}, config.json implies {want}")
        tensor = tensor.to(dtype)
        native.update(zip(parts, tensor.chunk(len(parts)) if len(parts) > 1 else (tensor,), strict=True))
    weights.check_nothing_left()
    model.load_state_dict(native, strict=True, assign=True)
    model.llm.model.rotary_emb = Qwen2RotaryEmbedding(config=text_config)  # a non-persistent buffer, left on meta
    processor = QwenAudioProcessor(tokenizer, chat_format=_chat_format_of(directory))
    return model.eval(), processor


def _chat_format_of(directory: Path) -> str:
    """The checkpoint's `chat_format` from generation_config.json; "chatml" when the file does not say."""
    path = directory / "generation_config.json"
    if not path.is_file():
        return "chatml"
    fmt = read_json(path).get("chat_format", "chatml")
    if fmt not in CHAT_FORMATS:
        raise CheckpointError(f"{path}: chat_format {fmt!r} is not one of {CHAT_FORMATS}")
    return fmt


def release_directory(name_or_path: str) -> Path:
    """A local checkpoint directory, or the hub snapshot of a repo's release files (the safetensors weights when
    the repo has them, else the `.bin` ones)."""
    why = "the Qwen-Audio release files"
    directory = checkpoint_directory(name_or_path, ["*.json", "*.safetensors", "qwen.tiktoken"], why)
    if not any(directory.glob("*.safetensors")):
        directory = checkpoint_directory(name_or_path, ["*.json", "*.bin", "qwen.tiktoken"], why)
    return directory
