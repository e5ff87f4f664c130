"""DeSTA2 (`DeSTA-ntu/DeSTA2-8B-beta`): whisper-small taps -> Q-Former connector -> Meta-Llama-3-8B-Instruct.

Release behaviour reproduced (`kehanlu/DeSTA2: desta/modeling_desta.py`):
- audio: the released loader reads files with `librosa.load` (resampled to 22.05 kHz) and resamples to 16 kHz,
  so even a 16-kHz clip goes 16k -> 22.05k -> 16k. With `release_resampling=True` (default) the port applies
  that double resampling to the 16-kHz waveform it is given; this is exact for 16-kHz files (SAKURA's rate).
  Whisper log-mel features, padded to 30 s.
- taps: HF `hidden_states` tuple indices [2, 5, 8, 11] of whisper-small (the outputs of layers 2, 5, 8, 11).
  The training code tapped one layer later (0-based layer-loop indices); `tap_convention="layer_loop"` selects
  that reading of the same ids.
- connector: 2-layer Q-Former, 64 queries per tap, softmax mixing per query, LayerNorm + Linear -> 64 rows.
- transcript: greedy Whisper ASR with the checkpoint's generation config, special tokens skipped, not stripped;
  it replaces the audio path inside the audio turn. `prepare(..., transcript="...")` passes one in instead.
- prompt: the Llama-3 chat template over roles system / audio / user, split at the audio path into `left` and
  `right`; `tokenizer(left + transcript + right)` adds a BOS before the template's own (two BOS), and the 64 rows
  are inserted at `len(tokenizer.tokenize(left))`, i.e. right after the audio turn's `<|end_header_id|>` and
  before its "\\n\\n". Here they are 64 placeholder tokens at that index, overwritten by the splice.
  The response prefix follows the assistant header.

Checkpoint layout: `config.json` (`llama_model_id`, `whisper_model_id`, `prompt_size`; optionally
`target_layer_ids` and `qformer_num_hidden_layers`, extensions of this port) and `qformer_connector.pth` (the connector's `torch.save`d state
dict). Whisper and the LLM are loaded by id (`from_pretrained`, hub cache honoured) or from the port's `whisper=`
/ `llm=` overrides. The LLM runs in `dtype` (default fp32; the release uses bf16), Whisper and the connector in fp32.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from jaxtyping import Bool, Float, Int
from torch import nn

from audiolens_ct.errors import CheckpointError, InputError
from audiolens_ct.ports import AudioHooks, PortInputs, TinyVariant
from model_ports._desta_common import (
    LLAMA3_CHAT_TEMPLATE,
    SAMPLING_RATE,
    DestaAudioModel,
    DestaPortBase,
)

SYSTEM_PROMPT = "Focus on the input audio."
AUDIO_PATH = "<audio file>"  # stands for the audio path in the messages; the transcript takes its place


class Desta2Model(DestaAudioModel):
    """DeSTA2 as one module; `forward` is the released input path (the conformance oracle)."""

    def forward(
        self, input_ids: Int[torch.Tensor, "batch text_pos"], audio_position: int,
        input_features: Float[torch.Tensor, "batch mels frames"],
    ) -> Float[torch.Tensor, "batch pos vocab"]:
        """Logits for the released `input_ids` (no audio rows): the connector rows are concatenated at
        `audio_position` into the token embeddings, then the LLM runs on `inputs_embeds`."""
        embeds = self.embed(input_ids)
        rows = self.connector_rows(input_features).to(embeds.device, embeds.dtype)
        spliced = torch.cat([embeds[:, :audio_position], rows, embeds[:, audio_position:]], dim=1)
        return self.llm(inputs_embeds=spliced).logits


class Desta2Port(DestaPortBase):
    """DeSTA2. Options: `whisper=` / `llm=` override the ids of config.json with local directories or other ids;
    `tap_convention` ("hidden_states" as released, or "layer_loop" as trained); `release_resampling`."""

    name = "desta2"
    hf_ids = ("DeSTA-ntu/DeSTA2-8B-beta",)
    architectures = ("DestaModel",)
    model_class = Desta2Model
    whisper_key, default_whisper = "whisper_model_id", "openai/whisper-small"
    llm_key, default_llm = "llama_model_id", "meta-llama/Meta-Llama-3-8B-Instruct"
    connector_file = "qformer_connector.pth"
    release_target_layers = {
        **DestaPortBase.release_target_layers, "openai/whisper-large-v3": [3, 7, 11, 15, 19, 23, 27, 31],
    }
    tiny_mels = 80
    tiny_chat_template = LLAMA3_CHAT_TEMPLATE
    tiny_variants = (
        # A fixed transcript keeps the checks free of the tiny Whisper's random ASR.
        TinyVariant(
            "release_like", clip_seconds=(0.7, 4.0), prepare_kwargs={"transcript": " Thank you for calling. Goodbye."}
        ),
        # The TL check runs the oracle (Whisper + connector + LLM) once per (layer, position): keep it small.
        TinyVariant(
            "patching", {"prompt_size": 4, "target_layer_ids": (0,), "whisper_config": {"encoder_layers": 0}},
            clip_seconds=(0.5,), prepare_kwargs={"transcript": " Hello.", "system_prompt": "Hi."},
            prompt="Gender? Options: male, female.", patching=True,
        ),
    )

    def __init__(
        self, whisper: str | None = None, llm: str | None = None, tap_convention: str = "hidden_states",
        release_resampling: bool = True,
    ) -> None:
        super().__init__(whisper, llm)
        self.tap_convention = tap_convention
        self.release_resampling = release_resampling

    def connector_state(self, path: Path) -> dict[str, torch.Tensor]:
        """The release's `torch.save`d connector state dict."""
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # torch.load raises several types for corrupt or foreign files
            raise CheckpointError(f"{path}: not a torch-saved state dict ({exc})") from exc

    def encode_prompt(
        self, hf_model: nn.Module, processor: Any, audio: Float[np.ndarray, " samples"], prompt: str,
        response_prefix: str, transcript: str | None = None, system_prompt: str = SYSTEM_PROMPT,
    ) -> PortInputs:
        """Tokens in the released layout; `transcript` (default: Whisper's) and the system prompt are options."""
        wave = _release_resampling(audio) if self.release_resampling else audio
        features = processor.features(wave)
        if transcript is None:
            transcript = processor.transcribe(hf_model.whisper, features)
        tokenizer = processor.tokenizer
        messages = [
            {"role": "system", "content": system_prompt},
            {"role": "audio", "content": AUDIO_PATH},
            {"role": "user", "content": prompt},
        ]
        context = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        if context.count(AUDIO_PATH) != 1:
            raise InputError(f"desta2: the prompt or system prompt must not contain {AUDIO_PATH!r}")
        left, right = context.split(AUDIO_PATH)
        text = left + transcript + right + response_prefix
        audio_position = len(tokenizer.tokenize(left))
        ids = tokenizer(text)["input_ids"]  # adds the release's second BOS
        n_rows = hf_model.settings.prompt_size
        placeholder = tokenizer.convert_tokens_to_ids(hf_model.settings.placeholder_token)
        tokens = torch.tensor([ids[:audio_position] + [placeholder] * n_rows + ids[audio_position:]])
        audio_mask: Bool[torch.Tensor, "1 pos"] = torch.zeros_like(tokens, dtype=torch.bool)
        audio_mask[0, audio_position : audio_position + n_rows] = True
        return PortInputs(
            tokens=tokens,
            audio_features={"input_features": features},
            audio_mask=audio_mask,
            extras={"transcript": transcript},
        )

    def audio_embeddings(
        self, hf_model: nn.Module, features: dict[str, torch.Tensor], extras: dict[str, Any], hooks: AudioHooks
    ) -> Float[torch.Tensor, "batch n_audio d_model"]:
        return hooks.hook_embeds(hf_model.connector_rows(features["input_features"], hooks))

    def hf_logits(self, hf_model: nn.Module, inputs: Any) -> Float[torch.Tensor, "batch pos vocab"]:
        mask = inputs.audio_mask
        released_ids = inputs.tokens[~mask].view(mask.shape[0], -1)
        return hf_model(released_ids, inputs.audio_positions[0], inputs.audio_features["input_features"])


def _release_resampling(wave: Float[np.ndarray, " samples"]) -> Float[np.ndarray, " samples"]:
    """16 kHz -> 22.05 kHz -> 16 kHz with librosa's default resampler, as `librosa.load` + `librosa.resample` do."""
    import librosa

    up = librosa.resample(wave, orig_sr=SAMPLING_RATE, target_sr=22050)
    return librosa.resample(up, orig_sr=22050, target_sr=SAMPLING_RATE).astype(np.float32)
