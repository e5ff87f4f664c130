"""Corruptions: how the audio is taken away from the corrupted run.

- `silence` (the paper's default): a zero waveform of the same length, run through the same processor and
  prompt, so the number of audio rows is unchanged for fixed-rate front-ends.
- `noise` (ROME): Gaussian noise added to the audio rows' embeddings, scale `noise_scale` (3) times the standard
  deviation of those embeddings, fixed seed; `noise_copies` noisy copies are run as one batch and their
  probabilities averaged.
- `swap`: another clip's audio (of a different label) in the same prompt; it must give the same number of audio
  rows.

A port whose prompt depends on the audio in another way (DeSTA's ASR transcript) says through
`Port.twin_kwargs` what the twin's `prepare` receives, following `TraceConfig.transcript_policy`: the clean clip's
transcript ("clean": only the audio rows differ) or the corrupted audio's own ("corrupted"; the sequences may then
differ in length, and tracing aligns the text after the audio by its offset from the end).
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

import numpy as np
import torch

from audiolens_ct.config import TraceConfig
from audiolens_ct.errors import InputError
from audiolens_ct.inputs import LALMInput

if TYPE_CHECKING:
    from audiolens_ct.model import HookedLALM


def corrupt(
    model: HookedLALM,
    clean: LALMInput,
    wave: np.ndarray,
    config: TraceConfig,
    swap_audio: np.ndarray | None = None,
) -> LALMInput:
    """The corrupted twin of `clean` (whose waveform is `wave`) under `config.corruption`, as one batch."""
    twin = model.port.twin_kwargs(clean.extras, config.transcript_policy)
    if config.corruption == "silence":
        return model.prepare_like(clean, np.zeros_like(wave), **twin)
    if config.corruption == "swap":
        if swap_audio is None:
            raise InputError("corruption='swap' needs swap_audio=<another clip's waveform>")
        swapped = model.prepare_like(clean, swap_audio, **twin)
        if swapped.audio_mask.sum() != clean.audio_mask.sum():
            raise InputError(
                f"the swap clip gives {int(swapped.audio_mask.sum())} audio rows but the clean clip "
                f"{int(clean.audio_mask.sum())}; pick a clip of the same length"
            )
        return swapped
    embeds = model.audio_embeddings(clean)
    generator = torch.Generator(device="cpu").manual_seed(config.seed)
    std = embeds.float().std().item()
    noise = torch.randn((config.noise_copies, *embeds.shape[1:]), generator=generator) * (config.noise_scale * std)
    noisy = (embeds[:1].float() + noise.to(embeds.device)).to(embeds.dtype)
    batch = LALMInput.stack([clean] * config.noise_copies)
    return replace(batch, audio_embeds_override=noisy, _audio_embeds_cache={})
