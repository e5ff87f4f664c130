"""Causal tracing: the fast engine equals the TransformerLens reference engine; RR and exclusion follow the paper."""

import itertools
from functools import partial

import numpy as np
import pytest
import torch
from conftest import GENDER_PREFIX, GENDER_PROMPT

import audiolens_ct as act
from audiolens_ct.errors import AudioLoadError, InputError
from audiolens_ct.testing import tone
from audiolens_ct.tracing import layer_wise, token_wise
from audiolens_ct.tracing.engine_fast import FastEngine
from audiolens_ct.tracing.engine_reference import ReferenceEngine
from audiolens_ct.tracing.scoring import answer_probability, answer_tokens

WORDS = ["male", "female", "dog", "cat", "pig", "cow", "frog", "hen", "sheep", "crow", "angry", "happy", "sad", "fear"]


def listening_options(model, wave):
    """Two options for which this random model's clean run predicts the first and the silent run the second."""
    clean = model.prepare(wave, GENDER_PROMPT, GENDER_PREFIX)
    silent = model.prepare(np.zeros_like(wave), GENDER_PROMPT, GENDER_PREFIX)
    with torch.no_grad():
        p_clean = model(clean)[0, -1].softmax(-1)
        p_silent = model(silent)[0, -1].softmax(-1)
    ids = answer_tokens(model.tokenizer, WORDS)
    for a, b in itertools.permutations(WORDS, 2):
        ia, ib = ids[a], ids[b]
        if p_clean[ia] > p_clean[ib] and p_silent[ib] > p_silent[ia] and p_clean[ia] > p_silent[ia]:
            return a, [a, b]
    raise AssertionError("no option pair separates the clean and silent runs of this tiny model")


@pytest.fixture(scope="module")
def kept(qwen2_audio_model):
    wave = tone(1.0, 250)
    target, options = listening_options(qwen2_audio_model, wave)
    return wave, target, options


CASES = [
    ("resid_pre", 1, "silence"),
    ("resid_post", 1, "silence"),
    ("attn_out", 1, "noise"),
    ("mlp_out", 3, "silence"),
    ("attn_out", 3, "swap"),
]


@pytest.mark.parametrize(("kind", "window", "corruption"), CASES)
def test_fast_engine_equals_reference_engine(qwen2_audio_model, kept, kind, window, corruption):
    wave, target, options = kept
    common = dict(target=target, options=options, kind=kind, window=window, corruption=corruption,
                  noise_copies=3, swap_audio=tone(1.0, 800, seed=5), trace_excluded=True)
    fast = act.trace(qwen2_audio_model, wave, GENDER_PROMPT, GENDER_PREFIX, engine="fast", max_batch=2, **common)
    ref = act.trace(qwen2_audio_model, wave, GENDER_PROMPT, GENDER_PREFIX, engine="transformer_lens", **common)
    assert fast.p_token.shape == (qwen2_audio_model.cfg.n_layers, len(fast.positions))
    assert np.abs(fast.p_token - ref.p_token).max() <= 1e-6
    assert np.abs(fast.p_layer - ref.p_layer).max() <= 1e-6
    assert abs(fast.p_corrupted - ref.p_corrupted) <= 1e-6
    if not fast.excluded:
        assert np.abs(fast.token_rr - ref.token_rr).max() <= 1e-5
        assert np.abs(fast.layer_rr - ref.layer_rr).max() <= 1e-5
    # the patches do something: some patched probability moves away from the corrupted one
    assert np.abs(fast.p_token - fast.p_corrupted).max() > 1e-6


def test_kept_sample_has_finite_rr_and_segment_summaries(qwen2_audio_model, kept):
    wave, target, options = kept
    res = act.trace(qwen2_audio_model, wave, GENDER_PROMPT, GENDER_PREFIX, target=target, options=options)
    assert not res.excluded and res.exclusion_reason is None
    assert res.clean_prediction == target and res.corrupted_prediction != target
    assert np.isfinite(res.layer_rr).all() and np.isfinite(res.token_rr).all()
    # before layer 0 a text position holds only its token embedding, the same in both runs: nothing to recover
    assert np.abs(res.token_rr[0]).max() <= 1e-4 and abs(res.layer_rr[0]) <= 1e-4
    assert np.abs(res.token_rr[1:]).max() > 1e-3
    last = res.positions.index(len(res.str_tokens) - 1)
    # the last position's output of the last layer is all the unembedding reads: restoring it recovers fully
    post = act.trace(qwen2_audio_model, wave, GENDER_PROMPT, GENDER_PREFIX, target=target, options=options,
                     kind="resid_post", modes=("token",))
    assert post.token_rr[-1, last] == pytest.approx(1.0, abs=1e-4)
    assert np.abs(np.delete(post.token_rr[-1], last)).max() <= 1e-4
    assert set(res.segment_rr) == {"early_prompt", "late_prompt", "last"} | ({"object"} if res.segments["object"] else set())
    assert res.segment_rr["last"] == pytest.approx(res.token_rr[:, last].tolist())


