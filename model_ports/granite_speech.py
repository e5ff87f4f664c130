"""Granite-Speech (`ibm-granite/granite-speech-3.3-2b`, `ibm-granite/granite-speech-3.3-8b`): a conformer encoder, a
windowed Q-Former projector and a Granite LLM.

Release behaviour reproduced (transformers `GraniteSpeechForConditionalGeneration.forward`,
`GraniteSpeechFeatureExtractor`, the model card's prompt):
- features: an 80-mel power spectrogram (n_fft 512, a 400-sample periodic Hann window, hop 160, centred with
  reflection, HTK mel scale, no filter norm), log10 floored at 1e-10 and at the clip's maximum - 8, then / 4 + 1; an
  odd last frame dropped, and each two frames stacked into one 160-wide encoder frame (50 a second). Any length: no
  window (`audio_window` None);
- encoder: the conformer on every frame (block attention of `context_size` frames with Shaw relative positions, a
  CTC branch folded back at the middle layer); projector: the frames cut into windows of 15 (0.3 s), each read by
  3 Q-Former queries (15 / `downsample_rate` 5), then a Linear to d_model: 10 rows a second, the last window padded;
- the rows replace the `<|audio|>` tokens (the processor writes one per row); the backbone is a Granite LLM:
  `embedding_multiplier` scales the token embeddings, audio rows included, `residual_multiplier` each sublayer's
  output, and `attention_multiplier` is the attention scale. The LM head is the model's own, applied without the
  Granite LLM's `logits_scaling`: `GraniteSpeechForConditionalGeneration.forward` computes `lm_head(hidden)` itself
  (the logits are `logits_scaling` times those of a `GraniteForCausalLM` on the same states);
- prompt: the checkpoint's chat template over the model card's system turn (`SYSTEM_PROMPT`) and the user turn
  "<|audio|>{question}"; the response prefix follows "<|start_of_role|>assistant<|end_of_role|>".

The shell: TransformerLens bridges `GraniteForCausalLM` and shows each multiplier where it acts. The embedding's acts
outside the decoder layers (in `GraniteModel.forward`), where the fast engine, which runs the embedding, the layers
and the head itself, would not see it; the shell moves it into the embedding module instead (the embedding times
`embedding_multiplier`, 1.0 in the shell's config), the same float operation as the release forward, and sets the
shell's `logits_scaling` to 1.0 as the release head applies none. So `hook_embed` holds the scaled embeddings, what
enters the residual stream, as TransformerLens's Granite adapter shows them, and the audio rows are written there
already scaled.

Tracing: the fast engine equals the reference engine on the residual stream (`resid_pre`, `resid_post`). The bridge
shows a block's `hook_attn_out` / `hook_mlp_out` scaled by `residual_multiplier` (what is added to the residual
stream), while the fast engine's layers call those hook points on the unscaled outputs, so its `attn_out` / `mlp_out`
patches are off and the runtime audit refuses them (`ExactnessError`); `engine="transformer_lens"` is exact for
every kind.

Two release parts need libraries the pinned environment lacks, so:
- the release feature extractor needs torchaudio, which has no build for torch 2.13: the port computes the same
  features with torch (`GraniteLogMel`), tested against a float64 numpy oracle here and against the release
  extractor where torchaudio is installed;
- the released checkpoints ship a LoRA adapter that the release turns on when audio is present
  (`has_lora_adapter`); transformers loads it only with `peft` installed, so loading such a checkpoint without peft
  is refused rather than run without the adapter. The suite's tiny models have no adapter.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from jaxtyping import Float, Int
from torch import nn
from transformers import GraniteForCausalLM, GraniteModel, GraniteSpeechForConditionalGeneration
from transformers.utils import is_peft_available

from audiolens_ct.errors import CheckpointError
from audiolens_ct.hub import checkpoint_file, optional_checkpoint_file, read_checkpoint_config, read_json
from audiolens_ct.ports import AudioHooks, Backbone, TinyVariant, meta_shell
from model_ports._native import AudioTextProcessor, NativePort
from model_ports._tiny import tiny_bpe_tokenizer

SYSTEM_PROMPT = (
    "Knowledge Cutoff Date: April 2024.\nToday's Date: April 9, 2025.\nYou are Granite, developed by IBM. You are a "
    "helpful AI assistant"
)
"""The model card's system turn (a fixed date, so every prompt is the same; the template would insert today's)."""
AUDIO_TOKEN = "<|audio|>"
SPECIAL_TOKENS = ("<|end_of_text|>", "<|start_of_role|>", "<|end_of_role|>", AUDIO_TOKEN)
TINY_CHAT_TEMPLATE = (
    "{% for message in messages %}<|start_of_role|>{{ message['role'] }}<|end_of_role|>{{ message['content'] }}"
    "<|end_of_text|>\n{% endfor %}{% if add_generation_prompt %}<|start_of_role|>assistant<|end_of_role|>{% endif %}"
)
"""The layout the release template writes for system and user turns, for the tiny test models."""
PEFT_HINT = "pip install peft"
CLIPS = (0.6, 3.0, 11.0)  # within one conformer attention block, and across several (with a partial last one)


class GraniteLogMel:
    """Granite-Speech's log-mel features (the release `GraniteSpeechFeatureExtractor`) computed with torch alone.

    Reads and writes the release `preprocessor_config.json`.
    """

    def __init__(
        self, sampling_rate: int = 16000, n_fft: int = 512, win_length: int = 400, hop_length: int = 160,
        n_mels: int = 80, projector_window_size: int = 15, projector_downsample_rate: int = 5,
    ) -> None:
        self.sampling_rate, self.n_fft, self.win_length, self.hop_length = sampling_rate, n_fft, win_length, hop_length
        self.n_mels = n_mels
        self.projector_window_size, self.projector_downsample_rate = projector_window_size, projector_downsample_rate
        self.filters = htk_mel_filters(n_fft // 2 + 1, n_mels, sampling_rate)

    @classmethod
    def from_pretrained(cls, name_or_path: str) -> GraniteLogMel:
        config = read_json(checkpoint_file(name_or_path, "preprocessor_config.json", "the audio feature settings"))
        mel = config.get("melspec_kwargs", {})
        return cls(
            sampling_rate=config.get("sampling_rate", 16000), n_fft=mel.get("n_fft", 512),
            win_length=mel.get("win_length", 400), hop_length=mel.get("hop_length", 160), n_mels=mel.get("n_mels", 80),
            projector_window_size=config.get("projector_window_size", 15),
            projector_downsample_rate=config.get("projector_downsample_rate", 5),
        )

    def save_pretrained(self, directory: str | Path) -> None:
        config = {
            "feature_extractor_type": "GraniteSpeechFeatureExtractor", "processor_class": "GraniteSpeechProcessor",
            "sampling_rate": self.sampling_rate, "feature_size": self.n_mels,
            "melspec_kwargs": {"sample_rate": self.sampling_rate, "n_fft": self.n_fft, "win_length": self.win_length,
                               "hop_length": self.hop_length, "n_mels": self.n_mels},
            "projector_window_size": self.projector_window_size,
            "projector_downsample_rate": self.projector_downsample_rate,
        }  # fmt: skip
        (Path(directory) / "preprocessor_config.json").write_text(json.dumps(config, indent=2))

    def __call__(self, wave: Float[np.ndarray, " samples"]) -> dict[str, torch.Tensor]:
        """`input_features` `[1, frames // 2, 2 * n_mels]` and `input_features_mask` `[1, rows]` (all true)."""
        audio = torch.as_tensor(wave, dtype=torch.float32)
        window = torch.hann_window(self.win_length)
        spectrum = torch.stft(
            audio, self.n_fft, hop_length=self.hop_length, win_length=self.win_length, window=window, center=True,
            pad_mode="reflect", return_complex=True,
        ).abs().pow(2)  # [freqs, frames]
        mel = torch.matmul(spectrum.T, self.filters)  # [frames, mels]
        log_mel = mel.clamp(min=1e-10).log10()
        log_mel = torch.maximum(log_mel, log_mel.max() - 8.0) / 4 + 1
        log_mel = log_mel[: log_mel.shape[0] // 2 * 2]  # an odd last frame is dropped
        features = log_mel.reshape(1, -1, 2 * self.n_mels)
        return {"input_features": features, "input_features_mask": torch.ones(1, self.n_rows(audio.shape[0]), dtype=torch.bool)}

    def n_rows(self, n_samples: int) -> int:
        """Projector rows for a clip: whole windows of encoder frames, `window / downsample_rate` rows each."""
        encoder_frames = (n_samples // self.hop_length + 1) // 2
        windows = math.ceil(encoder_frames / self.projector_window_size)
        return windows * (self.projector_window_size // self.projector_downsample_rate)


def htk_mel_filters(n_freqs: int, n_mels: int, sampling_rate: int) -> Float[torch.Tensor, "n_freqs n_mels"]:
    """Triangular filters on the HTK mel scale from 0 Hz to Nyquist, unnormalised (torchaudio's `MelSpectrogram`
    defaults, which the release extractor uses)."""
    freqs = torch.linspace(0, sampling_rate // 2, n_freqs)
    top_mel = 2595.0 * math.log10(1.0 + (sampling_rate // 2) / 700.0)
    edges = 700.0 * (10 ** (torch.linspace(0.0, top_mel, n_mels + 2) / 2595.0) - 1.0)  # filter edges in Hz
    widths = edges[1:] - edges[:-1]
    distance = edges[None, :] - freqs[:, None]  # [n_freqs, n_mels + 2]
    rising, falling = -distance[:, :-2] / widths[:-1], distance[:, 2:] / widths[1:]
    return torch.clamp(torch.minimum(rising, falling), min=0.0)


class GraniteSpeechAudioProcessor(AudioTextProcessor):
    """The tokenizer, `GraniteLogMel` and the chat template of a Granite-Speech checkpoint."""

    feature_extractor_class = GraniteLogMel

    def features(self, wave: Float[np.ndarray, " samples"], sampling_rate: int) -> dict[str, torch.Tensor]:
        return self.feature_extractor(wave)


class _Scaled(nn.Module):
    """An embedding times a constant, with the embedding's `weight` (TransformerLens reads W_E from it)."""

    def __init__(self, embedding: nn.Module, multiplier: float) -> None:
        super().__init__()
        self.embedding, self.multiplier = embedding, multiplier

    @property
    def weight(self) -> torch.Tensor:
        return self.embedding.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.embedding(ids) * self.multiplier


