"""Exactness at run time: every fast trace audits a few of its own cells against full TransformerLens forwards, a
broken fast engine raises instead of returning wrong maps, and a plain-PyTorch outside oracle agrees."""

import copy
from functools import partial

import numpy as np
import pytest
import torch
from conftest import GENDER_PREFIX, GENDER_PROMPT

import audiolens_ct as act
from audiolens_ct.errors import ExactnessError, UnsupportedHookError
from audiolens_ct.testing import hf_patch_loop, tiny_model, tone
from audiolens_ct.tracing import audit, layer_wise, token_wise
from audiolens_ct.tracing.decoder import PrefixKV
from audiolens_ct.tracing.engine_fast import FastEngine
from audiolens_ct.tracing.scoring import answer_probability, answer_tokens


def fast_grid(model, patches, cache, corrupted, target):
    """P(target) of each patch, by the fast engine, on a corrupted input."""
    engine = FastEngine()
    return engine.evaluate(model, patches, cache, engine.run_corrupted(model, corrupted),
                           partial(answer_probability, target=target))


@pytest.fixture(scope="module")
def kept_clip(qwen2_audio_model):
    from test_tracing import listening_options

    wave = tone(1.0, 250)
    target, options = listening_options(qwen2_audio_model, wave)
    return wave, target, options


def test_a_fast_trace_audits_its_last_layer_cell_and_three_seeded_token_cells(qwen2_audio_model, kept_clip):
    model = qwen2_audio_model
    wave, target, options = kept_clip
    fast = act.trace(model, wave, GENDER_PROMPT, GENDER_PREFIX, target=target, options=options, seed=7)
    ref = act.trace(model, wave, GENDER_PROMPT, GENDER_PREFIX, target=target, options=options, seed=7,
                    engine="transformer_lens")
    cells = fast.audit["cells"]
    assert [c["mode"] for c in cells] == ["corrupted", "layer-wise"] + ["token-wise"] * audit.TOKEN_CELLS
    assert cells[1]["layer"] == model.cfg.n_layers - 1
    last = len(fast.str_tokens) - 1
    token_cells = cells[2:]
    assert token_cells[0]["position"] == last and token_cells[0]["token"] == fast.str_tokens[last]
    assert len({(c["layer"], c["position"]) for c in token_cells}) == audit.TOKEN_CELLS
    assert all(c["layer"] >= 1 for c in token_cells)  # a resid_pre patch before layer 0 changes nothing: not drawn
    # the audited values are the fast grid's, and the reference values are the reference engine's
    column = {p: j for j, p in enumerate(fast.positions)}
    assert cells[0]["reference"] == pytest.approx(ref.p_corrupted, abs=1e-12)
    assert cells[1]["fast"] == fast.p_layer[-1] and cells[1]["reference"] == pytest.approx(ref.p_layer[-1], abs=1e-12)
    for c in token_cells:
        assert c["fast"] == fast.p_token[c["layer"], column[c["position"]]]
        assert c["reference"] == pytest.approx(ref.p_token[c["layer"], column[c["position"]]], abs=1e-12)
    assert fast.audit["max_abs_diff"] == max(c["abs_diff"] for c in cells) <= 1e-6
    assert (fast.audit["tolerance"], fast.audit["dtype"]) == (1e-5, "float32")
    assert ref.audit is None
    # deterministic from the seed, and kept through a save/load round trip
    again = act.trace(model, wave, GENDER_PROMPT, GENDER_PREFIX, target=target, options=options, seed=7)
    assert [(c.get("layer"), c.get("position")) for c in again.audit["cells"]] == [
        (c.get("layer"), c.get("position")) for c in cells]  # fmt: skip
    assert audit.token_cells(8, 30, seed=1) != audit.token_cells(8, 30, seed=2)


def test_audit_off_runs_no_extra_forward(qwen2_audio_model, kept_clip, monkeypatch):
    wave, target, options = kept_clip
    calls = []
    monkeypatch.setattr(audit, "patched_metric", lambda *a, **k: calls.append(a) or 0.0)
    res = act.trace(qwen2_audio_model, wave, GENDER_PROMPT, GENDER_PREFIX, target=target, options=options, audit=False)
    assert res.audit is None and calls == []


def test_the_fast_engine_does_not_depend_on_how_a_layer_names_its_cache_argument(
    qwen2_audio_model, kept_clip, monkeypatch
):
    """transformers 5.24 renamed `past_key_values` to `cache`; layers that ignore both change nothing here."""
    model = qwen2_audio_model
    wave, target, options = kept_clip
    layer_class = type(model.bridge.blocks[0].original_component)
    forward = layer_class.forward

    def without_cache(self, *args, **kwargs):
        kwargs.pop("past_key_values", None), kwargs.pop("cache", None)
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(layer_class, "forward", without_cache)
    fast = act.trace(model, wave, GENDER_PROMPT, GENDER_PREFIX, target=target, options=options, audit=False)
    ref = act.trace(model, wave, GENDER_PROMPT, GENDER_PREFIX, target=target, options=options, engine="transformer_lens")
    assert np.abs(fast.p_token - ref.p_token).max() <= 1e-6 and np.abs(fast.p_layer - ref.p_layer).max() <= 1e-6


