"""Qwen-Audio v1 (`Qwen/Qwen-Audio`, `Qwen/Qwen-Audio-Chat`) re-implemented on native transformers modules.

The release ships remote code (`QWenLMHeadModel`, tiktoken tokenizer, `audio.AudioEncoder`). This port rebuilds the
same forward pass from modules transformers already has, so it runs through the same bridge and hooks as every other
port, and loads the release weights by renaming them:

- LLM: the v1 QWen decoder is a `Qwen2ForCausalLM` (multi-head attention, q|k|v bias, no o_proj bias, SwiGLU with
  the SiLU on `w2`, RMSNorm, rotary base `rotary_emb_base`) for contexts up to `seq_length` = 2048 tokens; beyond it
  the release switches on dynamic NTK and logN attention, which this port refuses rather than reproduces;
- audio: a Whisper-large-v2-style encoder (`Qwen2AudioEncoder`, 80 mel bins) run on the mel *truncated to the real
  length* (2·T_cnn frames, positions [:T_cnn], the Whisper sinusoid table), frames past a clip's own length zeroed
  and masked as keys in a batch; then AvgPool ×2, `ln_post`, `proj` (1280 → d_model);
- splice: each clip's first N rows, wrapped in the two learned `audio_bos_eos_token` vectors, overwrite the whole
  `<audio>` … `</audio>` span (N + 2 rows), so the tag tokens' own embeddings are never used;
- features: the Whisper log-mel (80 bins) of the waveform padded to 30 s (`WhisperFeatureExtractor`); mel_len =
  min(samples, 480000) // 160, T_cnn = (mel_len − 1)//2 + 1, N = (T_cnn − 2)//2 + 1. The release decodes files with
  ffmpeg to int16; this port uses the float waveform it is given;
- prompts: ChatML for the chat model (`Audio 1:<audio>…</audio>\\n{question}` as the user turn, each piece tokenised
  on its own as the release `make_context` does), raw text for the base model (`<audio>…</audio>{prompt}`); the
  response prefix follows.
"""

from __future__ import annotations

import base64
import json
import math
import unicodedata
from collections.abc import Iterable, Sequence
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from jaxtyping import Bool, Float, Int
from torch import nn
from transformers import (
    Qwen2AudioEncoder,
    Qwen2AudioEncoderConfig,
    Qwen2Config,
    Qwen2ForCausalLM,
    WhisperFeatureExtractor,
)
from transformers.masking_utils import create_bidirectional_mask
from transformers.models.qwen2.modeling_qwen2 import Qwen2RotaryEmbedding

from audiolens_ct.errors import CheckpointError, InputError
from audiolens_ct.ports import AudioHooks, Backbone, Port, PortInputs, meta_shell

SAMPLING_RATE = 16000
N_SAMPLES = 30 * SAMPLING_RATE
HOP_LENGTH = 160
CHAT_FORMATS = ("chatml", "raw")
DEFAULT_SYSTEM = "You are a helpful assistant."

# -- tokenizer -----------------------------------------------------------------------------------------------------

# The release pre-tokeniser: like cl100k, but digits are split one at a time.
PAT_STR = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
AUDIO_PAD = "[[[AUDIO:modality]]]"
AUDIO_START, AUDIO_END = "<audio>", "</audio>"
IM_START, IM_END, ENDOFTEXT = "<|im_start|>", "<|im_end|>", "<|endoftext|>"
_LANGUAGES = ("en", "zh", "de", "es", "ko", "fr", "ja", "it")

