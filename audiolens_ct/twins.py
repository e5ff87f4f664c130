"""A clip and its silent twin, prepared once, for the observational views (`lens.py`, `steering.py`).

The silent twin is tracing's silence corruption (`corruption.py`): a zero waveform of the clip's length through the
same prompt (and, for a port that reads a transcript, the clean clip's transcript). The audio tower runs once for
each of the two; `with_prefix` asks the same question with another response prefix (AudioLens's reversed prefix)
reusing those audio rows, so a second prefix costs no audio tower.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import numpy as np
import torch
from jaxtyping import Float

from audiolens_ct.config import TraceConfig
from audiolens_ct.corruption import corrupt
from audiolens_ct.inputs import LALMInput

if TYPE_CHECKING:
    from audiolens_ct.data.sample import Sample
    from audiolens_ct.model import HookedLALM


@dataclass
class ClipPair:
    """A clip's clean input and its silent twin (same prompt, response prefix and options)."""

    wave: Float[np.ndarray, " samples"]
    clean: LALMInput
    silent: LALMInput

    def with_prefix(self, model: HookedLALM, response_prefix: str) -> ClipPair:
        """The same pair with another response prefix; the audio rows already computed are reused."""

        def again(inp: LALMInput, wave: np.ndarray) -> LALMInput:
            with torch.no_grad():
                rows = model.audio_embeddings(inp)
            return replace(model.prepare_like(inp, wave, response_prefix=response_prefix), audio_embeds_override=rows)

        return ClipPair(self.wave, again(self.clean, self.wave), again(self.silent, np.zeros_like(self.wave)))


def ask(model: HookedLALM, sample: Sample, wave: Float[np.ndarray, " samples"]) -> LALMInput:
    """`sample`'s question about `wave` (its clip), prepared as tracing prepares it."""
    return model.prepare(wave, sample.prompt, sample.response_prefix, options=list(sample.options),
                         object_text=sample.object_text)  # fmt: skip


def clip_pair(model: HookedLALM, sample: Sample, prepared: dict[tuple[str, str], ClipPair] | None = None) -> ClipPair:
    """`sample`'s clip asked its question, and its silent twin (reads the audio file; `AudioLoadError` if it cannot).

    `prepared`, when given, keeps the pairs by (attribute, sample id), so several views over the same clips (the
    demo's lens and steering) run each clip's audio tower once."""
    key = (sample.attribute, sample.id)
    if prepared is not None and key in prepared:
        return prepared[key]
    wave = sample.load(model.port.sampling_rate)
    clean = ask(model, sample, wave)
    pair = ClipPair(wave, clean, corrupt(model, clean, wave, TraceConfig()))
    if prepared is not None:
        prepared[key] = pair
    return pair
