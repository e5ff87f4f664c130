"""Corruptions: how the audio is taken away from the corrupted run.

- `silence` (the paper's default): a zero waveform of the same length, run through the same processor and
  prompt, so the number of audio rows is unchanged for fixed-rate front-ends.
- `noise` (ROME): Gaussian noise added to the audio rows' embeddings, scale `noise_scale` (3) times the standard
  deviation of those embeddings, fixed seed; `noise_copies` noisy copies are run as one batch and their
  probabilities averaged.
- `swap`: another clip's audio (of a different label) in the same prompt; it must give the same number of audio
  rows.

Ports that feed an ASR transcript next to the audio (DeSTA) see their transcript change with the audio. The
`transcript_policy` says which one the corrupted run reads: "clean" (the clean clip's transcript: only the audio
rows differ) or "corrupted" (the corrupted audio's own transcript; the sequences may then differ in length, and
tracing aligns the text after the audio by its offset from the end).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import numpy as np
import torch

from audiolens_ct.choices import CORRUPTIONS, TRANSCRIPT_POLICIES
from audiolens_ct.errors import InputError
from audiolens_ct.inputs import LALMInput


def _transcript_overrides(clean: LALMInput, policy: str) -> dict[str, Any]:
    if policy not in TRANSCRIPT_POLICIES:
        raise InputError(f"unknown transcript policy {policy!r}; use one of {TRANSCRIPT_POLICIES}")
    if "transcript" not in clean.extras:
        return {}
    return {"transcript": clean.extras["transcript"] if policy == "clean" else None}


def corrupt(
    model: Any,
    clean: LALMInput,
    wave: np.ndarray,
    corruption: str = "silence",
    *,
    swap_audio: np.ndarray | None = None,
    noise_scale: float = 3.0,
    noise_copies: int = 10,
    seed: int = 0,
    transcript_policy: str = "clean",
) -> LALMInput:
    """The corrupted twin of `clean` (whose waveform is `wave`), as one `LALMInput` batch."""
    overrides = _transcript_overrides(clean, transcript_policy)
    if corruption == "silence":
        return model.prepare_like(clean, np.zeros_like(wave), **overrides)
    if corruption == "swap":
        if swap_audio is None:
            raise InputError("corruption='swap' needs swap_audio=<another clip's waveform>")
        swapped = model.prepare_like(clean, swap_audio, **overrides)
        if swapped.audio_mask.sum() != clean.audio_mask.sum():
            raise InputError(
                f"the swap clip gives {int(swapped.audio_mask.sum())} audio rows but the clean clip "
                f"{int(clean.audio_mask.sum())}; pick a clip of the same length"
            )
        return swapped
    if corruption == "noise":
        if noise_copies < 1:
            raise InputError(f"noise_copies must be >= 1, got {noise_copies}")
        embeds = model.audio_embeddings(clean)
        generator = torch.Generator(device="cpu").manual_seed(seed)
        std = embeds.float().std().item()
        noise = torch.randn((noise_copies, *embeds.shape[1:]), generator=generator) * (noise_scale * std)
        noisy = (embeds[:1].float() + noise.to(embeds.device)).to(embeds.dtype)
        batch = LALMInput.stack([clean] * noise_copies)
        return replace(batch, audio_embeds_override=noisy, _audio_embeds_cache={})
    raise InputError(f"unknown corruption {corruption!r}; use one of {CORRUPTIONS}")