# Special tokens after the BPE ranks, in the release order (ids are len(ranks) + index): `<|endoftext|>` 151643 ...
# `<audio>` 155163, `</audio>` 155164 with the release vocabulary.
CHAT_SPECIALS = (ENDOFTEXT, IM_START, IM_END, *(f"<|extra_{i}|>" for i in range(205)))
AUDIO_SPECIALS = (
    AUDIO_PAD,
    "<|startoftranscript|>", "<|startofanalysis|>",
    "<|translate|>", "<|transcribe|>", "<|caption|>", "<|keyword|>",
    "<|unknown|>", *(f"<|{lang}|>" for lang in _LANGUAGES), "<|zh_tr|>",
    "<|notimestamps|>", "<|sil|>", "<|timestamps|>", *(f"<|{i * 0.01:.2f}|>" for i in range(3001)),
    "<|caption_audiocaps|>", "<|caption_clotho|>", "<|audioset_ontology|>", "<|caption_plain|>", "<|itn|>", "<|wo_itn|>",
    "<|startofentityvalue|>", "<|endofentityvalue|>", "<|startofentitytype|>", "<|endofentitytype|>",
    "<|named_entity_recognition|>", "<|audio_grounding|>", "<|startofword|>", "<|endofword|>", "<|delim|>",
    "<|emotion_recognition|>", "<|music_description|>", "<|note_analysis|>",
    "<|pitch|>", *(f"<|midi_pitch_{i}|>" for i in range(128)),
    "<|velocity|>", *(f"<|midi_velocity_{i}|>" for i in range(128)),
    "<|sonic|>", "<|instrument|>", "<|speaker_meta|>", "<|song_meta|>", "<|question|>", "<|answer|>", "<|choice|>",
    "<|scene|>", "<|event|>", "<|vocal_classification|>", "<|speech_understanding|>", "<|scenario|>", "<|action|>",
    "<|entities|>", "<|speech_edit|>",
    AUDIO_START, AUDIO_END,
)
SPECIAL_TOKENS = CHAT_SPECIALS + AUDIO_SPECIALS


class QwenAudioTokenizer:
    """The release tokenizer: tiktoken BPE over `qwen.tiktoken` ranks, then the special tokens in release order.

    The same class serves the real vocabulary and the tiny test one (a small rank table built in code), so the
    port has one code path. Text is NFC-normalised first, as the release does.
    """

    def __init__(self, mergeable_ranks: dict[bytes, int], source: str = "<in memory>") -> None:
        import tiktoken

        self.mergeable_ranks = mergeable_ranks
        self.source = source
        self.special_tokens = {tok: len(mergeable_ranks) + i for i, tok in enumerate(SPECIAL_TOKENS)}
        self._encoding = tiktoken.Encoding(
            "qwen-audio", pat_str=PAT_STR, mergeable_ranks=mergeable_ranks, special_tokens=self.special_tokens
        )
        self._audio_specials = set(AUDIO_SPECIALS)

    @classmethod
    def from_file(cls, path: str | Path) -> QwenAudioTokenizer:
        """Read a `qwen.tiktoken` file: one `base64(token) rank` pair per line, ranks 0..n-1."""
        path = Path(path)
        if not path.is_file():
            raise CheckpointError(f"{path}: no such tokenizer file (the release ships qwen.tiktoken)")
        ranks: dict[bytes, int] = {}
        for number, line in enumerate(path.read_bytes().splitlines(), start=1):
            if not line:
                continue
            try:
                token, rank = line.split()
                ranks[base64.b64decode(token, validate=True)] = int(rank)
            except ValueError as exc:
                raise CheckpointError(f"{path}:{number}: not a 'base64-token rank' line ({exc})") from exc
        if sorted(ranks.values()) != list(range(len(ranks))):
            raise CheckpointError(f"{path}: ranks are not the contiguous range 0..{len(ranks) - 1}")
        return cls(ranks, source=str(path))

    def save(self, path: str | Path) -> Path:
        """Write the rank table in the release `qwen.tiktoken` format."""
        path = Path(path)
        ordered = sorted(self.mergeable_ranks.items(), key=lambda kv: kv[1])
        path.write_text("".join(f"{base64.b64encode(tok).decode()} {rank}\n" for tok, rank in ordered))
        return path

    def __len__(self) -> int:
        return self._encoding.n_vocab

    def encode(self, text: str, add_special_tokens: bool = False, allowed_special: str | set[str] = "all") -> list[int]:
        """Token ids of `text`. No BOS/EOS is ever added (the release adds none), so `add_special_tokens` is
        accepted for the Hugging Face tokenizer signature only; special tokens written in the text are parsed as
        such when in `allowed_special`, otherwise encoded as plain text."""
        return self._encoding.encode(
            unicodedata.normalize("NFC", text), allowed_special=allowed_special, disallowed_special=()
        )

    def encode_content(self, text: str) -> list[int]:
        """Ids of a chat-turn piece as the release `make_context` encodes it: only audio specials are special."""
        return self.encode(text, allowed_special=self._audio_specials)

    def decode(self, ids: Iterable[int]) -> str:
        return self._encoding.decode(list(ids), errors="replace")

    def convert_tokens_to_ids(self, tokens: str | Sequence[str]) -> int | list[int]:
        """Ids of special tokens, or of single BPE pieces given as text."""
        if isinstance(tokens, str):
            return self._token_id(tokens)
        return [self._token_id(t) for t in tokens]

    def _token_id(self, token: str) -> int:
        if token in self.special_tokens:
            return self.special_tokens[token]
        rank = self.mergeable_ranks.get(token.encode())
        if rank is None:
            raise KeyError(f"{token!r} is not a single token of the Qwen-Audio vocabulary ({self.source})")
        return rank

    def convert_ids_to_tokens(self, ids: int | Sequence[int]) -> str | list[str]:
        if isinstance(ids, int):
            return self.decode([ids])
        return [self.decode([i]) for i in ids]

    @property
    def audio_start_id(self) -> int:
        return self.special_tokens[AUDIO_START]

    @property
    def audio_end_id(self) -> int:
        return self.special_tokens[AUDIO_END]

    @property
    def audio_pad_id(self) -> int:
        return self.special_tokens[AUDIO_PAD]

    @property
    def eos_token_id(self) -> int:
        return self.special_tokens[ENDOFTEXT]

    @property
    def pad_token_id(self) -> int:
        return self.special_tokens[ENDOFTEXT]


