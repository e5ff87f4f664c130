"""Attention to the audio: the masses are TransformerLens's own attention patterns, summed over the audio rows, per
query head (grouped-query attention included), for every port; the head ranking is 2603.06854's correlation."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from conftest import GENDER
from scipy import stats

import audiolens_ct as act
from audiolens_ct.errors import InputError
from audiolens_ct.ports import available_ports, get_port
from audiolens_ct.testing import tiny_model, tone
from audiolens_ct.tracing.attention import (
    attention_record,
    audio_attention,
    head_ranking,
    pattern_name,
    query_groups,
)


@pytest.fixture(scope="module", params=available_ports())
def port_model(request):
    """Each port's first tiny configuration (GQA where the port has it), with a 1-s clip prepared."""
    port = get_port(request.param)
    variant = port.tiny_variants[0]
    hf_model, processor = tiny_model(request.param, **copy.deepcopy(variant.overrides))
    model = act.HookedLALM.from_hf(hf_model, processor, port=request.param)
    wave = tone(1.0, rate=port.sampling_rate)
    inp = model.prepare(wave, GENDER.prompt, GENDER.response_prefix, options=GENDER.labels, **variant.prepare_kwargs)
    return model, inp, wave, variant


def test_audio_attention_is_the_hook_pattern_summed_over_the_audio_rows_on_the_same_run(port_model):
    model, inp, _, _ = port_model
    patterns = {}

    def keep(pattern: torch.Tensor, hook) -> None:
        patterns[hook.name] = pattern.detach().double()

    groups = {"last": [inp.shape[1] - 1], "object": inp.segments["object"]}
    with model.hooks(fwd_hooks=[(lambda name: name.endswith("attn.hook_pattern"), keep)]):
        masses = audio_attention(model, inp, groups)  # one forward: both sets of hooks see the same patterns
    assert set(patterns) == {pattern_name(layer) for layer in range(model.cfg.n_layers)}
    for name, positions in groups.items():
        expected = np.stack([
            patterns[pattern_name(layer)][0][:, positions][..., inp.audio_positions].sum(-1).mean(-1).numpy()
            for layer in range(model.cfg.n_layers)
        ])  # fmt: skip
        assert masses[name].shape == (model.cfg.n_layers, model.cfg.n_heads)  # query heads, also under GQA
        np.testing.assert_allclose(masses[name], expected, atol=1e-6)
    assert ((masses["last"] >= 0) & (masses["last"] <= 1 + 1e-6)).all()


def test_query_heads_sharing_a_key_value_head_have_their_own_mass(qwen2_audio_model):
    model = qwen2_audio_model
    assert model.cfg.n_key_value_heads < model.cfg.n_heads  # the shared tiny model uses grouped-query attention
    inp = model.prepare(tone(1.0), GENDER.prompt, GENDER.response_prefix, options=GENDER.labels)
    masses = audio_attention(model, inp, {"last": [-1]})["last"]
    groups = model.cfg.n_heads // model.cfg.n_key_value_heads
    assert not np.allclose(masses[:, 0], masses[:, groups - 1]), "heads of one key/value group got one mass"


def test_attention_record_compares_clean_and_silent_from_last_and_object(qwen2_audio_model):
    model = qwen2_audio_model
    wave = tone(1.0)
    clean = model.prepare(wave, GENDER.prompt, GENDER.response_prefix, options=GENDER.labels)
    silent = model.prepare_like(clean, np.zeros_like(wave))
    record = attention_record(model, clean, silent)
    assert set(record) == {"last", "object"} and set(record["last"]) == {"clean", "corrupted"}
    clean_masses = audio_attention(model, clean, {"object": clean.segments["object"]})["object"]
    np.testing.assert_allclose(record["object"]["clean"], clean_masses)
    assert not np.allclose(record["last"]["clean"], record["last"]["corrupted"])


def test_query_groups_follow_the_text_after_the_audio_when_lengths_differ(qwen2_audio_model):
    model = qwen2_audio_model
    clean = model.prepare(tone(1.0), GENDER.prompt, GENDER.response_prefix, options=GENDER.labels)
    longer = model.prepare(tone(2.0), GENDER.prompt, GENDER.response_prefix, options=GENDER.labels)
    in_clean, in_longer = query_groups(clean, longer)
    assert in_longer["last"] == [longer.shape[1] - 1]
    assert [clean.str_tokens[0][p] for p in in_clean["object"]] == [longer.str_tokens[0][p] for p in in_longer["object"]]


