"""DeSTA2.5-Audio (`DeSTA-ntu/DeSTA2.5-Audio-Llama-3.1-8B`): whisper-large-v3 taps -> Q-Former -> Llama-3.1-8B.

Release behaviour reproduced (`kehanlu/DeSTA2.5-Audio: desta/models/modeling_desta25.py`):
- audio: mono 16 kHz (channels averaged, resampled only when the rate differs); Whisper 128-mel features, 30 s.
- taps: the Whisper encoder run layer by layer, tapped after the layers with 0-based loop index [7, 15, 23, 31]
  (outputs of layers 8, 16, 24, 32), never through the final LayerNorm.
- connector: the Q-Former has `qformer_num_hidden_layers` layers (6 in the release), 64 queries per tap.
- transcript: Silero VAD first; no speech -> " ". Otherwise greedy Whisper ASR (at most 128 new tokens),
  special tokens skipped, stripped. `prepare(..., transcript="...")` passes one in instead and is used as
  given (the release would still force " " on a clip without speech: pass transcript=" " to reproduce that).
  The VAD uses the `silero-vad` package (a dependency; it ships its weights); `vad=False` skips it.
- prompt: the Llama-3.1 chat template (system turn with the date header) over system / user messages, the user
  turn `<|AUDIO|>\\n{question}`; `<|AUDIO|>` becomes `<start_audio>` + (64 + T) x `<|reserved_special_token_87|>`
  + `<end_audio>` (T = transcript tokens) and the text is tokenised without added special tokens (one BOS).
  The run is overwritten by the 64 connector rows followed by the transcript's token embeddings (tokenised on
  its own, no special tokens), so all 64 + T rows are audio rows here. The response prefix follows the
  assistant header.
- eval mode: the release's own `from_pretrained` leaves the connector in training mode (Q-Former dropout 0.1) and
  its README quickstart never calls `.eval()`; its evaluation script does, and the port reproduces that.

Checkpoint layout: `config.json` (`llm_model_id`, `encoder_model_id`, `qformer_num_hidden_layers`,
`prompt_size`, `placeholder_token`, `target_layer_ids`, ...) and `model.safetensors` holding only the connector
(`perception.connector.*`). Whisper and the LLM come by id (`from_pretrained`, hub cache honoured) or from the
port's `whisper=` / `llm=` overrides. The LLM runs in `dtype` (default fp32; the release uses bf16), Whisper and
the connector in fp32.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from jaxtyping import Float, Int
from torch import nn

from audiolens_ct.errors import CheckpointError, InputError
from audiolens_ct.ports import AudioHooks, PortInputs, TinyVariant
from model_ports._desta_common import LLAMA31_CHAT_TEMPLATE, DestaAudioModel, DestaPortBase

CONNECTOR_PREFIX = "perception.connector."
SYSTEM_PROMPT = "Focus on the audio clips and instructions."
AUDIO_LOCATOR = "<|AUDIO|>"
ASR_MAX_NEW_TOKENS = 128
SILERO_HINT = "pip install silero-vad"
# Llama-3.1's rope scaling, as in the released LLM's config.json.
LLAMA31_ROPE = {
    "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}


class Desta25Model(DestaAudioModel):
    """DeSTA2.5-Audio as one module; `forward` is the released input path (the conformance oracle)."""

    def audio_rows(
        self, input_features: Float[torch.Tensor, "batch mels frames"], transcript_ids: Int[torch.Tensor, "batch T"],
        hooks: AudioHooks | None = None,
    ) -> Float[torch.Tensor, "batch P_plus_T d_llm"]:
        """The 64 connector rows followed by the transcript's token embeddings."""
        rows = self.connector_rows(input_features, hooks)
        text = self.embed(transcript_ids).to(rows.device)
        return torch.cat([rows, text.to(rows.dtype)], dim=1)

    def forward(
        self, input_ids: Int[torch.Tensor, "batch pos"], audio_start: int,
        input_features: Float[torch.Tensor, "batch mels frames"], transcript_ids: Int[torch.Tensor, "batch T"],
    ) -> Float[torch.Tensor, "batch pos vocab"]:
        """Logits for the released `input_ids` (placeholder run included): the run starting at `audio_start` is
        overwritten with the audio rows, then the LLM runs on `inputs_embeds`."""
        embeds = self.embed(input_ids).clone()
        rows = self.audio_rows(input_features, transcript_ids)
        embeds[:, audio_start : audio_start + rows.shape[1]] = rows.to(embeds.device, embeds.dtype)
        return self.llm(inputs_embeds=embeds).logits


