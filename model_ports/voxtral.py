"""Voxtral (`mistralai/Voxtral-Mini-3B-2507`, `mistralai/Voxtral-Small-24B-2507`), the native transformers class.

Release behaviour reproduced (transformers `VoxtralModel.forward`, mistral-common's instruct tokenizer):
- features: `WhisperFeatureExtractor` (128 mels) on the waveform padded to a multiple of 30 s; the mel is cut into
  3000-frame chunks, each encoded on its own;
- encoder: a Whisper encoder per chunk (1500 frames, no mask, no pooling) and a final LayerNorm;
- projector: 4 consecutive frames concatenated (a reshape to `intermediate_size`), Linear -> GELU -> Linear,
  so 375 audio rows per 30-s chunk (12.5 Hz), scattered into the `[AUDIO]` rows;
- prompt (instruct format): `<s>[INST][BEGIN_AUDIO]` + N x `[AUDIO]` + question + `[/INST]`, then the response
  prefix with no end-of-turn token.

HF's `get_audio_features` flattens every chunk of every clip of a batch into one row list. Here the features are
kept batch-first, `[batch, chunks, mels, frames]`, so `LALMInput.stack` batches them, and the rows are mapped back
to `[batch, rows, d_model]` in the same row-major order the HF forward scatters them in.

Two prompt paths, chosen by the processor's tokenizer:
- mistral-common (`MistralCommonBackend`; every released checkpoint ships `tekken.json`): the checkpoint's own
  tokenizer writes the tokens (`apply_chat_template`, the prefix as a continued assistant message) and pads the
  audio; the features are computed from that audio as `VoxtralProcessor` computes them;
- any other tokenizer (the tiny test models, built offline): the same layout assembled here from the tokenizer's
  special tokens, and the same features. Where mistral-common is installed, the two give identical tokens and
  features (tested on a tiny Tekken vocabulary).
"""

from __future__ import annotations

import base64
import io
from typing import Any

import numpy as np
import soundfile as sf
import torch
from jaxtyping import Float, Int
from torch import nn
from transformers import (
    LlamaForCausalLM,
    VoxtralForConditionalGeneration,
    VoxtralProcessor,
    WhisperFeatureExtractor,
)
from transformers.utils import is_mistral_common_available

from audiolens_ct.errors import CheckpointError
from audiolens_ct.hub import optional_checkpoint_file
from audiolens_ct.ports import AudioHooks, TinyVariant
from model_ports._native import NativePort
from model_ports._tiny import tiny_bpe_tokenizer, tiny_native

SAMPLING_RATE = 16000
CHUNK_SAMPLES = 30 * SAMPLING_RATE  # the processor pads audio to a multiple of 30 s
CHUNK_FRAMES = 3000  # mel frames per chunk: the encoder's 1500 positions times its stride-2 conv
MISTRAL_COMMON_HINT = 'pip install "mistral-common[audio]>=1.11.5"'

# Tekken's special-token layout in the releases: ids 0-4 and 24-25 are the ones the prompt uses.
TINY_SPECIAL_TOKENS = (
    "<unk>", "<s>", "</s>", "[INST]", "[/INST]", *(f"<SPECIAL_{i}>" for i in range(5, 24)), "[AUDIO]", "[BEGIN_AUDIO]",
)
CLIPS = (0.5, 5.0, 12.0, 35.0)  # half a second to two 30-s chunks


