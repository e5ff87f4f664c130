"""`HookedLALM.generate`: the original model's own greedy continuation, token for token, on every port; hooks at every
step; sampling from the model's own distribution.

The oracle (`audiolens_ct.testing.hf_greedy`) runs on an untouched deep copy of the Hugging Face model made before
the bridge wraps it: the model's own `generate` (with its key/value cache) where the class has one, and a greedy
loop over the port's own forward (whole sequence each step, no cache) for the re-implemented ports.
"""

from __future__ import annotations

import pytest
import torch
from _tiny_ports import GENDER, tiny

from audiolens_ct.errors import InputError, UnsupportedHookError
from audiolens_ct.inputs import LALMInput
from audiolens_ct.ports import available_ports
from audiolens_ct.testing import hf_greedy, tone

NEW_TOKENS = 24


@pytest.mark.parametrize("port", available_ports())
def test_greedy_generate_equals_the_original_models_own_generation(port):
    model, reference, inp = tiny(port)
    ours = model.generate(inp, NEW_TOKENS, stop_at_eos=False)
    theirs = hf_greedy(port, reference, inp, NEW_TOKENS)
    assert ours.shape == (1, NEW_TOKENS)
    assert torch.equal(ours, theirs), f"{port}: ours {ours.tolist()} vs the original's {theirs.tolist()}"


@pytest.mark.parametrize("port", ["qwen2-audio", "qwen-audio"])  # the original's own generate; the recompute loop
def test_rows_stop_at_the_end_of_sequence_token_and_are_padded_like_the_original(port):
    model, reference, _ = tiny(port)
    waves = [tone(0.5, freq=f, rate=model.port.sampling_rate, seed=s) for s, f in enumerate((220.0, 330.0))]
    batch = LALMInput.stack([model.prepare(w, GENDER.prompt, GENDER.response_prefix) for w in waves])
    free = model.generate(batch, 12, stop_at_eos=False)
    eos = int(free[0, 4])  # row 0 ends at its fifth token at the latest
    ours = model.generate(batch, 12, eos_token_id=eos)
    assert torch.equal(ours, hf_greedy(port, reference, batch, 12, eos_token_id=eos))
    end = int((ours[0] == eos).nonzero()[0])
    assert end <= 4 and torch.equal(ours[0, : end + 1], free[0, : end + 1])
    assert bool((ours[0, end:] == eos).all()), "a finished row is padded with the end-of-sequence id"


def test_every_supported_hook_point_fires_at_every_step_on_the_new_position():
    model, _, inp = tiny("qwen2-audio")
    last = model.cfg.n_layers - 1
    names = ["hook_embed", *(f"blocks.{layer}.hook_{kind}" for layer in (0, last)
                             for kind in ("resid_pre", "attn_out", "mlp_out", "resid_post")),
             "ln_final.hook_normalized", "unembed.hook_out"]  # fmt: skip
    seen: dict[str, list[int]] = {name: [] for name in names}

    def record(name):
        return lambda x, hook: seen[name].append(x.shape[1])

    with torch.no_grad():
        before = model(inp)
    new = model.generate(inp, 6, stop_at_eos=False, fwd_hooks=[(name, record(name)) for name in names])
    assert new.shape == (1, 6)
    prompt = inp.shape[1]
    for name in names:
        # the prefill sees the prompt (the unembedding only its last position), then one new position a step
        first = 1 if name.startswith(("ln_final", "unembed")) else prompt
        assert seen[name] == [first] + [1] * 5, f"{name} fired on {seen[name]} positions"
    with torch.no_grad():
        assert torch.equal(model(inp), before), "generate left a hook or the audio splice behind"


def test_a_hook_the_generation_loop_would_skip_is_refused_by_name():
    model, _, inp = tiny("qwen2-audio")
    with pytest.raises(UnsupportedHookError, match="blocks.0.attn.hook_pattern"):
        model.generate(inp, 3, fwd_hooks=[("blocks.0.attn.hook_pattern", lambda x, hook: x)])


def test_sampling_draws_from_the_models_own_distribution_and_repeats_with_a_seed():
    model, reference, inp = tiny("qwen2-audio")
    drawn = model.generate(inp, 8, do_sample=True, temperature=0.7, seed=5, stop_at_eos=False)
    assert torch.equal(drawn, model.generate(inp, 8, do_sample=True, temperature=0.7, seed=5, stop_at_eos=False))
    with torch.no_grad():
        own = (model.port.hf_logits(reference, inp)[:, -1] / 0.7).softmax(-1)
    expected = torch.multinomial(own, 1, generator=torch.Generator().manual_seed(5))[:, 0]
    assert int(drawn[0, 0]) == int(expected[0])
    greedy = model.generate(inp, 8, stop_at_eos=False)
    assert torch.equal(model.generate(inp, 8, do_sample=True, top_k=1, seed=1, stop_at_eos=False), greedy)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (dict(max_new_tokens=0), "max_new_tokens must be an integer >= 1, got 0"),
        (dict(do_sample=True, temperature=0.0), "temperature must be > 0"),
        (dict(do_sample=True, top_p=1.5), "top_p must be in"),
        (dict(do_sample=True, top_k=0), "top_k must be an integer >= 1, got 0"),
    ],
)
def test_bad_generation_arguments_name_the_value(options, message):
    model, _, inp = tiny("qwen2-audio")
    with pytest.raises(InputError, match=message):
        model.generate(inp, **{"max_new_tokens": 4, **options})
