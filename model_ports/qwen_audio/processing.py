"""Features and prompt ids of the Qwen-Audio release: Whisper 80-mel features and the chat (ChatML) or raw format
(release `QWenTokenizer` audio handling and `qwen_generation_utils.make_context`)."""

from __future__ import annotations

import numpy as np
import torch
from jaxtyping import Float
from transformers import WhisperFeatureExtractor

from audiolens_ct.errors import InputError
from model_ports.qwen_audio.tokenization import (
    AUDIO_END,
    AUDIO_START,
    DEFAULT_SYSTEM,
    IM_END,
    IM_START,
    QwenAudioTokenizer,
)

SAMPLING_RATE = 16000
N_SAMPLES = 30 * SAMPLING_RATE
HOP_LENGTH = 160
CHAT_FORMATS = ("chatml", "raw")


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
