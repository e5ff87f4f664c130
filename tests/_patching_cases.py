"""The tiny models the span, time and head tests patch: each port's small variants, built once per test session.

A case is one port variant (`Port.tiny_variants`) with a clip, its silent twin, the clean run's cache of the
residual stream, the attention outputs and the per-head attention outputs, and the metric P(" male").
"""

from __future__ import annotations

import copy
import functools
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
import torch

import audiolens_ct as act
from audiolens_ct.data.prompts import TRACKS
from audiolens_ct.inputs import LALMInput
from audiolens_ct.ports import available_ports, get_port
from audiolens_ct.testing import tiny_model, tone
from audiolens_ct.tracing.engine_fast import FastEngine
from audiolens_ct.tracing.engine_reference import ReferenceEngine
from audiolens_ct.tracing.patches import PatchSet
from audiolens_ct.tracing.scoring import answer_probability, answer_token

GENDER = TRACKS["gender"]
KINDS = ("hook_resid_pre", "hook_resid_post", "hook_attn_out", "hook_z")
"""The activations each case caches from its clean run."""
PATCHING = [(port, v.name) for port in available_ports() for v in get_port(port).tiny_variants if v.patching]
"""Every port's small variants (the ones the conformance suite patches)."""


def params(cases: list[tuple[str, str]]) -> list[Any]:
    return [pytest.param(port, variant, id=f"{port}-{variant}") for port, variant in cases]


@dataclass
class Case:
    model: act.HookedLALM
    reference: torch.nn.Module  # an untouched copy of the Hugging Face model, for plain-PyTorch oracles
    wave: np.ndarray
    clean: LALMInput
    corrupted: LALMInput
    cache: Any
    metric: Any
    p_clean: float

    def both(self, patches: PatchSet) -> tuple[np.ndarray, np.ndarray]:
        """The patch set's P under the fast engine (2 rows a pass, so chunking is exercised) and the reference."""
        fast, ref = FastEngine(max_batch=2), ReferenceEngine()
        values = [e.evaluate(self.model, patches, self.cache, e.run_corrupted(self.model, self.corrupted), self.metric)
                  for e in (fast, ref)]  # fmt: skip
        return values[0].numpy(), values[1].numpy()


@functools.cache
def case(port: str, variant_name: str, seconds: float | None = None) -> Case:
    """The case of a port variant, on a tone of `seconds` (default: the variant's first clip length)."""
    variant = next(v for v in get_port(port).tiny_variants if v.name == variant_name)
    hf_model, processor = tiny_model(port, **copy.deepcopy(variant.overrides))
    reference = copy.deepcopy(hf_model).eval()
    model = act.HookedLALM.from_hf(hf_model, processor, port=port)
    wave = tone(seconds or variant.clip_seconds[0], freq=250.0, rate=model.port.sampling_rate)
    clean = model.prepare(wave, variant.prompt or GENDER.prompt, GENDER.response_prefix, options=list(GENDER.labels),
                          **variant.prepare_kwargs)  # fmt: skip
    corrupted = model.prepare_like(clean, np.zeros_like(wave))
    with torch.no_grad():
        logits, cache = model.run_with_cache(clean, names_filter=lambda n: n.endswith(KINDS))
    metric = functools.partial(answer_probability, target=answer_token(model.tokenizer, "male"))
    return Case(model, reference, wave, clean, corrupted, cache, metric, float(metric(logits[:, -1])))
