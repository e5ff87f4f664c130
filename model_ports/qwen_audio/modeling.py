"""The Qwen-Audio v1 forward pass on native transformers modules: the release `audio.AudioEncoder` as
`QwenAudioTower`, the QWen decoder as `Qwen2ForCausalLM`, and the `<audio>` span splice (release `modeling_qwen.py`)."""

from __future__ import annotations

import math

import torch
from jaxtyping import Bool, Float, Int
from torch import nn
from transformers import Qwen2AudioEncoder, Qwen2AudioEncoderConfig, Qwen2Config, Qwen2ForCausalLM
from transformers.masking_utils import create_bidirectional_mask

from audiolens_ct.errors import InputError


def audio_span_mask(
    input_ids: Int[torch.Tensor, "batch pos"], start_id: int, end_id: int
) -> Bool[torch.Tensor, "batch pos"]:
    """True from each `<audio>` to its `</audio>`, both tags included."""
    is_start, is_end = input_ids == start_id, input_ids == end_id
    return (is_start.cumsum(-1) - is_end.cumsum(-1) + is_end.long()) > 0


def whisper_sinusoids(length: int, channels: int) -> Float[torch.Tensor, "length channels"]:
    """The Whisper/Qwen-Audio positional table: sin | cos halves, timescales 10000^(−k/(channels/2 − 1))."""
    inv_timescales = torch.exp(-math.log(10000) / (channels // 2 - 1) * torch.arange(channels // 2))
    scaled = torch.arange(length)[:, None] * inv_timescales[None, :]
    return torch.cat([scaled.sin(), scaled.cos()], dim=1)


class QwenAudioTower(nn.Module):
    """The release `AudioEncoder` on native modules.

    `encoder` is a `Qwen2AudioEncoder` whose `layer_norm` plays `ln_post` (it follows the AvgPool, as in the
    release); its positional table holds the release sinusoids. `proj` maps to the LLM width and
    `audio_bos_eos_token` holds the two learned rows that replace `<audio>` and `</audio>`.
    """

    def __init__(self, config: Qwen2AudioEncoderConfig, output_dim: int) -> None:
        super().__init__()
        self.encoder = Qwen2AudioEncoder(config)
        self.proj = nn.Linear(config.d_model, output_dim)
        self.audio_bos_eos_token = nn.Embedding(2, output_dim)
        with torch.no_grad():
            self.encoder.embed_positions.weight.copy_(whisper_sinusoids(config.max_source_positions, config.d_model))

    def encode(
        self, input_features: Float[torch.Tensor, "batch mels frames"], input_audio_lengths: Int[torch.Tensor, "batch 2"]
    ) -> Float[torch.Tensor, "batch pooled d_audio"]:
        """Encoder states after AvgPool and `ln_post`, for the mel truncated to the longest clip (2·T_cnn frames)."""
        enc = self.encoder
        t_cnn = input_audio_lengths[:, 0].to(enc.conv1.weight.device)
        n_frames = int(t_cnn.max())
        mel = input_features[:, :, : 2 * n_frames].to(enc.conv1.weight.device, enc.conv1.weight.dtype)
        x = nn.functional.gelu(enc.conv1(mel))
        x = nn.functional.gelu(enc.conv2(x)).permute(0, 2, 1)
        x = x + enc.embed_positions.weight[:n_frames]
        valid = torch.arange(n_frames, device=x.device)[None, :] < t_cnn[:, None]
        mask = None
        if not bool(valid.all()):
            x = x * valid[..., None]
            mask = create_bidirectional_mask(config=enc.config, inputs_embeds=x, attention_mask=valid.long())
        for layer in enc.layers:
            x = layer(x, mask)
        x = enc.avg_pooler(x.permute(0, 2, 1)).permute(0, 2, 1)
        return enc.layer_norm(x)

    def rows(
        self, states: Float[torch.Tensor, "batch pooled d_audio"], input_audio_lengths: Int[torch.Tensor, "batch 2"]
    ) -> Float[torch.Tensor, "batch span d_model"]:
        """`[bos; proj(states)[:N]; eos]` per clip; every clip of a batch must give the same N."""
        n_rows = input_audio_lengths[:, 1]
        n = int(n_rows[0])
        if not bool((n_rows == n).all()):
            raise InputError(f"qwen-audio: clips in one batch must give equal audio rows, got {n_rows.tolist()}")
        x = self.proj(states[:, :n])
        bos, eos = self.audio_bos_eos_token.weight[:, None, :].expand(2, x.shape[0], x.shape[-1])
        return torch.cat([bos[:, None], x, eos[:, None]], dim=1)

    def forward(
        self, input_features: Float[torch.Tensor, "batch mels frames"], input_audio_lengths: Int[torch.Tensor, "batch 2"]
    ) -> Float[torch.Tensor, "batch span d_model"]:
        return self.rows(self.encode(input_features, input_audio_lengths), input_audio_lengths)


class QwenAudioModel(nn.Module):
    """Qwen-Audio v1: `llm` (`Qwen2ForCausalLM`) and `audio` (`QwenAudioTower`).

    `forward` is the port's oracle: embed the tokens, overwrite each `<audio>` … `</audio>` span with the clip's
    rows, run the LLM. `seq_length` is the release context beyond which v1 turns on dynamic NTK / logN attention
    (None when the checkpoint disables both).
    """

    def __init__(
        self, text_config: Qwen2Config, audio_config: Qwen2AudioEncoderConfig, audio_start_id: int,
        seq_length: int | None = 2048,
    ) -> None:
        super().__init__()
        self.llm = Qwen2ForCausalLM(text_config)
        self.audio = QwenAudioTower(audio_config, text_config.hidden_size)
        self.audio_start_id = audio_start_id
        self.audio_end_id = audio_start_id + 1  # the release looks for `</audio>` at the next id
        self.seq_length = seq_length

    @property
    def config(self) -> Qwen2Config:
        return self.llm.config

    def forward(
        self, input_ids: Int[torch.Tensor, "batch pos"], input_features: Float[torch.Tensor, "batch mels frames"],
        input_audio_lengths: Int[torch.Tensor, "batch 2"],
    ) -> Float[torch.Tensor, "batch pos vocab"]:
        embeds = self.llm.get_input_embeddings()(input_ids)
        rows = self.audio(input_features, input_audio_lengths)
        mask = audio_span_mask(input_ids, self.audio_start_id, self.audio_end_id)
        embeds = embeds.masked_scatter(mask[..., None], rows.to(embeds.dtype))
        return self.llm(inputs_embeds=embeds).logits
