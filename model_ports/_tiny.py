"""Tiny random-weight parts for `Port.tiny`: a byte-level BPE tokenizer trained in code, and a native HF model.

The tokenizer is trained on the four AudioLens questions, their options and response prefixes, plus the strings a
port passes (its special tokens, system prompt, chat roles). Every option word is one token with and without a
leading space, as in the released vocabularies the answer-token logic relies on.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cache
from typing import Any

from torch import nn

TASK_TEXT = """
What animal makes the sound? Possible options: dog, cat, pig, cow, frog, hen, rooster, sheep, crow.
What is the emotion of the speaker in the speech? Possible options: angry, disgust, fear, happy, sad.
What is the gender of the speaker in the speech? Possible options: male, female.
What is the language spoken in the speech? Possible options: English, German, Spanish, French, Italian, Chinese,
Japanese, Korean. The sound file's animal is The speaker's emotion is The speaker's gender is
The speech's spoken language is Describe this audio. Thank you for calling. Goodbye.
transcribe the speech hello world the a an of in to and is it that this
"""
"""Generic task words every tiny tokenizer learns (no model's own prompt strings: ports pass those)."""

OPTION_WORDS = (
    "dog cat pig cow frog hen rooster sheep crow angry disgust fear happy sad male female "
    "English German Spanish French Italian Chinese Japanese Korean"
).split()


@cache
def _trained_bpe(special_tokens: tuple[str, ...], texts: tuple[str, ...], vocab_size: int) -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # Every option is seen often with and without a leading space, so each becomes one token both ways.
    text = "\n".join((TASK_TEXT, *texts))
    corpus = [text] * 20 + [f" {w}" for w in OPTION_WORDS for _ in range(50)] + OPTION_WORDS * 50
    tok.train_from_iterator(corpus, trainer=trainer)
    return tok.to_str()


def tiny_bpe_tokenizer(
    special_tokens: Sequence[str], texts: Sequence[str] = (), vocab_size: int = 600, **special_roles: str
) -> Any:
    """A small byte-level BPE tokenizer (a `PreTrainedTokenizerFast`) with `special_tokens` as single ids.

    `texts` are the port's own prompt strings (system prompt, chat roles...), learned beside the task words.
    `special_roles` names roles such as `eos_token="<|endoftext|>"`, `pad_token=...`, `bos_token=...`.
    """
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer.from_str(_trained_bpe(tuple(special_tokens), tuple(texts), vocab_size))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, **special_roles)
    tokenizer.add_special_tokens({"additional_special_tokens": list(special_tokens)})
    return tokenizer


TINY_WHISPER_ENCODER = dict(
    d_model=32, encoder_layers=2, encoder_attention_heads=2, encoder_ffn_dim=64, num_mel_bins=128,
    max_source_positions=1500,
)
"""A 2-layer Whisper-style audio encoder config (128 mels, 1500 positions) for tiny native models."""
TINY_QWEN2 = dict(
    model_type="qwen2", hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=4096,
)
"""A 3-layer Qwen2 text config (d 64, 4 query heads sharing 2 key/value heads) for tiny native models."""


def tiny_native(
    port: Any, tokenizer: Any, audio_config: dict[str, Any], text_config: dict[str, Any],
    overrides: dict[str, Any], feature_extractor: Any = None, processor_kwargs: dict[str, Any] | None = None,
    **config_kwargs: Any,
) -> tuple[nn.Module, Any]:
    """`port.model_class` with random weights and `port.processor_class` around `tokenizer` and a feature extractor
    (default: Whisper's, with the model's mel bins), for ports of a native transformers family. `overrides` may hold
    `audio_config` / `text_config` dicts (merged into the defaults) and top-level config values; `processor_kwargs`
    go to the processor (e.g. its `chat_template`)."""
    from transformers import WhisperFeatureExtractor

    overrides = dict(overrides)
    audio = {**audio_config, **overrides.pop("audio_config", {})}
    text = {"vocab_size": len(tokenizer), **text_config, **overrides.pop("text_config", {})}
    config = port.model_class.config_class(audio_config=audio, text_config=text, **config_kwargs, **overrides)
    model = port.model_class(config).eval()
    if feature_extractor is None:
        feature_extractor = WhisperFeatureExtractor(feature_size=config.audio_config.num_mel_bins)
    processor = port.processor_class(feature_extractor=feature_extractor, tokenizer=tokenizer, **(processor_kwargs or {}))
    return model, processor
