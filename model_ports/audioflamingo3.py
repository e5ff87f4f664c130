"""Audio Flamingo 3 (`nvidia/audio-flamingo-3-hf`): a Whisper-style encoder, a two-layer projector, Qwen2.5-7B.

Release behaviour reproduced (transformers `AudioFlamingo3ForConditionalGeneration.forward`,
`AudioFlamingo3Processor`):
- features: the clip is cut into 30-s windows (at most `max_audio_len` / 30 = 20 of them: a longer clip is cut to
  its first 600 s), each a `WhisperFeatureExtractor` log-mel (128 mels) padded to 3000 frames with a mask of its
  real frames;
- encoder: each window on its own (1500 positions after the stride-2 convolution, a bidirectional mask of the real
  frames), then AvgPool(2, 2) and a LayerNorm: 750 rows a full window, 25 a second;
- projector: Linear -> GELU -> Linear on every row; the rows of each window's real frames are kept, window after
  window, and replace the `<sound>` tokens (the processor writes one per row);
- prompt: the checkpoint's chat template (ChatML: a default system turn "You are a helpful assistant.", the user
  turn "<sound>{question}", the audio before the text); the response prefix follows "<|im_start|>assistant\\n".

Here the features keep a batch axis before the window axis, `[batch, windows, mels, frames]` (HF's forward takes
every window of every clip on one axis), so `LALMInput.stack` batches clips that span the same number of windows.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from jaxtyping import Float, Int
from torch import nn
from transformers import AudioFlamingo3ForConditionalGeneration, AudioFlamingo3Processor, Qwen2ForCausalLM

from audiolens_ct.ports import AudioHooks
from model_ports._native import NativePort, decoder_variants, equal_rows, pooled_whisper_row_seconds
from model_ports._tiny import TINY_QWEN2, TINY_WHISPER_ENCODER, tiny_bpe_tokenizer, tiny_native

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<sound>")
CHAT_TEXT = ("You are a helpful assistant.", "system user assistant")
TINY_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}<|im_start|>system\n"
    "You are a helpful assistant.<|im_end|>\n{% endif %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] if part['type'] == 'audio' %}<sound>{% endfor %}"
    "{% for part in message['content'] if part['type'] == 'text' %}{{ part['text'] }}{% endfor %}{% endif %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
"""The layout the release template writes (audio before text in a user turn), for the tiny test models."""
CLIPS = (0.6, 3.0, 35.0)  # within one 30-s window and across two


class AudioFlamingo3Port(NativePort):
    name = "audioflamingo3"
    hf_ids = ("nvidia/audio-flamingo-3-hf",)
    sampling_rate = 16000
    architectures = ("AudioFlamingo3ForConditionalGeneration", "audioflamingo3")
    audio_window = 600.0  # the processor's max_audio_len: 20 windows of 30 s
    model_class = AudioFlamingo3ForConditionalGeneration
    processor_class = AudioFlamingo3Processor
    causal_lm_class = Qwen2ForCausalLM
    feature_keys = ("input_features", "input_features_mask")
    tiny_variants = decoder_variants(CLIPS)

    def tiny(self, **overrides: Any) -> tuple[nn.Module, Any]:
        """Random weights: a 2-layer Whisper-style encoder (128 mels, 1500 positions), a 3-layer Qwen2 (GQA 4:2,
        d 64); the release processor (30-s windows, 600 s at most) around a tokenizer trained in code."""
        tokenizer = tiny_bpe_tokenizer(SPECIAL_TOKENS, CHAT_TEXT, eos_token="<|im_end|>", pad_token="<|endoftext|>")
        return tiny_native(
            self, tokenizer, TINY_WHISPER_ENCODER, {**TINY_QWEN2, "rope_theta": 1e6}, overrides,
            processor_kwargs={"chat_template": TINY_CHAT_TEMPLATE},
            audio_token_id=tokenizer.convert_tokens_to_ids("<sound>"),
        )

    def tokens_and_features(
        self, hf_model: nn.Module, processor: Any, wave: Float[np.ndarray, " samples"], prompt: str,
        response_prefix: str,
    ) -> tuple[Int[torch.Tensor, "1 pos"], dict[str, torch.Tensor]]:
        tokens, features = super().tokens_and_features(hf_model, processor, wave, prompt, response_prefix)
        return tokens, {key: value.unsqueeze(0) for key, value in features.items()}  # a batch axis before windows

    def audio_embeddings(
        self, hf_model: nn.Module, features: dict[str, torch.Tensor], extras: dict[str, Any], hooks: AudioHooks
    ) -> Float[torch.Tensor, "batch n_audio d_model"]:
        tower = hf_model.model.audio_tower
        masks = features["input_features_mask"]  # [batch, windows, frames]
        batch, windows = masks.shape[:2]
        encoded = tower(features["input_features"].flatten(0, 1), input_features_mask=masks.flatten(0, 1))
        encoded = encoded.last_hidden_state  # [batch * windows, 750, d_audio], padding rows included
        encoded = hooks.hook_encoder_out(encoded.reshape(batch, -1, encoded.shape[-1]))  # windows joined in time
        _, lengths = tower._get_feat_extract_output_lengths(masks.sum(-1))  # real rows of each window
        real = torch.arange(encoded.shape[1] // windows, device=lengths.device) < lengths[..., None]
        rows = hf_model.model.multi_modal_projector(encoded)[real.reshape(batch, -1)]
        return hooks.hook_embeds(rows.reshape(batch, equal_rows(lengths.sum(-1), self.name), -1))

    def hf_logits(self, hf_model: nn.Module, inputs: Any) -> Float[torch.Tensor, "batch pos vocab"]:
        features = {key: value.flatten(0, 1) for key, value in inputs.audio_features.items()}  # HF: windows on one axis
        return hf_model(input_ids=inputs.tokens, **features).logits

    def audio_row_seconds(self, hf_model: nn.Module, processor: Any, n_rows: int) -> Float[np.ndarray, " n_rows"]:
        """A full 30-s window gives 750 rows, so rows run on at 25 a second across windows."""
        return pooled_whisper_row_seconds(processor.feature_extractor, n_rows)
