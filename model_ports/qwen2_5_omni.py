"""Qwen2.5-Omni's Thinker (`Qwen/Qwen2.5-Omni-7B`, `Qwen/Qwen2.5-Omni-3B`): audio in, text out; no Talker.

Release behaviour reproduced (transformers `Qwen2_5OmniThinkerForConditionalGeneration.forward`,
`Qwen2_5OmniProcessor`):
- features: `WhisperFeatureExtractor` (128 mels) padded to its window with a mask of the real frames; the release
  extractor's window is 300 s (`chunk_length` 300, `n_samples` 4 800 000), so a longer clip is cut to 300 s;
- the processor writes N = ((L-1)//2+1 - 2)//2+1 `<|AUDIO|>` tokens (L = real mel frames, 25 rows a second);
- audio tower: only the real frames, cut into windows of `2 * n_window` frames (2 s released) that attend within
  themselves, then AvgPool(2, 2), LayerNorm and the tower's own projection to d_model: its output is the rows
  (Qwen2.5-Omni has no separate projector, so `audio.hook_encoder_out` and `audio.hook_embeds` see the same rows);
- positions: the text model uses multimodal RoPE (3-D position ids). For a prompt of text and audio only,
  `get_rope_index` gives the three components the same sequential positions 0..T-1, so M-RoPE is plain 1-D RoPE
  and the Thinker's decoder is bridged as a `Qwen2ForCausalLM` shell (the conformance check compares the logits
  with the Thinker's own forward, which builds the 3-D positions from the attention mask as generation does);
- prompt: the checkpoint's chat template, one user turn with the clip then the question
  ("<|im_start|>user\\n<|audio_bos|><|AUDIO|><|audio_eos|>{question}<|im_end|>"), after the template's default
  system turn ("You are a helpful assistant."); the response prefix follows "<|im_start|>assistant\\n".

Loading: the release checkpoint holds the Thinker, the Talker and the Token2Wav vocoder (`Qwen2_5OmniModel`,
model_type `qwen2_5_omni`); the port builds the Thinker alone from its `thinker_config` and `thinker.*` weights
(the Talker and the vocoder, and their speaker file, are never built or fetched). The release processor also builds image and video processors
(the video one needs torchvision); the port reads only the tokenizer, the Whisper feature extractor and the chat
template (`AudioTextProcessor`) and expands the audio placeholder as the processor does.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from jaxtyping import Float, Int
from torch import nn
from transformers import (
    Qwen2_5OmniConfig,
    Qwen2_5OmniThinkerForConditionalGeneration,
    Qwen2ForCausalLM,
    WhisperFeatureExtractor,
)

from audiolens_ct.hub import read_checkpoint_config
from audiolens_ct.ports import AudioHooks, TinyVariant
from model_ports._native import AudioTextProcessor, NativePort, equal_rows, pooled_whisper_row_seconds
from model_ports._tiny import TINY_WHISPER_ENCODER, tiny_bpe_tokenizer, tiny_native

SPECIAL_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|AUDIO|>", "<|audio_bos|>", "<|audio_eos|>", "<|IMAGE|>",
    "<|VIDEO|>", "<|vision_bos|>", "<|vision_eos|>",
)
CHAT_TEXT = ("You are a helpful assistant.", "system user assistant")
TINY_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}<|im_start|>system\n"
    "You are a helpful assistant.<|im_end|>\n{% endif %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'audio' %}<|audio_bos|><|AUDIO|><|audio_eos|>{% elif part['type'] == 'text' %}"
    "{{ part['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
"""The layout the release template writes for text and audio turns, for the tiny test models."""
RELEASE_WINDOW_SECONDS = 300  # `chunk_length` of the release feature extractor
CLIPS = (0.6, 3.0, 35.0)  # within one 2-s encoder window, across several, and beyond Qwen2-Audio's 30 s


class Qwen25OmniPort(NativePort):
    name = "qwen2.5-omni"
    hf_ids = ("Qwen/Qwen2.5-Omni-7B", "Qwen/Qwen2.5-Omni-3B")
    sampling_rate = 16000
    architectures = (
        "Qwen2_5OmniModel", "Qwen2_5OmniForConditionalGeneration", "Qwen2_5OmniThinkerForConditionalGeneration",
        "qwen2_5_omni", "qwen2_5_omni_thinker",
    )
    audio_window = float(RELEASE_WINDOW_SECONDS)
    model_class = Qwen2_5OmniThinkerForConditionalGeneration
    processor_class = AudioTextProcessor
    causal_lm_class = Qwen2ForCausalLM
    tiny_variants = (
        TinyVariant("gqa", clip_seconds=CLIPS),  # 4 query heads share 2 key/value heads, M-RoPE sections 2/3/3
        TinyVariant(
            "gqa_4_to_1",
            {"text_config": {"num_attention_heads": 8, "num_key_value_heads": 2,
                             "rope_parameters": {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [1, 1, 2]}}},
            clip_seconds=CLIPS,
        ),
        TinyVariant("patching", {"text_config": {"num_hidden_layers": 2}}, clip_seconds=(0.5,), patching=True),
    )

    def load(self, name_or_path: str, device: Any = None, dtype: torch.dtype | None = None) -> tuple[nn.Module, Any]:
        """The Thinker alone, also from a release checkpoint (Thinker + Talker + vocoder, weights under `thinker.`):
        its `thinker_config` and its `thinker.*` tensors, the rest never built or read into a module."""
        if read_checkpoint_config(name_or_path).get("model_type") != "qwen2_5_omni":
            return super().load(name_or_path, device, dtype)
        thinker = Qwen2_5OmniThinkerForConditionalGeneration.from_pretrained(
            name_or_path, config=Qwen2_5OmniConfig.from_pretrained(name_or_path).thinker_config,
            key_mapping={r"^thinker\.": ""}, dtype=dtype or torch.float32,
        )
        thinker = thinker if device is None else thinker.to(device)
        return thinker.eval(), AudioTextProcessor.from_pretrained(name_or_path)

    def tiny(self, **overrides: Any) -> tuple[nn.Module, Any]:
        """Random weights: a 2-layer audio tower (128 mels, 2-s windows), a 1-block vision tower the Thinker builds
        but never runs here, a 3-layer Qwen2-style text model (GQA 4:2, d 64, M-RoPE); the release feature
        extractor's 300-s window and a tokenizer trained in code."""
        tokenizer = tiny_bpe_tokenizer(SPECIAL_TOKENS, CHAT_TEXT, eos_token="<|im_end|>", pad_token="<|endoftext|>")
        ids = {token: tokenizer.convert_tokens_to_ids(token) for token in SPECIAL_TOKENS}
        audio_cfg = {**TINY_WHISPER_ENCODER, "n_window": 100, "output_dim": 64}  # 2-s windows, the tower's projection
        text_cfg = dict(
            hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=4096, rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 3, 3]},
        )
        vision_cfg = dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=64,
                          fullatt_block_indexes=[0])  # fmt: skip
        extractor = WhisperFeatureExtractor(feature_size=128, chunk_length=RELEASE_WINDOW_SECONDS)
        return tiny_native(
            self, tokenizer, audio_cfg, text_cfg, overrides, feature_extractor=extractor,
            processor_kwargs={"chat_template": TINY_CHAT_TEMPLATE}, vision_config=vision_cfg,
            audio_token_index=ids["<|AUDIO|>"], image_token_index=ids["<|IMAGE|>"], video_token_index=ids["<|VIDEO|>"],
            audio_start_token_id=ids["<|audio_bos|>"], audio_end_token_id=ids["<|audio_eos|>"],
            vision_start_token_id=ids["<|vision_bos|>"], vision_end_token_id=ids["<|vision_eos|>"],  # as released
        )

    def tokens_and_features(
        self, hf_model: nn.Module, processor: Any, wave: Float[np.ndarray, " samples"], prompt: str,
        response_prefix: str,
    ) -> tuple[Int[torch.Tensor, "1 pos"], dict[str, torch.Tensor]]:
        """As `Qwen2_5OmniProcessor`: features padded to the window, then one `<|AUDIO|>` per row of the real
        frames (`_get_feat_extract_output_lengths` of the audio tower)."""
        features = processor.features(wave, self.sampling_rate)
        _, n_rows = hf_model.model.audio_tower._get_feat_extract_output_lengths(features["feature_attention_mask"].sum(-1))
        text = self.chat_text(processor, prompt, response_prefix)
        return processor.expand_and_tokenize(text, hf_model.config.audio_token_id, int(n_rows[0])), features

    def audio_embeddings(
        self, hf_model: nn.Module, features: dict[str, torch.Tensor], extras: dict[str, Any], hooks: AudioHooks
    ) -> Float[torch.Tensor, "batch n_audio d_model"]:
        feature_mask = features["feature_attention_mask"]
        _, out_lengths = hf_model.model.audio_tower._get_feat_extract_output_lengths(feature_mask.sum(-1))
        n_rows = equal_rows(out_lengths, self.name)
        rows = hf_model.model.get_audio_features(features["input_features"], feature_mask).last_hidden_state
        rows = hooks.hook_encoder_out(rows.reshape(feature_mask.shape[0], n_rows, -1))  # clip after clip
        return hooks.hook_embeds(rows)

    def hf_logits(self, hf_model: nn.Module, inputs: Any) -> Float[torch.Tensor, "batch pos vocab"]:
        """The Thinker's forward with the attention mask generation passes, so it builds its own 3-D positions."""
        mask = torch.ones_like(inputs.tokens)
        return hf_model(input_ids=inputs.tokens, attention_mask=mask, **inputs.audio_features).logits

    def audio_row_seconds(self, hf_model: nn.Module, processor: Any, n_rows: int) -> Float[np.ndarray, " n_rows"]:
        return pooled_whisper_row_seconds(processor.feature_extractor, n_rows)
