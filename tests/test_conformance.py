"""What every port must satisfy, checked on each of its tiny configurations (`Port.tiny_variants`).

For every port `available_ports()` resolves (built-in, registered before collection, or installed through the
`audiolens_ct.ports` entry points), on random weights built offline:

- `HookedLALM` logits equal the original model's own forward (fp32, max |diff| <= 1e-5), for every clip length;
- `hook_embed` equals `blocks.0.hook_resid_pre` at every position, and its audio rows are `audio.hook_embeds`;
- restoring one position at one layer changes nothing before it;
- on the small variants: `transformer_lens.patching.get_act_patch_resid_pre` equals a plain patching loop on the
  original model (1e-5), and the fast tracing engine equals the reference engine (1e-6).

The configurations, clips and prepare arguments come from the port, so adding a port adds its rows here.
"""

from __future__ import annotations

import copy
import math

import pytest

from audiolens_ct.ports import available_ports, get_port
from audiolens_ct.testing import check_port, tiny_model, tone

CASES = [
    pytest.param(name, variant, id=f"{name}-{variant.name}")
    for name in available_ports()
    for variant in get_port(name).tiny_variants
]


@pytest.mark.parametrize(("port", "variant"), CASES)
def test_port_conforms(port, variant):
    hf_model, processor = tiny_model(port, **copy.deepcopy(variant.overrides))
    waves = [
        tone(seconds, freq=220.0 + 110.0 * i, rate=get_port(port).sampling_rate, seed=i)
        for i, seconds in enumerate(variant.clip_seconds)
    ]
    prompt = {"prompt": variant.prompt} if variant.prompt else {}
    report = check_port(
        port, hf_model, processor, waves, **prompt, tl_patching=variant.patching, fast_engine=variant.patching,
        **variant.prepare_kwargs,
    )
    # Each check asserts its own bound; here only that the patching checks ran where the variant asks for them.
    assert math.isnan(report.tl_patching_max_diff) != variant.patching
    assert math.isnan(report.fast_engine_max_diff) != variant.patching