@cache
def _tiny_ranks() -> tuple[tuple[bytes, int], ...]:
    """A ~540-piece byte-level BPE rank table, trained in code on the AudioLens prompts (for tiny models)."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    from audiolens_ct.testing import tiny_bpe_tokenizer

    vocab = tiny_bpe_tokenizer([]).backend_tokenizer.get_vocab()
    to_byte = {char: byte for byte, char in bytes_to_unicode().items()}
    pieces = sorted(vocab, key=vocab.get)
    return tuple((bytes(to_byte[c] for c in piece), rank) for rank, piece in enumerate(pieces))


def tiny_tokenizer() -> QwenAudioTokenizer:
    """The release tokenizer class over a small rank table, with every release special token."""
    return QwenAudioTokenizer(dict(_tiny_ranks()), source="<tiny rank table>")


# -- features and prompts ------------------------------------------------------------------------------------------


def audio_lengths(n_samples: int) -> tuple[int, int]:
    """`(T_cnn, N)` for a clip of `n_samples` at 16 kHz: encoder frames after the convolutions, and audio rows."""
    mel_len = min(n_samples, N_SAMPLES) // HOP_LENGTH
    t_cnn = (mel_len - 1) // 2 + 1
    return t_cnn, (t_cnn - 2) // 2 + 1


class QwenAudioProcessor:
    """Features and prompt ids of the release: Whisper 80-mel features and the chat (ChatML) or raw format.

    `chat_format` is the default format ("chatml" for Qwen-Audio-Chat, "raw" for the base model).
    """

    def __init__(self, tokenizer: QwenAudioTokenizer, chat_format: str = "chatml", system: str = DEFAULT_SYSTEM) -> None:
        _check_chat_format(chat_format, "QwenAudioProcessor")
        self.tokenizer = tokenizer
        self.chat_format = chat_format
        self.system = system
        self.feature_extractor = WhisperFeatureExtractor(feature_size=80, sampling_rate=SAMPLING_RATE)

    def features(self, wave: Float[np.ndarray, " samples"]) -> dict[str, torch.Tensor]:
        """`input_features` `[1, 80, 3000]` (the 30-s padded log-mel) and `input_audio_lengths` `[1, 2]` = [T_cnn, N]."""
        t_cnn, n_rows = audio_lengths(len(wave))
        if n_rows < 1:
            raise InputError(
                f"qwen-audio: a clip of {len(wave)} samples is too short; it needs at least 480 samples (30 ms) "
                "to give one audio row"
            )
        mel = self.feature_extractor(wave, sampling_rate=SAMPLING_RATE, return_tensors="pt")["input_features"]
        return {"input_features": mel, "input_audio_lengths": torch.tensor([[t_cnn, n_rows]])}

    def prompt_ids(self, prompt: str, response_prefix: str, span: int, chat_format: str | None = None) -> list[int]:
        """Token ids with the audio span written as `<audio>` + (span − 2) pads + `</audio>`."""
        fmt = chat_format or self.chat_format
        _check_chat_format(fmt, "prompt_ids")
        tok = self.tokenizer
        if fmt == "raw":
            return self._with_audio_span(tok.encode(f"{AUDIO_START}{AUDIO_END}{prompt}{response_prefix}"), span)
        im_start, im_end, nl = [tok.special_tokens[IM_START]], [tok.special_tokens[IM_END]], tok.encode("\n")

        def turn(role: str, content: list[int]) -> list[int]:
            return im_start + tok.encode_content(role) + nl + content + im_end

        user = self._with_audio_span(tok.encode_content(f"Audio 1:{AUDIO_START}{AUDIO_END}\n{prompt}"), span)
        return (
            turn("system", tok.encode_content(self.system)) + nl + turn("user", user) + nl
            + im_start + tok.encode_content("assistant") + nl + tok.encode_content(response_prefix)
        )

    def _with_audio_span(self, ids: list[int], span: int) -> list[int]:
        """Expand the first `<audio></audio>` pair into `<audio>` + (span − 2) pads + `</audio>` (the release
        replaces the file path between the tags the same way)."""
        tok = self.tokenizer
        start = ids.index(tok.audio_start_id)
        return ids[: start + 1] + [tok.audio_pad_id] * (span - 2) + ids[start + 1 :]


def _check_chat_format(chat_format: str, who: str) -> None:
    if chat_format not in CHAT_FORMATS:
        raise ValueError(f"{who}: chat_format must be one of {CHAT_FORMATS}, got {chat_format!r}")


def audio_span_mask(
    input_ids: Int[torch.Tensor, "batch pos"], start_id: int, end_id: int
) -> Bool[torch.Tensor, "batch pos"]:
    """True from each `<audio>` to its `</audio>`, both tags included."""
    is_start, is_end = input_ids == start_id, input_ids == end_id
    return (is_start.cumsum(-1) - is_end.cumsum(-1) + is_end.long()) > 0


# -- model ---------------------------------------------------------------------------------------------------------


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


# -- the release checkpoint layout ---------------------------------------------------------------------------------


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
    text_config, audio_config, start_id, seq_length = _configs_from_release(json.loads(config_file.read_text()), str(config_file))
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
    fmt = json.loads(path.read_text()).get("chat_format", "chatml")
    if fmt not in CHAT_FORMATS:
        raise CheckpointError(f"{path}: chat_format {fmt!r} is not one of {CHAT_FORMATS}")
    return fmt


def _checkpoint_directory(name_or_path: str) -> Path:
    """A local directory, or the hub snapshot of a repo id (cache and offline mode honoured)."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    from huggingface_hub import snapshot_download

    try:
        snapshot = Path(snapshot_download(name_or_path, allow_patterns=["*.json", "*.safetensors", "qwen.tiktoken"]))
        if not any(snapshot.glob("*.safetensors")):
            snapshot = Path(snapshot_download(name_or_path, allow_patterns=["*.json", "*.bin", "qwen.tiktoken"]))
    except Exception as exc:  # hub errors come in many types; the message is what matters
        raise CheckpointError(f"{name_or_path}: cannot fetch the checkpoint files ({type(exc).__name__}: {exc})") from exc
    return snapshot


# -- the port ------------------------------------------------------------------------------------------------------


class QwenAudioPort(Port):
    name = "qwen-audio"
    hf_ids = ("Qwen/Qwen-Audio-Chat", "Qwen/Qwen-Audio")
    sampling_rate = SAMPLING_RATE
    architectures = ("QWenLMHeadModel", "qwen")
    audio_window = 30.0  # the Whisper-style feature extractor pads or cuts every clip to 30 s

    def matches(self, config: dict[str, Any]) -> bool:
        """A QWen v1 config with an `audio` section (plain Qwen-7B and Qwen-VL have none)."""
        return super().matches(config) and isinstance(config.get("audio"), dict)

    def load(self, name_or_path: str, device: Any = None, dtype: torch.dtype | None = None) -> tuple[nn.Module, Any]:
        model, processor = load_release_checkpoint(_checkpoint_directory(name_or_path), dtype=dtype or torch.float32)
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
