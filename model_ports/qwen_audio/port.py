"""The Qwen-Audio port: the framework's view of `QwenAudioModel` (prompt, audio rows, backbone, oracle)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from jaxtyping import Float
from torch import nn
from transformers import Qwen2AudioEncoderConfig, Qwen2Config, Qwen2ForCausalLM

from audiolens_ct.errors import InputError
from audiolens_ct.ports import AudioHooks, Backbone, Port, PortInputs, TinyVariant, meta_shell
from model_ports.qwen_audio.checkpoint import load_release_checkpoint, release_directory
from model_ports.qwen_audio.modeling import QwenAudioModel, audio_span_mask
from model_ports.qwen_audio.processing import HOP_LENGTH, SAMPLING_RATE, QwenAudioProcessor
from model_ports.qwen_audio.tokenization import tiny_tokenizer


class QwenAudioPort(Port):
    name = "qwen-audio"
    hf_ids = ("Qwen/Qwen-Audio-Chat", "Qwen/Qwen-Audio")
    sampling_rate = SAMPLING_RATE
    architectures = ("QWenLMHeadModel", "qwen")
    audio_window = 30.0  # the Whisper-style feature extractor pads or cuts every clip to 30 s
    tiny_variants = (
        TinyVariant("mha", clip_seconds=(1.0, 5.0), patching=True),  # the release layout: multi-head attention
        # The base model's raw prompt, another depth and head count (head_dim 32), and a 0.2-s clip (5 audio rows).
        TinyVariant(
            "raw_two_layers_two_heads",
            {"chat_format": "raw", "text_config": {"num_hidden_layers": 2, "num_attention_heads": 2,
             "num_key_value_heads": 2}, "audio_config": {"encoder_layers": 1}},
            clip_seconds=(0.2, 2.0),
        ),
    )

    def matches(self, config: dict[str, Any]) -> bool:
        """A QWen v1 config with an `audio` section (plain Qwen-7B and Qwen-VL have none)."""
        return super().matches(config) and isinstance(config.get("audio"), dict)

    def load(self, name_or_path: str, device: Any = None, dtype: torch.dtype | None = None) -> tuple[nn.Module, Any]:
        model, processor = load_release_checkpoint(release_directory(name_or_path), dtype=dtype or torch.float32)
        if device is not None:
            model = model.to(device)
        return model, processor

    def tiny(self, **overrides: Any) -> tuple[nn.Module, Any]:
        """Random weights, the release tokenizer class over a small rank table; `chat_format=` picks the format."""
        chat_format = overrides.pop("chat_format", "chatml")
        tokenizer = tiny_tokenizer()
        audio_cfg = dict(
            num_mel_bins=80, d_model=32, encoder_layers=2, encoder_attention_heads=2, encoder_ffn_dim=128,
            max_source_positions=1500,
        )
        audio_cfg.update(overrides.pop("audio_config", {}))
        text_cfg = dict(
            hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4,
            vocab_size=len(tokenizer), rms_norm_eps=1e-5, max_position_embeddings=8192, tie_word_embeddings=False,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        )
        text_cfg.update(overrides.pop("text_config", {}))
        if overrides:
            raise TypeError(f"qwen-audio tiny(): unknown overrides {sorted(overrides)}")
        model = QwenAudioModel(
            Qwen2Config(**text_cfg), Qwen2AudioEncoderConfig(**audio_cfg), audio_start_id=tokenizer.audio_start_id
        )
        return model.eval(), QwenAudioProcessor(tokenizer, chat_format=chat_format)

    def backbone(self, hf_model: nn.Module) -> Backbone:
        llm = hf_model.llm
        return Backbone(meta_shell(Qwen2ForCausalLM, llm.config, llm.model, llm.lm_head), "Qwen2ForCausalLM", llm.config)

    def encode_prompt(
        self, hf_model: nn.Module, processor: Any, audio: Float[np.ndarray, " samples"], prompt: str,
        response_prefix: str, chat_format: str | None = None, **kwargs: Any,
    ) -> PortInputs:
        """`chat_format` ("chatml" or "raw") overrides the checkpoint's format for this input."""
        if kwargs:
            raise TypeError(f"qwen-audio takes only chat_format as an extra prepare argument, got {sorted(kwargs)}")
        features = processor.features(audio)
        span = int(features["input_audio_lengths"][0, 1]) + 2
        tokens = torch.tensor([processor.prompt_ids(prompt, response_prefix, span, chat_format)])
        if hf_model.seq_length is not None and tokens.shape[1] > hf_model.seq_length:
            raise InputError(
                f"qwen-audio: the input has {tokens.shape[1]} tokens; beyond {hf_model.seq_length} the release "
                "switches on dynamic NTK and logN attention, which this port does not reproduce"
            )
        mask = audio_span_mask(tokens, hf_model.audio_start_id, hf_model.audio_end_id)
        return PortInputs(tokens=tokens, audio_features=features, audio_mask=mask)

    def audio_embeddings(
        self, hf_model: nn.Module, features: dict[str, torch.Tensor], extras: dict[str, Any], hooks: AudioHooks
    ) -> Float[torch.Tensor, "batch n_audio d_model"]:
        tower = hf_model.audio
        states = hooks.hook_encoder_out(tower.encode(features["input_features"], features["input_audio_lengths"]))
        return hooks.hook_embeds(tower.rows(states, features["input_audio_lengths"]))

    def hf_logits(self, hf_model: nn.Module, inputs: Any) -> Float[torch.Tensor, "batch pos vocab"]:
        return hf_model(inputs.tokens, **inputs.audio_features)

    def audio_row_seconds(self, hf_model: nn.Module, processor: Any, n_rows: int) -> Float[np.ndarray, " n_rows"]:
        """`<audio>`, then row k at mel frame 4k (stride-2 convolution, then pooling by 2: 25 a second), then
        `</audio>`; the two boundary embeddings stand for no moment."""
        frames = np.arange(n_rows - 2) * 4 * HOP_LENGTH / SAMPLING_RATE
        return np.concatenate([[np.nan], frames, [np.nan]])