def test_exclusion_keeps_probabilities_and_gives_no_rr(qwen2_audio_model, kept):
    wave, target, options = kept
    wrong = [o for o in options if o != target][0]
    res = act.trace(qwen2_audio_model, wave, GENDER_PROMPT, GENDER_PREFIX, target=wrong, options=options)
    assert res.excluded and res.exclusion_reason == "clean_wrong"
    assert res.layer_rr is None and res.token_rr is None
    assert 0 < res.p_clean < 1 and 0 < res.p_corrupted < 1


@pytest.fixture(scope="module")
def silenced(qwen2_audio_model, kept):
    """The kept clip, its silent twin, and the clean run's resid_pre cache."""
    wave, _, options = kept
    clean = qwen2_audio_model.prepare(wave, GENDER_PROMPT, GENDER_PREFIX, options=options)
    corrupted = qwen2_audio_model.prepare_like(clean, np.zeros_like(wave))
    _, cache = qwen2_audio_model.run_with_cache(clean, names_filter=lambda n: n.endswith("hook_resid_pre"))
    return clean, corrupted, cache


def test_fast_engine_reuses_one_corrupted_run_across_chunk_sizes(qwen2_audio_model, kept, silenced):
    model = qwen2_audio_model
    _, target, options = kept
    clean, corrupted, cache = silenced
    run = FastEngine().run_corrupted(model, corrupted)
    direct = ReferenceEngine().run_corrupted(model, corrupted)
    assert (run.last_logits - direct.last_logits).abs().max() <= 1e-5
    patches = token_wise(model.cfg.n_layers, clean.text_positions, clean.text_positions)
    metric = partial(answer_probability, target=answer_tokens(model.tokenizer, options)[target])
    grids = [FastEngine(max_batch=b).evaluate(model, patches, cache, run, metric) for b in (1, 2, 64)]
    assert torch.allclose(grids[0], grids[1], atol=1e-9) and torch.allclose(grids[0], grids[2], atol=1e-9)
    layer = FastEngine().evaluate(model, layer_wise(model.cfg.n_layers, clean.text_positions, clean.text_positions),
                                  cache, run, metric)
    assert layer.shape == (model.cfg.n_layers,)


def test_bad_inputs_fail_clearly(qwen2_audio_model):
    model = qwen2_audio_model
    with pytest.raises(InputError, match="'wolf' is not among the options"):
        act.trace(model, tone(1.0), GENDER_PROMPT, GENDER_PREFIX, target="wolf", options=["male", "female"])
    # " catalog" and " cat" share the tiny tokenizer's first token " cat"
    assert model.tokenizer.tokenize(" catalog")[0] == model.tokenizer.tokenize(" cat")[0]
    with pytest.raises(InputError, match="distinct tokens.*'cat', 'catalog'"):
        act.trace(model, tone(1.0), GENDER_PROMPT, GENDER_PREFIX, target="cat", options=["cat", "catalog"])
    with pytest.raises(AudioLoadError, match="mono 1-D"):
        act.trace(model, np.zeros((16000, 2)), GENDER_PROMPT, GENDER_PREFIX, target="male", options=["male", "female"])
    with pytest.raises(InputError, match="unknown engine"):
        act.trace(model, tone(1.0), GENDER_PROMPT, GENDER_PREFIX, target="male", options=["male", "female"],
                  engine="nnsight")
    with pytest.raises(InputError, match="same length"):
        act.trace(model, tone(1.0), GENDER_PROMPT, GENDER_PREFIX, target="male", options=["male", "female"],
                  corruption="swap", swap_audio=tone(2.0))


def test_result_round_trips_through_json_and_npz(qwen2_audio_model, kept, tmp_path):
    wave, target, options = kept
    res = act.trace(qwen2_audio_model, wave, GENDER_PROMPT, GENDER_PREFIX, target=target, options=options)
    for suffix in (".json", ".npz"):
        back = act.TraceResult.load(res.save(tmp_path / f"r{suffix}"))
        assert np.array_equal(back.token_rr, res.token_rr) and np.array_equal(back.layer_rr, res.layer_rr)
        assert back.segments == res.segments and back.meta == res.meta and back.p_clean == res.p_clean
    assert res.meta["engine"] == "fast" and res.meta["corruption"] == "silence" and "torch" in res.meta["versions"]