def _drop_prefix(self, layer, keys, values):
    """The failure transformers 5.24 caused through the bridge: each suffix attends only to itself."""
    return keys, values


def test_a_fast_engine_that_loses_its_prefix_raises_instead_of_returning_wrong_maps(
    qwen2_audio_model, kept_clip, monkeypatch
):
    model = qwen2_audio_model
    wave, target, options = kept_clip
    ref = act.trace(model, wave, GENDER_PROMPT, GENDER_PREFIX, target=target, options=options, engine="transformer_lens")
    monkeypatch.setattr(PrefixKV, "extend", _drop_prefix)
    wrong = act.trace(model, wave, GENDER_PROMPT, GENDER_PREFIX, target=target, options=options, audit=False)
    assert np.abs(wrong.token_rr - ref.token_rr).max() > 0.5  # what an unaudited trace would silently return
    with pytest.raises(ExactnessError) as err:
        act.trace(model, wave, GENDER_PROMPT, GENDER_PREFIX, target=target, options=options)
    message = str(err.value)
    assert "-wise cell (layer " in message and "fast P=" in message and "reference P=" in message
    assert "> 1e-05 (float32)" in message
    for name, version in audit.versions().items():
        assert f"{name} {version}" in message


def test_hooks_the_fast_engine_cannot_fire_are_refused_and_the_rest_fire(qwen2_audio_model, kept_clip):
    model = qwen2_audio_model
    wave, target, options = kept_clip
    clean = model.prepare(wave, GENDER_PROMPT, GENDER_PREFIX, options=options)
    corrupted = model.prepare_like(clean, np.zeros_like(wave))
    _, cache = model.run_with_cache(clean, names_filter=lambda n: n.endswith("hook_resid_pre"))
    patches = layer_wise(model.cfg.n_layers, clean.text_positions, clean.text_positions)
    tid = answer_tokens(model.tokenizer, options)[target]
    with model.hooks(fwd_hooks=[("blocks.1.attn.hook_pattern", lambda x, hook: x)]):
        with pytest.raises(UnsupportedHookError, match="blocks.1.attn.hook_pattern.*engine='transformer_lens'"):
            fast_grid(model, patches, cache, corrupted, tid)
        res = act.trace(model, wave, GENDER_PROMPT, GENDER_PREFIX, target=target, options=options, modes=("layer",),
                        engine="transformer_lens")  # the reference engine fires every hook
        assert res.p_layer is not None
    last = model.cfg.n_layers - 1
    seen = []
    with model.hooks(fwd_hooks=[(f"blocks.{last}.hook_mlp_out", lambda x, hook: seen.append(x.clone()))]):
        fast_grid(model, patches, cache, corrupted, tid)
    # a hook on the last layer sees every position computed, not only the last one the unembedding reads
    assert all(bool((x[:, :-1].abs().sum(-1) > 0).all()) for x in seen)


def test_the_plain_pytorch_oracle_agrees_with_the_fast_engine_on_another_port():
    """An outside oracle: forward pre-hooks on the original HF model's decoder layers, no TransformerLens."""
    hf_model, processor = tiny_model("voxtral")
    original = copy.deepcopy(hf_model).eval()
    model = act.HookedLALM.from_hf(hf_model, processor, port="voxtral")
    wave = tone(0.8, 300)
    clean = model.prepare(wave, GENDER_PROMPT, GENDER_PREFIX)
    corrupted = model.prepare_like(clean, np.zeros_like(wave))
    tid = answer_tokens(model.tokenizer, ["male"])["male"]
    positions = clean.text_positions
    _, cache = model.run_with_cache(clean, names_filter=lambda n: n.endswith("hook_resid_pre"))
    fast = fast_grid(model, token_wise(model.cfg.n_layers, positions, positions), cache, corrupted, tid)

    def metric(logits):
        return logits[:, -1].float().softmax(-1)[:, tid].mean()

    oracle = hf_patch_loop("voxtral", original, clean, corrupted, range(model.cfg.n_layers), positions, metric)
    spread = (oracle - oracle[0, 0]).abs().max()  # how far the patches move the answer
    assert spread > 1e-5
    assert (fast.reshape(oracle.shape) - oracle.double()).abs().max() <= min(1e-6, 1e-3 * float(spread))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_traces_pass_their_audit(dtype):
    hf_model, processor = tiny_model("qwen2-audio")
    model = act.HookedLALM.from_hf(hf_model.to(dtype), processor, port="qwen2-audio")
    res = act.trace(model, tone(1.0, 250), GENDER_PROMPT, GENDER_PREFIX, target="male", options=["male", "female"],
                    trace_excluded=True)
    assert res.audit["dtype"] == str(dtype).removeprefix("torch.")
    assert res.audit["max_abs_diff"] <= audit.TOLERANCE[dtype]