def test_a_query_position_outside_the_input_is_refused(qwen2_audio_model):
    inp = qwen2_audio_model.prepare(tone(1.0), GENDER.prompt, GENDER.response_prefix)
    with pytest.raises(InputError, match="query group 'far'"):
        audio_attention(qwen2_audio_model, inp, {"far": [inp.shape[1] + 3]})


def test_head_ranking_is_the_correlation_of_audio_attention_with_correctness():
    rng = np.random.default_rng(0)
    correct = rng.random(40) < 0.6
    masses = rng.random((40, 3, 4))
    masses[:, 2, 1] = 0.2 + 0.5 * correct + 0.1 * rng.random(40)  # a listening head
    masses[:, 0, 3] = 0.7 - 0.5 * correct + 0.1 * rng.random(40)  # a head that looks away when right
    masses[:, 1, 2] = 0.5  # constant: no correlation defined
    ranking = head_ranking(masses, correct)
    assert ranking.order[0] == (2, 1) and ranking.order[-1] == (0, 3)
    assert np.isnan(ranking.r[1, 2]) and (1, 2) not in ranking.order
    expected = stats.pearsonr(masses[:, 2, 1], correct.astype(float))
    assert ranking.r[2, 1] == pytest.approx(expected.statistic) and ranking.p[2, 1] == pytest.approx(expected.pvalue)
    assert (ranking.n, ranking.correct) == (40, int(correct.sum()))
    assert ranking.top(1) == [{"layer": 2, "head": 1, "r": ranking.r[2, 1], "p": ranking.p[2, 1]}]


def test_head_ranking_is_undefined_when_every_clip_is_answered_alike():
    ranking = head_ranking(np.random.default_rng(1).random((5, 2, 2)), [True] * 5)
    assert np.isnan(ranking.r).all() and ranking.order == []
    with pytest.raises(InputError, match="3 clips"):
        head_ranking(np.zeros((4, 2, 2)), [True, False, True])


def clip_record(sample_id: str, masses: np.ndarray, right: bool, status: str = "kept") -> dict:
    """A run record as `run_experiment` writes it, reduced to what aggregation reads, with attention masses."""
    result = {
        "p_clean": 0.9, "p_corrupted": 0.1, "target": "female", "clean_prediction": "female" if right else "male",
        "corrupted_prediction": "male", "exclusion_reason": None if status == "kept" else "clean_wrong",
        "attention": {"last": {"clean": masses.tolist(), "corrupted": (masses / 2).tolist()},
                      "object": {"clean": masses.tolist(), "corrupted": masses.tolist()}},
    }  # fmt: skip
    return {"attribute": "gender", "sample_id": sample_id, "status": status, "result": result}


def test_the_aggregate_ranks_heads_over_kept_and_excluded_clips_and_the_report_shows_them():
    from audiolens_ct.aggregate import Run, aggregate_records
    from audiolens_ct.plots import attention_figure
    from audiolens_ct.report import render_report

    rng = np.random.default_rng(2)
    masses = rng.random((8, 2, 3))
    right = [True, True, False, True, False, True, True, False]
    records = [clip_record(f"c{i}", m, r, "kept" if r else "excluded") for i, (m, r) in enumerate(zip(masses, right, strict=True))]
    agg = aggregate_records(records)["gender"]["attention"]
    assert agg["n"] == 8  # the clips the rules exclude are in: the ranking contrasts right and wrong answers
    np.testing.assert_allclose(agg["last"]["clean"]["mean"], masses.mean(axis=0))
    np.testing.assert_allclose(agg["last"]["corrupted"]["mean"], masses.mean(axis=0) / 2)
    direct = head_ranking(masses, right)
    np.testing.assert_allclose(np.array(agg["head_ranking"]["r"], dtype=float), direct.r)
    assert agg["head_ranking"]["top"] == direct.top(10) and agg["head_ranking"]["correct"] == 5
    run = Run("demo", {"settings": {"model": "demo"}, "interval": "", "attributes": aggregate_records(records)})
    figure = attention_figure(run, "gender")
    assert len([t for t in figure.data if t.type == "heatmap"]) == 5  # last: clip, silence, r; object: clip, silence
    page = render_report(run, None)
    assert 'id="audio-heads"' in page and f"{direct.r[direct.order[0]]:.3f}" in page
