"""AtP* (`tracing/attribution.py`) and its triage (`tracing/triage.py`), as a user relies on them:

- the estimates are exact to first order (a small corruption: AtP and AtP* equal the exact grid's changes), for
  residual patches of one position and of a window of audio rows, head patches and MLP patches;
- the QK fix's pattern change is the attention pattern of a forward with the patch applied, on every port;
- GradDrop drops each layer's gradient once;
- the triage's verified cells are the exact grid's own values (1e-6), the top-scored cells within the budget;
- `triage_grids` builds the grids `trace` builds, and compares with them when they were evaluated.
"""

from __future__ import annotations

import copy
from functools import partial

import numpy as np
import pytest
import torch
from conftest import GENDER
from transformer_lens.utilities import get_act_name

import audiolens_ct as act
from audiolens_ct.corruption import corrupt
from audiolens_ct.errors import InputError
from audiolens_ct.ports import available_ports, get_port
from audiolens_ct.testing import tiny_model, tone
from audiolens_ct.tracing import answer_probability, answer_tokens
from audiolens_ct.tracing.attribution import PatternChange, attention_names, attribute
from audiolens_ct.tracing.engine_fast import FastEngine
from audiolens_ct.tracing.patches import Patch, PatchSet, group_wise, head_wise, token_wise
from audiolens_ct.tracing.spans import after_audio
from audiolens_ct.tracing.triage import budgeted_cells, compare, triage, triage_grids, verification_cost


def exact(model, patches, clean, corrupted, metric) -> np.ndarray:
    names = {get_act_name(patches.kind, layer) for p in patches.patches for layer in p.layers}
    with torch.no_grad():
        _, cache = model.run_with_cache(clean, names_filter=lambda n: n in names)
    engine = FastEngine()
    return engine.evaluate(model, patches, cache, engine.run_corrupted(model, corrupted), metric).numpy()


@pytest.fixture(scope="module")
def float64_model():
    """The tiny Qwen2-Audio in float64, so that first-order terms of a small corruption stand above rounding."""
    hf_model, processor = tiny_model("qwen2-audio", seed=3)
    return act.HookedLALM.from_hf(hf_model.double(), processor, port="qwen2-audio")


def grids(model, clean, corrupted) -> dict[str, PatchSet]:
    n_layers, rows = model.cfg.n_layers, clean.audio_positions
    text = after_audio(clean, corrupted)
    return {
        "positions": token_wise(n_layers, text, text),
        "audio windows": group_wise(n_layers, [(rows[i : i + 8], rows[i : i + 8]) for i in range(0, len(rows), 8)]),
        "heads": head_wise(n_layers, model.cfg.n_heads, text[-1:], text[-1:]),
        "mlp_out": token_wise(n_layers, text, text, kind="mlp_out"),
    }


@pytest.mark.parametrize("grid", ["positions", "audio windows", "heads", "mlp_out"])
def test_estimates_are_exact_to_first_order(float64_model, grid):
    model = float64_model
    wave = tone(1.0)
    clean = model.prepare(wave, GENDER.prompt, GENDER.response_prefix, options=GENDER.labels)
    small = act.TraceConfig(corruption="noise", noise_scale=1e-2, noise_copies=2)
    corrupted = corrupt(model, clean, wave, small)
    target = answer_tokens(model.tokenizer, GENDER.labels)["male"]

    def metric(logits: torch.Tensor) -> torch.Tensor:  # float64 throughout
        return logits.double().softmax(-1)[:, target].mean()

    patches = grids(model, clean, corrupted)[grid]
    values = exact(model, patches, clean, corrupted, metric)
    estimate = attribute(model, patches, clean, corrupted, metric)
    change = np.abs(values - estimate.p_corrupted).max()
    assert change > 1e-8, "the corruption changed nothing: the test would pass for any estimator"
    assert np.abs(estimate.atp - values).max() <= 2e-2 * change
    assert np.abs(estimate.atp_star - values).max() <= 2e-2 * change
    assert estimate.qk_fix == (patches.kind == "resid_pre")


@pytest.fixture(scope="module", params=available_ports())
def port_runs(request):
    """Each port's first tiny configuration, a 1-s clip and its silent twin, with the activations AtP* reads."""
    variant = get_port(request.param).tiny_variants[0]
    hf_model, processor = tiny_model(request.param, **copy.deepcopy(variant.overrides))
    model = act.HookedLALM.from_hf(hf_model, processor, port=request.param)
    wave = tone(1.0, rate=model.port.sampling_rate)
    clean = model.prepare(wave, GENDER.prompt, GENDER.response_prefix, options=GENDER.labels, **variant.prepare_kwargs)
    corrupted = model.prepare_like(clean, np.zeros_like(wave))
    return model, clean, corrupted


