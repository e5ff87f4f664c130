"""What every port of a native transformers audio LM shares: the shape of the model, its prompt and its loading.

A native audio LM (Qwen2-Audio, Qwen2.5-Omni's Thinker, Audio Flamingo 3, Voxtral, ...) is, in transformers, an
audio tower and a projector whose rows replace the placeholder tokens the processor wrote into the prompt, and a stock
text decoder with its `lm_head`. Its HF forward does three things: audio features -> rows, a placeholder mask
(`input_ids == config.audio_token_id`), and a scatter of the rows into the token embeddings. Here the port computes
the rows (`audio_embeddings`), the mask is `PortInputs.audio_mask`, and `HookedLALM` does the scatter at
`hook_embed`. `NativePort` writes the rest once:

- `backbone`: a `causal_lm_class` shell (e.g. `Qwen2ForCausalLM`) around `model.language_model` and `lm_head`;
- `encode_prompt`: the checkpoint's chat template on one user turn (the clip, then the question), the generation
  prompt, the response prefix; then the processor's tokens (placeholders expanded to one per audio row) and
  features (`feature_keys` of its output);
- `hf_logits`: the model's own forward on the tokens and features;
- `load`: `model_class.from_pretrained` and `processor_class.from_pretrained` (the `Port` default).

A port then names its classes and writes `audio_embeddings` and `tiny`; `model_ports/audioflamingo3.py` is the
worked example in CONTRIBUTING.md.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from jaxtyping import Float, Int
from torch import nn
from transformers import AutoTokenizer, WhisperFeatureExtractor

from audiolens_ct.errors import CheckpointError
from audiolens_ct.hub import optional_checkpoint_file, read_json
from audiolens_ct.ports import Backbone, Port, PortInputs, TinyVariant, meta_shell

Features = dict[str, torch.Tensor]


class NativePort(Port):
    """Base of the ports of native transformers audio LMs (see the module docstring).

    Class attributes, beside `Port`'s:
        causal_lm_class: the text decoder's causal-LM class, one TransformerLens bridges (its name is the bridge's
            architecture).
        feature_keys: the processor outputs the audio tower reads, kept as `LALMInput.audio_features`.
    """

    causal_lm_class: ClassVar[type[nn.Module]]
    feature_keys: ClassVar[tuple[str, ...]] = ("input_features",)

    def backbone(self, hf_model: nn.Module) -> Backbone:
        text_config = hf_model.config.text_config
        shell = meta_shell(self.causal_lm_class, text_config, hf_model.model.language_model, hf_model.lm_head)
        return Backbone(shell, self.causal_lm_class.__name__, text_config)

    def chat_text(self, processor: Any, prompt: str, response_prefix: str) -> str:
        """The checkpoint's chat template on one user turn, the clip then the question, with the generation prompt;
        the response prefix follows as the start of the assistant turn (no end-of-turn after it)."""
        content = [{"type": "audio", "audio_url": "clip"}, {"type": "text", "text": prompt}]
        messages = [{"role": "user", "content": content}]
        return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False) + response_prefix

    def tokens_and_features(
        self, hf_model: nn.Module, processor: Any, wave: Float[np.ndarray, " samples"], prompt: str,
        response_prefix: str,
    ) -> tuple[Int[torch.Tensor, "1 pos"], Features]:
        """The processor on `chat_text` and the clip: tokens with one placeholder per audio row, and the features."""
        text = self.chat_text(processor, prompt, response_prefix)
        batch = processor(text=[text], audio=[wave], sampling_rate=self.sampling_rate, return_tensors="pt")
        return batch["input_ids"], {key: batch[key] for key in self.feature_keys}

    def encode_prompt(
        self, hf_model: nn.Module, processor: Any, audio: Float[np.ndarray, " samples"], prompt: str,
        response_prefix: str, **kwargs: Any,
    ) -> PortInputs:
        if kwargs:
            raise TypeError(f"{self.name} takes no extra prepare arguments, got {sorted(kwargs)}")
        tokens, features = self.tokens_and_features(hf_model, processor, audio, prompt, response_prefix)
        return PortInputs(tokens=tokens, audio_features=features, audio_mask=tokens == hf_model.config.audio_token_id)

    def hf_logits(self, hf_model: nn.Module, inputs: Any) -> Float[torch.Tensor, "batch pos vocab"]:
        return hf_model(input_ids=inputs.tokens, **inputs.audio_features).logits


def decoder_variants(clips: tuple[float, ...]) -> tuple[TinyVariant, ...]:
    """The tiny configurations a Qwen2- or Llama-style backbone is checked on: grouped-query attention (4 query heads
    sharing 2 key/value heads), a head_dim decoupled from d_model / heads (4 x 24 != 64), each on `clips`, and a
    2-layer one on a 0.5-s clip for the patching checks (one forward per layer and position)."""
    return (
        TinyVariant("gqa", clip_seconds=clips),
        TinyVariant("mha_decoupled_head_dim", {"text_config": {"num_key_value_heads": 4, "head_dim": 24}},
                    clip_seconds=clips),  # fmt: skip
        TinyVariant("patching", {"text_config": {"num_hidden_layers": 2}}, clip_seconds=(0.5,), patching=True),
    )


def equal_rows(lengths: Int[torch.Tensor, " batch"], port: str) -> int:
    """The audio rows each clip of a batch gives. A batch is traced as one tensor, so its clips must give the same
    number (equal clip lengths do); otherwise a `ValueError` naming the counts."""
    n_rows = int(lengths[0])
    if not bool((lengths == n_rows).all()):
        raise ValueError(f"{port}: clips in one batch must give equal audio rows, got {lengths.tolist()}")
    return n_rows


def pooled_whisper_row_seconds(feature_extractor: Any, n_rows: int) -> Float[np.ndarray, " n_rows"]:
    """When each row of a Whisper-style tower with a stride-2 convolution and AvgPool(2, 2) starts: row k at mel
    frame 4k (25 rows a second at a 10-ms hop), for `Port.audio_row_seconds`."""
    return np.arange(n_rows) * 4 * feature_extractor.hop_length / feature_extractor.sampling_rate


class AudioTextProcessor:
    """The audio half of a multimodal processor: a checkpoint's tokenizer, feature extractor and chat template, and
    the processor's placeholder expansion.

    For families whose release processor also builds image and video processors the port never uses (Qwen2.5-Omni's
    needs torchvision for its video processor), or whose feature extractor needs a library the pinned torch has no
    build of (Granite-Speech's, torchaudio): a subclass sets `feature_extractor_class` and `features`. Reads and
    writes the release files: the tokenizer's, the feature extractor's `preprocessor_config.json`, and the chat
    template (`chat_template.jinja`, else `chat_template.json`, else the tokenizer's own).
    """

    feature_extractor_class: ClassVar[Any] = WhisperFeatureExtractor

    def __init__(self, tokenizer: Any, feature_extractor: Any, chat_template: str) -> None:
        self.tokenizer = tokenizer
        self.feature_extractor = feature_extractor
        self.chat_template = chat_template

    @classmethod
    def from_pretrained(cls, name_or_path: str) -> AudioTextProcessor:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path)
        feature_extractor = cls.feature_extractor_class.from_pretrained(name_or_path)
        return cls(tokenizer, feature_extractor, _chat_template(name_or_path, tokenizer))

    def save_pretrained(self, directory: str | Path) -> None:
        self.tokenizer.save_pretrained(directory)
        self.feature_extractor.save_pretrained(directory)
        (Path(directory) / "chat_template.jinja").write_text(self.chat_template)

    def apply_chat_template(self, messages: list[dict[str, Any]], **kwargs: Any) -> Any:
        return self.tokenizer.apply_chat_template(messages, chat_template=self.chat_template, **kwargs)

    def features(self, wave: Float[np.ndarray, " samples"], sampling_rate: int) -> Features:
        """Whisper log-mel features padded to the extractor's window (cut beyond it), with the mask of the real
        frames (`feature_attention_mask`)."""
        out = self.feature_extractor(
            wave, sampling_rate=sampling_rate, padding="max_length", return_attention_mask=True, return_tensors="pt"
        )
        return {"input_features": out["input_features"], "feature_attention_mask": out["attention_mask"]}

    def expand_and_tokenize(self, text: str, audio_token_id: int, n_rows: int) -> Int[torch.Tensor, "1 pos"]:
        """`text` with its one audio placeholder written `n_rows` times, tokenized as the processor does."""
        placeholder = self.tokenizer.convert_ids_to_tokens(audio_token_id)
        if text.count(placeholder) != 1:
            raise CheckpointError(
                f"the chat template wrote the audio placeholder {placeholder!r} {text.count(placeholder)} times for "
                "one clip; expected once"
            )
        return self.tokenizer(text.replace(placeholder, placeholder * n_rows), return_tensors="pt")["input_ids"]


def _chat_template(name_or_path: str, tokenizer: Any) -> str:
    jinja = optional_checkpoint_file(name_or_path, "chat_template.jinja")
    if jinja is not None:
        return jinja.read_text()
    stored = optional_checkpoint_file(name_or_path, "chat_template.json")
    if stored is not None:
        template = read_json(stored).get("chat_template")
        if isinstance(template, str):
            return template
    if isinstance(tokenizer.chat_template, str):
        return tokenizer.chat_template
    raise CheckpointError(
        f"{name_or_path}: no chat template (chat_template.jinja, chat_template.json or the tokenizer's); the prompt "
        "format comes from it"
    )