def test_engines_agree_when_clean_and_corrupted_lengths_differ(qwen2_audio_model, kept):
    """Like DeSTA with a changed transcript: the text after the audio is aligned by its offset from the end."""
    from audiolens_ct.tracing import aligned_positions

    model = qwen2_audio_model
    wave, target, options = kept
    clean = model.prepare(wave, GENDER_PROMPT, GENDER_PREFIX, options=options)
    longer = model.prepare_like(clean, np.zeros(2 * len(wave), np.float32))
    src, dst = aligned_positions(clean, longer)
    offset = longer.shape[1] - clean.shape[1]
    assert offset > 0 and src == clean.text_positions and dst == [p + offset for p in src]
    assert [longer.str_tokens[0][d] for d in dst] == [clean.str_tokens[0][s] for s in src]
    _, cache = model.run_with_cache(clean, names_filter=lambda n: n.endswith("hook_mlp_out"))
    metric = partial(answer_probability, target=answer_tokens(model.tokenizer, options)[target])
    for patches in (token_wise(model.cfg.n_layers, src, dst, kind="mlp_out"),
                    layer_wise(model.cfg.n_layers, src, dst, kind="mlp_out")):
        fast, reference = FastEngine(max_batch=3), ReferenceEngine()
        fast_values = fast.evaluate(model, patches, cache, fast.run_corrupted(model, longer), metric)
        ref = reference.evaluate(model, patches, cache, reference.run_corrupted(model, longer), metric)
        assert (fast_values - ref).abs().max() <= 1e-6


PORT_CASES = [("resid_pre", 1, "silence"), ("attn_out", 1, "noise"), ("mlp_out", 3, "swap"), ("resid_post", 1, "silence")]


@pytest.mark.parametrize("port", ["voxtral", "qwen-audio"])
def test_fast_engine_equals_reference_engine_on_other_ports(port):
    from audiolens_ct.testing import tiny_model

    model = act.HookedLALM.from_hf(*tiny_model(port), port=port)
    wave = tone(0.8, 300)
    for kind, window, corruption in PORT_CASES:
        common = dict(target="male", options=["male", "female"], kind=kind, window=window, corruption=corruption,
                      noise_copies=2, swap_audio=tone(0.8, 700, seed=3), trace_excluded=True)
        fast = act.trace(model, wave, GENDER_PROMPT, GENDER_PREFIX, engine="fast", max_batch=2, **common)
        ref = act.trace(model, wave, GENDER_PROMPT, GENDER_PREFIX, engine="transformer_lens", **common)
        assert np.abs(fast.p_token - ref.p_token).max() <= 1e-6, (port, kind)
        assert np.abs(fast.p_layer - ref.p_layer).max() <= 1e-6, (port, kind)
        assert np.abs(fast.p_token - fast.p_corrupted).max() > 0, (port, kind)


@pytest.mark.parametrize(("port", "policy"), [("desta2", "clean"), ("desta2.5", "corrupted")])
def test_fast_engine_equals_reference_engine_on_desta(port, policy):
    """DeSTA reads an ASR transcript; under the 'corrupted' policy silence gets its own, shorter, transcript."""
    from audiolens_ct.testing import tiny_model

    if policy == "corrupted":
        pytest.importorskip("silero_vad")
    model = act.HookedLALM.from_hf(*tiny_model(port), port=port)
    cases = PORT_CASES[:2] if policy == "corrupted" else PORT_CASES[:3]  # a swap clip's ASR would be random text
    for kind, window, corruption in cases:
        common = dict(target="male", options=["male", "female"], kind=kind, window=window, corruption=corruption,
                      noise_copies=2, swap_audio=tone(0.8, 700, seed=3), trace_excluded=True,
                      transcript_policy=policy, port_kwargs={"transcript": "hello world the speaker"})
        fast = act.trace(model, tone(0.8, 300), GENDER_PROMPT, GENDER_PREFIX, engine="fast", max_batch=2, **common)
        ref = act.trace(model, tone(0.8, 300), GENDER_PROMPT, GENDER_PREFIX, engine="transformer_lens", **common)
        assert np.abs(fast.p_token - ref.p_token).max() <= 1e-6, (port, kind)
        assert np.abs(fast.p_layer - ref.p_layer).max() <= 1e-6, (port, kind)
        assert fast.meta["transcript_policy"] == policy and fast.meta["clean_transcript"] == "hello world the speaker"
        if policy == "corrupted" and corruption == "silence":
            assert fast.meta["corrupted_transcript"] == " "
            assert fast.meta["corrupted_length"] < fast.meta["clean_length"]


def test_transformer_lens_hooks_fire_inside_the_fast_engine(qwen2_audio_model, kept, silenced):
    model = qwen2_audio_model
    _, target, options = kept
    clean, corrupted, cache = silenced
    seen = []
    patches = layer_wise(model.cfg.n_layers, clean.text_positions, clean.text_positions)
    metric = partial(answer_probability, target=answer_tokens(model.tokenizer, options)[target])
    with model.hooks(fwd_hooks=[("blocks.1.hook_mlp_out", lambda x, hook: seen.append(tuple(x.shape)))]):
        engine = FastEngine()
        engine.evaluate(model, patches, cache, engine.run_corrupted(model, corrupted), metric)
    # once in the corrupted run (full length), then in the suffix pass (rows joined at layers 0 and 1)
    assert seen[0][1] == corrupted.shape[1] and seen[-1][1] == len(clean.text_positions)