class VoxtralPort(NativePort):
    name = "voxtral"
    hf_ids = ("mistralai/Voxtral-Mini-3B-2507", "mistralai/Voxtral-Small-24B-2507")
    sampling_rate = SAMPLING_RATE
    architectures = ("VoxtralForConditionalGeneration", "voxtral")
    model_class = VoxtralForConditionalGeneration
    processor_class = VoxtralProcessor
    causal_lm_class = LlamaForCausalLM
    tiny_variants = (
        TinyVariant("gqa", clip_seconds=CLIPS),  # 4 query heads share 2 key/value heads, head_dim 16 = 64 / 4
        TinyVariant("decoupled_head_dim", {"text_config": {"head_dim": 32}}, clip_seconds=CLIPS),  # 4 x 32 != 64
        # The patching checks patch every position: 2 layers, and a projector reading 20 frames a row
        # (intermediate 160 = 20 x 8) gives 75 audio rows a chunk instead of 375.
        TinyVariant(
            "patching",
            {"text_config": {"num_hidden_layers": 2},
             "audio_config": {"num_hidden_layers": 1, "hidden_size": 8, "intermediate_size": 160}},
            clip_seconds=(0.5,), patching=True,
        ),
    )

    def load(self, name_or_path: str, device: Any = None, dtype: torch.dtype | None = None) -> tuple[nn.Module, Any]:
        _require_mistral_common_for_tekken(name_or_path)
        return super().load(name_or_path, device, dtype)

    def tiny(self, **overrides: Any) -> tuple[nn.Module, Any]:
        """A random-weight Voxtral: Llama text model (GQA, 3 layers), Whisper-style encoder with 128 mels and
        1500 positions, the release projector; and a `VoxtralProcessor` around a tokenizer built in code."""
        tokenizer = tiny_bpe_tokenizer(TINY_SPECIAL_TOKENS, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
        # intermediate_size = 4 x hidden_size, as released: the projector concatenates 4 frames -> 375 rows a chunk.
        audio_cfg = dict(
            hidden_size=32, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2, num_mel_bins=128,
            max_source_positions=1500,
        )
        text_cfg = dict(
            model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, max_position_embeddings=4096, rope_theta=1e8,
        )
        audio_token = tokenizer.convert_tokens_to_ids("[AUDIO]")
        return tiny_native(self, tokenizer, audio_cfg, text_cfg, overrides, audio_token_id=audio_token)

    def tokens_and_features(
        self, hf_model: nn.Module, processor: Any, wave: Float[np.ndarray, " samples"], prompt: str,
        response_prefix: str,
    ) -> tuple[Int[torch.Tensor, "1 pos"], dict[str, torch.Tensor]]:
        """The instruct format through mistral-common when the checkpoint tokenizes with it, else assembled here."""
        if _is_mistral_common(processor.tokenizer):
            tokens, features = _mistral_common_prompt(processor, wave, prompt, response_prefix)
        else:
            features = chunked_features(processor.feature_extractor, wave)
            n_rows = features.shape[1] * rows_per_chunk(hf_model.config.audio_config)
            tokens = assembled_prompt(processor.tokenizer, hf_model.config.audio_token_id, n_rows, prompt, response_prefix)
        return tokens, {"input_features": features}

    def audio_embeddings(
        self, hf_model: nn.Module, features: dict[str, torch.Tensor], extras: dict[str, Any], hooks: AudioHooks
    ) -> Float[torch.Tensor, "batch n_audio d_model"]:
        tower = hf_model.model.audio_tower
        feats = features["input_features"]  # [batch, chunks, mels, frames]
        batch = feats.shape[0]
        encoded = tower(feats.flatten(0, 1)).last_hidden_state  # [batch * chunks, 1500, d_audio]
        encoded = hooks.hook_encoder_out(encoded.reshape(batch, -1, encoded.shape[-1]))  # chunks joined in time
        # The release projector reads 4 consecutive frames as one row; 1500 frames a chunk keep rows inside chunks.
        grouped = encoded.reshape(batch, -1, hf_model.config.audio_config.intermediate_size)
        return hooks.hook_embeds(hf_model.model.multi_modal_projector(grouped))

    def hf_logits(self, hf_model: nn.Module, inputs: Any) -> Float[torch.Tensor, "batch pos vocab"]:
        features = inputs.audio_features["input_features"].flatten(0, 1)  # HF's layout: every chunk on one axis
        return hf_model(input_ids=inputs.tokens, input_features=features).logits

    def audio_row_seconds(self, hf_model: nn.Module, processor: Any, n_rows: int) -> Float[np.ndarray, " n_rows"]:
        """Each 30-s chunk gives `rows_per_chunk` evenly spaced rows, chunk after chunk (12.5 a second released);
        rows past the clip's end are the chunk's padding."""
        return np.arange(n_rows) * (CHUNK_SAMPLES / SAMPLING_RATE) / rows_per_chunk(hf_model.config.audio_config)


# -- the offline path: the release layout assembled here -----------------------------------------------------------


def rows_per_chunk(audio_config: Any) -> int:
    """Audio rows per 30-s chunk: encoder frames times the frames-per-row ratio of the projector (375 released)."""
    frames = audio_config.max_source_positions * audio_config.hidden_size
    if frames % audio_config.intermediate_size:
        raise CheckpointError(
            f"voxtral audio_config: max_source_positions x hidden_size ({frames}) is not a multiple of "
            f"intermediate_size ({audio_config.intermediate_size}), so the projector would mix chunks"
        )
    return frames // audio_config.intermediate_size


def chunked_features(
    feature_extractor: WhisperFeatureExtractor, wave: Float[np.ndarray, " samples"]
) -> Float[torch.Tensor, "1 chunks mels frames"]:
    """Whisper log-mel of the waveform padded to a multiple of 30 s, cut into 3000-frame chunks (as the processor)."""
    mel = feature_extractor(
        wave, sampling_rate=SAMPLING_RATE, padding=True, truncation=False, pad_to_multiple_of=CHUNK_SAMPLES,
        return_tensors="pt",
    )["input_features"][0]  # [mels, chunks * 3000]
    return mel.reshape(mel.shape[0], -1, CHUNK_FRAMES).transpose(0, 1).unsqueeze(0)


def assembled_prompt(
    tokenizer: Any, audio_token_id: int, n_audio: int, prompt: str, response_prefix: str
) -> Int[torch.Tensor, "1 pos"]:
    """`<s>[INST][BEGIN_AUDIO]` + n_audio x `[AUDIO]` + prompt + `[/INST]` + response prefix, each piece encoded
    on its own and the prefix's trailing spaces dropped, as mistral-common encodes a continued assistant message."""
    special = {}
    for token in ("<s>", "[INST]", "[BEGIN_AUDIO]", "[/INST]"):
        token_id = tokenizer.convert_tokens_to_ids(token)
        if token_id is None or token_id == tokenizer.unk_token_id:
            raise CheckpointError(f"voxtral: the tokenizer has no {token} token; it cannot write the instruct format")
        special[token] = token_id
    ids = [special["<s>"], special["[INST]"], special["[BEGIN_AUDIO]"], *[audio_token_id] * n_audio]
    ids += tokenizer.encode(prompt, add_special_tokens=False)
    ids.append(special["[/INST]"])
    ids += tokenizer.encode(response_prefix.rstrip(" "), add_special_tokens=False)  # as mistral-common does
    return torch.tensor([ids])


# -- the release path: the checkpoint's own processor and mistral-common ------------------------------------------


def _is_mistral_common(tokenizer: Any) -> bool:
    return type(tokenizer).__name__ == "MistralCommonBackend"


def _require_mistral_common_for_tekken(name_or_path: str) -> None:
    """Released checkpoints tokenize with mistral-common (`tekken.json`); without it the prompt would not be theirs."""
    if is_mistral_common_available():
        return
    if optional_checkpoint_file(name_or_path, "tekken.json") is not None:
        raise CheckpointError(
            f"{name_or_path}: this Voxtral checkpoint tokenizes with mistral-common (tekken.json), which is not "
            f"installed (it also needs Pillow): {MISTRAL_COMMON_HINT}"
        )


def _wav_base64(wave: Float[np.ndarray, " samples"]) -> str:
    """The waveform as a base64 float WAV, the lossless form mistral-common's audio chunks accept."""
    buffer = io.BytesIO()
    sf.write(buffer, wave, SAMPLING_RATE, format="WAV", subtype="FLOAT")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _mistral_common_prompt(
    processor: Any, wave: Float[np.ndarray, " samples"], prompt: str, response_prefix: str
) -> tuple[Int[torch.Tensor, "1 pos"], Float[torch.Tensor, "1 chunks mels frames"]]:
    """Tokens from the checkpoint's mistral-common tokenizer, the prefix as an assistant message left open, and
    the features of the audio it returns (padded to 30 s), computed as `VoxtralProcessor` does.

    The tokenizer is called directly: `VoxtralProcessor.apply_chat_template` (transformers 5.23) does not pass
    `continue_final_message` on, and mistral-common then rejects a final assistant message.
    """
    content = [{"type": "audio", "base64": _wav_base64(wave)}, {"type": "text", "text": prompt}]
    conversation = [{"role": "user", "content": content}]
    if response_prefix:
        conversation.append({"role": "assistant", "content": response_prefix})
    encoded = processor.tokenizer.apply_chat_template(
        conversation, continue_final_message=bool(response_prefix), tokenize=True, return_dict=True
    )
    (padded_wave,) = encoded["audio"]
    return torch.tensor([encoded["input_ids"]]), chunked_features(processor.feature_extractor, padded_wave)