class GraniteSpeechPort(NativePort):
    name = "granite-speech"
    hf_ids = ("ibm-granite/granite-speech-3.3-8b", "ibm-granite/granite-speech-3.3-2b")
    sampling_rate = 16000
    architectures = ("GraniteSpeechForConditionalGeneration", "granite_speech")
    audio_window = None  # the features cover the whole clip
    model_class = GraniteSpeechForConditionalGeneration
    processor_class = GraniteSpeechAudioProcessor
    causal_lm_class = GraniteForCausalLM
    tiny_variants = (
        TinyVariant("gqa", clip_seconds=CLIPS),  # 4 query heads share 2 key/value heads
        TinyVariant("mha_release_multipliers", {"text_config": {"num_key_value_heads": 4, "embedding_multiplier": 12.0,
                                                                "residual_multiplier": 0.22, "logits_scaling": 16.0}},
                    clip_seconds=CLIPS),  # fmt: skip
        # the patching checks run the release forward once per (layer, position), after the card's long system turn
        TinyVariant("patching", {"text_config": {"num_hidden_layers": 2}}, clip_seconds=(0.5,),
                    prompt="Gender? male, female.", patching=True),
    )

    def load(self, name_or_path: str, device: Any = None, dtype: torch.dtype | None = None) -> tuple[nn.Module, Any]:
        """The release classes, refusing a checkpoint whose LoRA adapter would be silently left out (no peft)."""
        adapter = read_checkpoint_config(name_or_path).get("has_lora_adapter", False)
        if adapter and not is_peft_available() and optional_checkpoint_file(name_or_path, "adapter_config.json"):
            raise CheckpointError(
                f"{name_or_path}: this Granite-Speech checkpoint applies a LoRA adapter to its LLM when audio is "
                f"present, and transformers loads it only with peft installed: {PEFT_HINT}"
            )
        return super().load(name_or_path, device, dtype)

    def tiny(self, **overrides: Any) -> tuple[nn.Module, Any]:
        """Random weights: a 2-layer conformer (attention blocks of 40 frames, 200 released), a 1-layer Q-Former, a
        3-layer Granite LLM (GQA 4:2, d 64, every multiplier away from 1); no LoRA adapter."""
        tokenizer = tiny_bpe_tokenizer(SPECIAL_TOKENS, (SYSTEM_PROMPT, "system user assistant"),
                                       eos_token="<|end_of_text|>", pad_token="<|end_of_text|>")  # fmt: skip
        overrides = copy.deepcopy(overrides)
        text = {
            "model_type": "granite", "vocab_size": len(tokenizer), "hidden_size": 64, "intermediate_size": 128,
            "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 4096,
            "embedding_multiplier": 6.0, "residual_multiplier": 0.5, "attention_multiplier": 0.0625,
            "logits_scaling": 4.0, **overrides.pop("text_config", {}),
        }
        encoder = {"input_dim": 160, "num_layers": 2, "hidden_dim": 32, "num_heads": 2, "output_dim": 8,
                   "context_size": 40, "max_pos_emb": 64, "conv_kernel_size": 15}  # fmt: skip
        projector = {"model_type": "blip_2_qformer", "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                     "intermediate_size": 64, "encoder_hidden_size": 32, "cross_attention_frequency": 1}  # fmt: skip
        config = GraniteSpeechForConditionalGeneration.config_class(
            text_config=text, encoder_config=encoder, projector_config=projector, has_lora_adapter=False,
            audio_token_index=tokenizer.convert_tokens_to_ids(AUDIO_TOKEN), **overrides,
        )
        model = GraniteSpeechForConditionalGeneration(config).eval()
        return model, GraniteSpeechAudioProcessor(tokenizer, GraniteLogMel(), TINY_CHAT_TEMPLATE)

    def backbone(self, hf_model: nn.Module) -> Backbone:
        """A `GraniteForCausalLM` shell with the embedding scaling inside its embedding and no logit scaling, as
        the release forward computes them (module docstring)."""
        text_config = hf_model.config.text_config
        decoder = hf_model.model.language_model
        shell_config = copy.deepcopy(text_config)
        shell_config.embedding_multiplier, shell_config.logits_scaling = 1.0, 1.0
        with torch.device("meta"):
            view = GraniteModel(shell_config)
        view.embed_tokens = _Scaled(decoder.embed_tokens, text_config.embedding_multiplier)
        view.layers, view.norm, view.rotary_emb = decoder.layers, decoder.norm, decoder.rotary_emb
        shell = meta_shell(GraniteForCausalLM, shell_config, view, hf_model.lm_head)
        return Backbone(shell, "GraniteForCausalLM", shell_config)

    def chat_text(self, processor: Any, prompt: str, response_prefix: str) -> str:
        """The model card's turns: its system prompt, then `<|audio|>` and the question as the user's text."""
        messages = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": AUDIO_TOKEN + prompt}]
        return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False) + response_prefix

    def tokens_and_features(
        self, hf_model: nn.Module, processor: Any, wave: Float[np.ndarray, " samples"], prompt: str,
        response_prefix: str,
    ) -> tuple[Int[torch.Tensor, "1 pos"], dict[str, torch.Tensor]]:
        features = processor.features(wave, self.sampling_rate)
        text = self.chat_text(processor, prompt, response_prefix)
        n_rows = features["input_features_mask"].shape[1]
        return processor.expand_and_tokenize(text, hf_model.config.audio_token_id, n_rows), features

    def audio_embeddings(
        self, hf_model: nn.Module, features: dict[str, torch.Tensor], extras: dict[str, Any], hooks: AudioHooks
    ) -> Float[torch.Tensor, "batch n_audio d_model"]:
        """Encoder frames -> Q-Former rows, times `embedding_multiplier` as the release scales every embedding."""
        model = hf_model.model
        encoded = hooks.hook_encoder_out(model.encoder(features["input_features"]).last_hidden_state)
        rows = model.projector(encoded)
        return hooks.hook_embeds(rows * hf_model.config.text_config.embedding_multiplier)

    def audio_row_seconds(self, hf_model: nn.Module, processor: Any, n_rows: int) -> Float[np.ndarray, " n_rows"]:
        """Each projector window (15 encoder frames, 0.3 s) gives 3 query rows; a row stands for its window's start."""
        extractor = processor.feature_extractor
        per_window = extractor.projector_window_size // extractor.projector_downsample_rate
        window_seconds = extractor.projector_window_size * 2 * extractor.hop_length / extractor.sampling_rate
        return (np.arange(n_rows) // per_window) * window_seconds