def test_the_qk_fix_is_the_pattern_of_a_forward_with_the_patch_applied(port_runs):
    model, clean, corrupted = port_runs
    layer = model.cfg.n_layers - 1
    names = [get_act_name("resid_pre", layer), *attention_names(layer).values()]
    with torch.no_grad():
        _, clean_cache = model.run_with_cache(clean, names_filter=lambda n: n in names)
        _, corrupted_cache = model.run_with_cache(corrupted, names_filter=lambda n: n in names)
    change = PatternChange(model, layer, {n: clean_cache[n] for n in names}, {n: corrupted_cache[n] for n in names})
    pattern = corrupted_cache[attention_names(layer)["pattern"]].double()
    grad = torch.randn(pattern.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    rows = clean.audio_positions
    for run in ([clean.shape[1] - 1], rows[: len(rows) // 2], rows):
        seen = {}

        def restore(act: torch.Tensor, hook, run=run) -> torch.Tensor:
            act = act.clone()
            act[:, run] = clean_cache[names[0]][:, run]
            return act

        def keep(p: torch.Tensor, hook, seen=seen) -> None:
            seen["pattern"] = p.detach().double()

        with torch.no_grad():
            model.run_with_hooks(corrupted, fwd_hooks=[(names[0], restore), (attention_names(layer)["pattern"], keep)])
        expected = float(((seen["pattern"] - pattern) * grad).sum())
        assert change(run, grad) == pytest.approx(expected, rel=1e-4, abs=1e-5)
    each = change.each_position(grad)
    one_at_a_time = [change([i], grad) for i in range(clean.shape[1])]
    np.testing.assert_allclose(each.numpy(), one_at_a_time, rtol=1e-9, atol=1e-9)
    text = clean.first_text_after_audio  # keeping only the rows from the first patched position on changes nothing
    from_text = PatternChange(model, layer, {n: clean_cache[n] for n in names}, {n: corrupted_cache[n] for n in names},
                              first=text)  # fmt: skip
    np.testing.assert_allclose(from_text.each_position(grad)[text:].numpy(), one_at_a_time[text:], rtol=1e-9, atol=1e-9)
    assert from_text([text, text + 1], grad) == pytest.approx(change([text, text + 1], grad), rel=1e-9, abs=1e-12)


@pytest.fixture(scope="module")
def silent_pair(qwen2_audio_model):
    """The shared tiny Qwen2-Audio, a 1-s tone, its input and silent twin, and P(" male")."""
    model = qwen2_audio_model
    wave = tone(1.0)
    clean = model.prepare(wave, GENDER.prompt, GENDER.response_prefix, options=GENDER.labels)
    corrupted = model.prepare_like(clean, np.zeros_like(wave))
    metric = partial(answer_probability, target=answer_tokens(model.tokenizer, GENDER.labels)["male"])
    return model, wave, clean, corrupted, metric


def test_graddrop_averages_the_estimate_over_the_dropped_layers(silent_pair):
    model, _, clean, corrupted, metric = silent_pair
    last = clean.shape[1] - 1
    patches = head_wise(model.cfg.n_layers, model.cfg.n_heads, [last], [last])
    plain = attribute(model, patches, clean, corrupted, metric)
    dropped = attribute(model, patches, clean, corrupted, metric, graddrop=True)
    np.testing.assert_allclose(dropped.atp_star, plain.atp_star)  # GradDrop ranks; it does not change estimates
    # a head of the last layer: dropping an earlier layer leaves its gradient as it is, dropping its own zeroes it
    top = slice((model.cfg.n_layers - 1) * model.cfg.n_heads, None)
    np.testing.assert_allclose(dropped.score[top], np.abs(plain.atp_star - plain.p_corrupted)[top], rtol=1e-6)
    assert dropped.graddrop and not plain.graddrop


def test_the_triage_verifies_the_top_cells_with_the_exact_grids_values(silent_pair):
    model, _, clean, corrupted, metric = silent_pair
    text = after_audio(clean, corrupted)
    patches = token_wise(model.cfg.n_layers, text, text)
    values = exact(model, patches, clean, corrupted, metric)
    result = triage(model, patches, clean, corrupted, metric, FastEngine(), budget=0.2)
    np.testing.assert_allclose(result.p_verified, values[result.verified], atol=1e-6)
    order = np.argsort(-result.attribution.score, kind="stable")
    assert result.verified == order[: len(result.verified)].tolist()
    spent = verification_cost([patches.patches[i] for i in result.verified], clean.shape[1], model.cfg.n_layers)
    assert spent <= 0.2 * verification_cost(patches.patches, clean.shape[1], model.cfg.n_layers)
    with torch.no_grad():
        p_clean = float(metric(model(clean)[:, -1]))
    report = compare(result, values, p_clean, exact_seconds=1.0)
    assert report["verified_max_abs_diff"] <= 1e-6
    assert report["worst_missed_cell"] not in result.verified
    rr = (values - result.attribution.p_corrupted) / (p_clean - result.attribution.p_corrupted)
    assert report["worst_missed_rr"] == pytest.approx(rr[report["worst_missed_cell"]])
    assert report["seconds"]["speedup"] == pytest.approx(1.0 / (result.seconds["estimate"] + result.seconds["verify"]))


def test_budgeted_cells_take_the_longest_top_prefix_within_the_budget():
    patches = PatchSet("resid_pre", tuple(Patch((layer,), (p,), (p,)) for layer in range(2) for p in (8, 9)))
    # one pass per position: the suffix from it (2 or 1 positions) through the layers from the lowest patched one
    assert verification_cost(patches.patches, 10, 2) == 2 * 2 + 1 * 2
    assert verification_cost(patches.patches[2:], 10, 2) == 2 * 1 + 1 * 1
    score = np.array([0.1, 0.9, 0.5, 0.7])  # order: (0, 9), (1, 9), (1, 8), (0, 8); costs 2, 2, 4, 6
    assert budgeted_cells(patches, score, 10, 2, budget=3 / 6) == [1, 3]
    assert budgeted_cells(patches, score, 10, 2, budget=0.01) == [1]  # at least one
    with pytest.raises(InputError, match="fraction in"):
        budgeted_cells(patches, score, 10, 2, budget=1.5)


def test_triage_grids_build_the_grids_trace_builds(qwen2_audio_model):
    model = qwen2_audio_model
    wave = tone(1.0)
    config = act.TraceConfig(modes=("token",), time_window=0.5, heads=("last",), atp=("token", "time", "head"),
                             audit=False)  # fmt: skip
    res = act.trace(model, wave, GENDER.prompt, GENDER.response_prefix, "male", GENDER.labels, config)
    clean = model.prepare(wave, GENDER.prompt, GENDER.response_prefix, options=GENDER.labels)
    corrupted = model.prepare_like(clean, np.zeros_like(wave))
    metric = partial(answer_probability, target=res.target_token)
    out = triage_grids(model, config, clean, corrupted, 1.0, FastEngine(), metric, res.p_clean)
    assert set(out) == {"token", "time", "head:last"}
    assert out["token"]["columns"] == res.positions and out["token"]["shape"] == list(res.p_token.shape)
    assert out["time"]["columns"] == res.time_windows and out["time"]["shape"] == list(res.p_time.shape)
    assert out["head:last"]["shape"] == list(np.shape(res.p_head["last"]))
    for key, p_exact in (("token", res.p_token), ("time", res.p_time), ("head:last", np.array(res.p_head["last"]))):
        flat = np.asarray(p_exact).ravel()
        np.testing.assert_allclose(out[key]["p_verified"], flat[out[key]["verified"]], atol=1e-6)
        assert out[key]["comparison"] is None  # nothing evaluated was handed over
    token = token_wise(model.cfg.n_layers, res.positions, res.positions)
    compared = triage_grids(model, act.TraceConfig(atp=("token",)), clean, corrupted, 1.0, FastEngine(), metric,
                            res.p_clean, evaluated={"token": (token, res.p_token.ravel(), 2.0)})  # fmt: skip
    assert compared["token"]["comparison"]["verified_max_abs_diff"] <= 1e-6
    assert compared["token"]["comparison"]["seconds"]["exact"] == 2.0


def test_what_atp_cannot_estimate_is_refused(silent_pair):
    model, _, clean, corrupted, metric = silent_pair
    last = clean.shape[1] - 1
    cases = {
        "one layer each": PatchSet("resid_pre", (Patch((1, 2), (last,), (last,)),)),
        "same positions": PatchSet("resid_pre", (Patch((1,), (last - 1,), (last,)),)),
        "contiguous run": PatchSet("resid_pre", (Patch((1,), (last - 2, last), (last - 2, last)),)),
    }
    for message, patches in cases.items():
        with pytest.raises(InputError, match=message):
            attribute(model, patches, clean, corrupted, metric)
    linear = attribute(model, cases["same positions"], clean, corrupted, metric, qk_fix=False)
    assert not linear.qk_fix and linear.atp_star == pytest.approx(linear.atp)
    with pytest.raises(InputError, match="atp needs window=1"):
        act.TraceConfig(atp=("token",), window=3)


def test_the_aggregate_and_the_report_summarise_the_triage_per_grid():
    from audiolens_ct.aggregate import Run, aggregate_records
    from audiolens_ct.plots import atp_error_figure
    from audiolens_ct.report import render_report

    def record(i: int, rho: float, missed: float, compared: bool = True) -> dict:
        comparison = dict(rank_correlation=rho, rank_correlation_atp=rho / 2, worst_missed_rr=missed,
                          max_error_rr=0.5 + i, verified_max_abs_diff=1e-7 * i, error_by_layer=[0.0, 0.1 * i],
                          seconds=dict(estimate=1.0, verify=0.5, exact=3.0 * i, speedup=2.0 * i))  # fmt: skip
        atp = {"token": dict(p_atp_star=[0.0] * 6, verified=[0, 1], seconds=dict(estimate=1.0, verify=0.5),
                             comparison=comparison if compared else None)}  # fmt: skip
        result = {"p_clean": 0.9, "p_corrupted": 0.1, "atp": atp}
        return {"attribute": "gender", "sample_id": f"c{i}", "status": "kept", "result": result}

    records = [record(1, 0.8, 0.2), record(2, 0.6, -0.7), record(3, 0.0, 0.1, compared=False)]
    grid = aggregate_records(records)["gender"]["atp"]["token"]
    assert (grid["n"], grid["cells"], grid["verified"]) == (3, 6.0, 2.0)
    assert grid["rank_correlation"]["mean"] == pytest.approx(0.7) and grid["rank_correlation"]["n"] == 2
    assert grid["worst_missed_rr"]["mean"] == pytest.approx(0.45) and grid["worst_missed_max"] == -0.7
    assert grid["verified_max_abs_diff"] == pytest.approx(2e-7) and grid["speedup"]["mean"] == pytest.approx(3.0)
    np.testing.assert_allclose(grid["error_by_layer"]["mean"], [0.0, 0.15])
    run = Run("demo", {"settings": {"model": "demo"}, "interval": "", "attributes": aggregate_records(records)})
    assert [t.name for t in atp_error_figure([run]).data if t.mode == "lines+markers"] == ["token"]
    page = render_report(run, None)
    assert 'id="atp"' in page and "0.700 [" in page and "(-0.700)" in page


def test_step_six_reads_attention_on_every_clip_and_triages_where_the_maps_run(qwen2_audio_model):
    from dataclasses import replace

    from audiolens_ct.tracing.beyond import beyond_the_maps

    model = qwen2_audio_model
    wave = tone(1.0)
    config = act.TraceConfig(modes=("token",), attention=True, atp=("token",), audit=False)
    res = act.trace(model, wave, GENDER.prompt, GENDER.response_prefix, "male", GENDER.labels, config)
    assert not res.excluded
    clean = model.prepare(wave, GENDER.prompt, GENDER.response_prefix, options=GENDER.labels)
    corrupted = model.prepare_like(clean, np.zeros_like(wave))
    metric = partial(answer_probability, target=res.target_token)
    token = token_wise(model.cfg.n_layers, res.positions, res.positions)
    kwargs = dict(engine=FastEngine(), evaluated={"token": (token, res.p_token.ravel(), 1.0)})
    kept = beyond_the_maps(model, config, clean, corrupted, 1.0, metric, res, **kwargs)
    assert set(kept) == {"attention", "atp"} and set(kept["attention"]) == {"last", "object"}
    assert kept["atp"]["token"]["comparison"]["verified_max_abs_diff"] <= 1e-6
    excluded = beyond_the_maps(model, config, clean, corrupted, 1.0, metric, replace(res, excluded=True), **kwargs)
    assert set(excluded) == {"attention"}  # the triage runs where the maps run; the attention on every clip
    assert beyond_the_maps(model, act.TraceConfig(), clean, corrupted, 1.0, metric, res, **kwargs) == {}
