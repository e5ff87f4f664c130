"""Qwen2-Audio (`Qwen/Qwen2-Audio-7B`, `Qwen/Qwen2-Audio-7B-Instruct`), the native transformers class.

Release behaviour reproduced (transformers `Qwen2AudioModel.forward`):
- features: `WhisperFeatureExtractor` (128 mels) padded to 30 s, with a `feature_attention_mask` of the real length;
- the processor expands `<|AUDIO|>` into N = ((L-1)//2+1 - 2)//2 + 1 placeholder rows (L = real mel frames);
- the encoder runs on all 3000 frames with a bidirectional key-padding mask built from the conv output length,
  AvgPool(2,2) and a LayerNorm; `multi_modal_projector` maps 1280 -> d_model; the first N rows of each clip are
  scattered into the placeholder rows;
- prompt: the processor's ChatML chat template ("Audio 1: <|audio_bos|><|AUDIO|><|audio_eos|>\\n{question}"),
  with the response prefix written after "<|im_start|>assistant\\n".
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from jaxtyping import Float
from torch import nn
from transformers import (
    Qwen2AudioForConditionalGeneration,
    Qwen2AudioProcessor,
    Qwen2ForCausalLM,
)
from transformers.masking_utils import create_bidirectional_mask

from audiolens_ct.ports import AudioHooks, TinyVariant
from model_ports._native import NativePort, equal_rows, pooled_whisper_row_seconds
from model_ports._tiny import TINY_QWEN2, TINY_WHISPER_ENCODER, tiny_bpe_tokenizer, tiny_native

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|AUDIO|>", "<|audio_bos|>", "<|audio_eos|>")
CHAT_TEXT = ("You are a helpful assistant.", "system user assistant", "Audio 1:")
"""The chat template's own strings, learned by the tiny tokenizer."""
CLIPS = (0.6, 3.0, 11.0)  # the conformance clips: from a fraction of a second to a third of the 30-s window


class Qwen2AudioPort(NativePort):
    name = "qwen2-audio"
    hf_ids = ("Qwen/Qwen2-Audio-7B-Instruct", "Qwen/Qwen2-Audio-7B")
    sampling_rate = 16000
    architectures = ("Qwen2AudioForConditionalGeneration", "qwen2_audio")
    audio_window = 30.0  # the Whisper-style feature extractor pads or cuts every clip to 30 s
    model_class = Qwen2AudioForConditionalGeneration
    processor_class = Qwen2AudioProcessor
    causal_lm_class = Qwen2ForCausalLM
    feature_keys = ("input_features", "feature_attention_mask")
    tiny_variants = (
        TinyVariant("gqa", clip_seconds=CLIPS),  # 4 query heads share 2 key/value heads
        TinyVariant("mha_decoupled_head_dim", {"text_config": {"num_key_value_heads": 4, "head_dim": 24}},
                    clip_seconds=CLIPS),  # 4 heads x 24 != hidden 64
        TinyVariant("gqa_4_to_1", {"text_config": {"num_attention_heads": 8, "num_key_value_heads": 2}},
                    clip_seconds=CLIPS),
        TinyVariant("patching", clip_seconds=(0.5,), patching=True),
    )

    def tiny(self, **overrides: Any) -> tuple[nn.Module, Any]:
        """Random weights: a 2-layer Whisper-style encoder (128 mels), a 3-layer Qwen2 (GQA 4:2, d 64)."""
        tokenizer = tiny_bpe_tokenizer(SPECIAL_TOKENS, CHAT_TEXT, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
        audio_token = tokenizer.convert_tokens_to_ids("<|AUDIO|>")
        text_cfg = {**TINY_QWEN2, "rope_theta": 10000.0}
        return tiny_native(self, tokenizer, TINY_WHISPER_ENCODER, text_cfg, overrides, audio_token_index=audio_token)

    def audio_embeddings(
        self, hf_model: nn.Module, features: dict[str, torch.Tensor], extras: dict[str, Any], hooks: AudioHooks
    ) -> Float[torch.Tensor, "batch n_audio d_model"]:
        tower = hf_model.model.audio_tower
        feats = features["input_features"].to(tower.conv1.weight.device, tower.conv1.weight.dtype)
        feature_mask = features["feature_attention_mask"].to(feats.device)
        conv_lengths, out_lengths = tower._get_feat_extract_output_lengths(feature_mask.sum(-1))
        n_frames = (feats.shape[-1] - 2) // 2 + 1
        valid = torch.arange(n_frames, device=feats.device)[None, :] < conv_lengths[:, None]
        mask = create_bidirectional_mask(
            config=tower.config,
            inputs_embeds=torch.zeros(feats.shape[0], n_frames, 1, dtype=feats.dtype, device=feats.device),
            attention_mask=valid.long(),
        )
        encoded = hooks.hook_encoder_out(tower(feats, attention_mask=mask).last_hidden_state)
        projected = hf_model.model.multi_modal_projector(encoded)
        return hooks.hook_embeds(projected[:, : equal_rows(out_lengths, self.name)])

    def audio_row_seconds(self, hf_model: nn.Module, processor: Any, n_rows: int) -> Float[np.ndarray, " n_rows"]:
        """Row k starts at mel frame 4k: the encoder's stride-2 convolution and AvgPool(2, 2) (25 rows a second)."""
        return pooled_whisper_row_seconds(processor.feature_extractor, n_rows)
