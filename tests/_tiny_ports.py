"""Tiny models of every port with an untouched copy of the original, shared by the generation, lens and steering
tests (built once per port)."""

from __future__ import annotations

import copy
from functools import cache

import torch
from _shared_checks import wrapped_with_reference

from audiolens_ct.data.prompts import TRACKS
from audiolens_ct.inputs import LALMInput
from audiolens_ct.model import HookedLALM
from audiolens_ct.ports import get_port
from audiolens_ct.testing import tone

GENDER = TRACKS["gender"]


def small_variant(port: str):
    """The port's small tiny configuration (the one its patching checks run on)."""
    variants = get_port(port).tiny_variants
    return next((v for v in variants if v.patching), variants[0])


@cache
def tiny(port: str) -> tuple[HookedLALM, torch.nn.Module, LALMInput]:
    """A tiny model of `port` (its small variant), an untouched copy of the original, and a prepared 0.5-s clip."""
    variant = small_variant(port)
    model, reference = wrapped_with_reference(port, **copy.deepcopy(variant.overrides))
    inp = model.prepare(tone(0.5, rate=model.port.sampling_rate), variant.prompt or GENDER.prompt,
                        GENDER.response_prefix, **variant.prepare_kwargs)  # fmt: skip
    return model, reference, inp