class Desta25Port(DestaPortBase):
    """DeSTA2.5-Audio. Options: `whisper=` / `llm=` override the ids of config.json with local directories or other
    ids; `vad` (default True, as released) gates ASR on Silero VAD."""

    name = "desta2.5"
    hf_ids = ("DeSTA-ntu/DeSTA2.5-Audio-Llama-3.1-8B",)
    architectures = ("DeSTA25AudioModel", "desta25")
    model_class = Desta25Model
    whisper_key, default_whisper = "encoder_model_id", "openai/whisper-large-v3"
    llm_key, default_llm = "llm_model_id", "DeSTA-ntu/Llama-3.1-8B-Instruct"
    connector_file = "model.safetensors"
    tap_convention = "layer_loop"
    release_target_layers = {**DestaPortBase.release_target_layers, "openai/whisper-large-v3": [7, 15, 23, 31]}
    tiny_mels = 128
    tiny_chat_template = LLAMA31_CHAT_TEMPLATE
    tiny_llm_config = {"rope_parameters": LLAMA31_ROPE}
    tiny_qformer_layers = 6
    tiny_variants = (
        # A fixed transcript keeps the checks free of VAD and the tiny Whisper's random ASR.
        TinyVariant(
            "release_like", clip_seconds=(0.7, 4.0), prepare_kwargs={"transcript": " Thank you for calling. Goodbye."}
        ),
        # The TL check runs the oracle (Whisper + connector + LLM) once per (layer, position): keep it small.
        TinyVariant(
            "patching",
            {"prompt_size": 4, "target_layer_ids": (0,), "qformer_layers": 1,
             "whisper_config": {"encoder_layers": 1, "encoder_attention_heads": 1}},
            clip_seconds=(0.5,), prepare_kwargs={"transcript": " Hello.", "system_prompt": "Hi."},
            prompt="Gender? Options: male, female.", patching=True,
        ),
    )

    def __init__(self, whisper: str | None = None, llm: str | None = None, vad: bool = True) -> None:
        super().__init__(whisper, llm)
        self.vad = vad

    def connector_state(self, path: Path) -> dict[str, torch.Tensor]:
        """The connector part of the released `model.safetensors`, prefix removed; other keys are an error."""
        from safetensors.torch import load_file

        try:
            state = load_file(str(path))
        except Exception as exc:  # safetensors raises its own error types for foreign files
            raise CheckpointError(f"{path}: not a safetensors file ({exc})") from exc
        foreign = sorted(k for k in state if not k.startswith(CONNECTOR_PREFIX))
        if foreign:
            raise CheckpointError(f"{path}: keys outside {CONNECTOR_PREFIX}* are not supported: {foreign[:6]}")
        return {k[len(CONNECTOR_PREFIX) :]: v for k, v in state.items()}

    def encode_prompt(
        self, hf_model: nn.Module, processor: Any, audio: Float[np.ndarray, " samples"], prompt: str,
        response_prefix: str, transcript: str | None = None, system_prompt: str = SYSTEM_PROMPT,
    ) -> PortInputs:
        """Tokens in the released layout; `transcript` (default: VAD + Whisper) and the system prompt are options."""
        features = processor.features(audio)
        if transcript is None:
            transcript = self._transcribe(hf_model, processor, audio, features)
        tokenizer = processor.tokenizer
        transcript_ids = tokenizer.encode(transcript, add_special_tokens=False)
        n_rows = hf_model.settings.prompt_size + len(transcript_ids)
        messages = [
            {"role": "system", "content": system_prompt},
            {"role": "user", "content": f"{AUDIO_LOCATOR}\n{prompt}"},
        ]
        context = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        if context.count(AUDIO_LOCATOR) != 1:
            raise InputError(f"desta2.5: the prompt or system prompt must not contain {AUDIO_LOCATOR!r}")
        placeholder = hf_model.settings.placeholder_token
        context = context.replace(AUDIO_LOCATOR, f"<start_audio>{placeholder * n_rows}<end_audio>")
        ids = tokenizer(context + response_prefix, add_special_tokens=False)["input_ids"]
        tokens = torch.tensor([ids])
        audio_mask = tokens == tokenizer.convert_tokens_to_ids(placeholder)
        if int(audio_mask.sum()) != n_rows:
            raise InputError(f"desta2.5: expected {n_rows} {placeholder} rows, the tokenizer gave {int(audio_mask.sum())}")
        return PortInputs(
            tokens=tokens,
            audio_features={"input_features": features},
            audio_mask=audio_mask,
            extras={"transcript": transcript, "transcript_ids": transcript_ids},
        )

    def _transcribe(
        self, hf_model: nn.Module, processor: Any, wave: Float[np.ndarray, " samples"], features: torch.Tensor
    ) -> str:
        if self.vad and not _has_speech(wave):
            return " "
        return processor.transcribe(hf_model.whisper, features, max_new_tokens=ASR_MAX_NEW_TOKENS).strip()

    def audio_embeddings(
        self, hf_model: nn.Module, features: dict[str, torch.Tensor], extras: dict[str, Any], hooks: AudioHooks
    ) -> Float[torch.Tensor, "batch n_audio d_model"]:
        ids = _transcript_ids(extras, features["input_features"].shape[0])
        return hooks.hook_embeds(hf_model.audio_rows(features["input_features"], ids, hooks))

    def hf_logits(self, hf_model: nn.Module, inputs: Any) -> Float[torch.Tensor, "batch pos vocab"]:
        features = inputs.audio_features["input_features"]
        ids = _transcript_ids(inputs.extras, features.shape[0])
        return hf_model(inputs.tokens, inputs.audio_positions[0], features, ids)


def _transcript_ids(extras: dict[str, Any], batch: int) -> Int[torch.Tensor, "batch T"]:
    """The transcript ids as a batch: one list per input, or a list of lists after `LALMInput.stack`."""
    ids = extras["transcript_ids"]
    rows = ids if ids and isinstance(ids[0], list) else [ids] * batch
    return torch.tensor(rows, dtype=torch.long).reshape(batch, -1)


@cache
def _silero_vad() -> tuple[Any, Any]:
    """Silero VAD's model and `get_speech_timestamps`, loaded once (the package ships the weights)."""
    try:
        from silero_vad import get_speech_timestamps, load_silero_vad
    except ImportError as exc:
        raise ImportError(
            "desta2.5 runs Silero VAD before transcribing, as released; install it with "
            f"{SILERO_HINT}, or pass transcript=... to prepare, or use Desta25Port(vad=False)"
        ) from exc
    return load_silero_vad(), get_speech_timestamps


def _has_speech(wave: Float[np.ndarray, " samples"]) -> bool:
    """Whether Silero VAD (default thresholds, 16 kHz) finds any speech segment, the release's ASR gate."""
    vad, speech_timestamps = _silero_vad()
    return bool(speech_timestamps(torch.from_numpy(np.ascontiguousarray(wave)), vad))
