"""Audio–silence steering: the direction, the hook (forward and generation), and the β sweep on held-out clips."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from _tiny_ports import GENDER, tiny

from audiolens_ct.errors import InputError
from audiolens_ct.steering import SteeringVector, audio_silence_direction, steering_hooks, steering_sweep
from audiolens_ct.testing import tone
from audiolens_ct.tracing.scoring import answer_tokens
from audiolens_ct.twins import clip_pair


def clean_and_silent(model, seconds: float = 0.5, seed: int = 0):
    clean = model.prepare(tone(seconds, seed=seed), GENDER.prompt, GENDER.response_prefix, options=GENDER.labels)
    return clean, model.prepare_like(clean, np.zeros(int(seconds * 16000), dtype=np.float32))


def test_the_direction_is_the_mean_clean_minus_silent_last_position_residual_over_layers_and_clips():
    model, _, _ = tiny("qwen2-audio")
    pairs = [clean_and_silent(model, seed=0), clean_and_silent(model, seed=1)]
    direction = audio_silence_direction(model, pairs, layers=[0, 2])
    names = ["blocks.0.hook_resid_post", "blocks.2.hook_resid_post"]
    diffs = []
    for clean, silent in pairs:
        with torch.no_grad():
            _, c = model.run_with_cache(clean, names_filter=names)
            _, s = model.run_with_cache(silent, names_filter=names)
        diffs += [c[name][0, -1] - s[name][0, -1] for name in names]
    assert (direction.vector - torch.stack(diffs).mean(0)).abs().max() <= 1e-6
    assert direction.layers == (0, 2) and direction.n_clips == 2
    with pytest.raises(InputError, match=r"layers \[7\] do not exist: the model has layers 0..2"):
        audio_silence_direction(model, pairs, layers=[7])
    with pytest.raises(InputError, match="at least one"):
        audio_silence_direction(model, [])


def test_the_hook_adds_beta_times_the_direction_at_the_asked_positions_and_rows():
    vector = torch.arange(4.0)
    resid = torch.randn(2, 5, 4)
    ((name, last),) = steering_hooks(vector, 0.5, [3], positions="last")
    assert name == "blocks.3.hook_resid_post"
    shifted = last(resid, None) - resid
    assert torch.allclose(shifted[:, -1], 0.5 * vector.expand(2, 4)) and not shifted[:, :-1].any()
    ((_, every),) = steering_hooks(vector, torch.tensor([1.0, -2.0]), [3], positions="all")
    shifted = every(resid, None) - resid
    assert torch.allclose(shifted[0], vector.expand(5, 4)) and torch.allclose(shifted[1], -2 * vector.expand(5, 4))
    with pytest.raises(InputError, match="unknown steering positions 'first'"):
        steering_hooks(vector, 1.0, [3], positions="first")


def test_a_zero_direction_changes_nothing_in_a_forward_or_in_generation():
    model, _, inp = tiny("qwen2-audio")
    zero = SteeringVector(torch.zeros(model.cfg.d_model), (0, 1, 2), 1)
    with torch.no_grad():
        assert torch.equal(model.run_with_hooks(inp, fwd_hooks=zero.hooks(3.0, positions="all")), model(inp))
    assert torch.equal(model.generate(inp, 20, stop_at_eos=False, fwd_hooks=zero.hooks(3.0)),
                       model.generate(inp, 20, stop_at_eos=False))  # fmt: skip
    sampled = dict(do_sample=True, temperature=0.8, seed=2, stop_at_eos=False)
    assert torch.equal(model.generate(inp, 20, fwd_hooks=zero.hooks(3.0), **sampled), model.generate(inp, 20, **sampled))


def test_the_steering_hook_fires_at_every_generation_step_and_changes_the_generation():
    model, _, inp = tiny("qwen2-audio")
    direction = audio_silence_direction(model, [clean_and_silent(model)], layers=[0, 2])
    fired: dict[str, list[int]] = {}

    def recorded(name, fn):
        def hook(resid, hook):
            fired.setdefault(name, []).append(resid.shape[1])
            return fn(resid, hook)

        return hook

    hooks = [(name, recorded(name, fn)) for name, fn in direction.hooks(200.0)]
    steered = model.generate(inp, 10, stop_at_eos=False, fwd_hooks=hooks)
    assert fired == {name: [inp.shape[1]] + [1] * 9 for name in ("blocks.0.hook_resid_post", "blocks.2.hook_resid_post")}
    assert not torch.equal(steered, model.generate(inp, 10, stop_at_eos=False)), "β = 200 changed no token"


def test_steered_generation_with_the_cache_equals_a_full_recompute_with_the_same_hook():
    """With positions "all" every position is shifted in both, so the cached loop must give the recompute's tokens."""
    model, _, inp = tiny("qwen2-audio")
    direction = audio_silence_direction(model, [clean_and_silent(model)], layers=[1])
    hooks = direction.hooks(30.0, positions="all")
    cached = model.generate(inp, 12, stop_at_eos=False, fwd_hooks=hooks)
    grown, recomputed = inp, []
    for _ in range(12):
        with torch.no_grad():
            token = model.run_with_hooks(grown, fwd_hooks=hooks)[:, -1].argmax(-1)
        recomputed.append(token)
        grown = replace(grown, tokens=torch.cat([grown.tokens, token[:, None]], 1),
                        audio_mask=torch.cat([grown.audio_mask, torch.zeros(1, 1, dtype=torch.bool)], 1))  # fmt: skip
    assert torch.equal(cached, torch.stack(recomputed, 1))
    assert not torch.equal(cached, model.generate(inp, 12, stop_at_eos=False))


def test_beta_minus_one_on_the_clips_own_direction_at_the_last_layer_gives_its_silent_answer(demo_model, demo_samples):
    """s(x) at the last layer is clean − silent there, so β = −1 turns the last position into the silent run's."""
    last = demo_model.cfg.n_layers - 1
    out = steering_sweep(demo_model, demo_samples, betas=(-1.0, 2.0), layers=[last], progress=False)
    gender = out["attributes"]["gender"]
    assert gender["betas"] == [-1.0, 0.0, 2.0]
    assert gender["counts"] == {"samples": 5, "calibration": 0, "evaluated": 4, "errors": 1}
    target = answer_tokens(demo_model.tokenizer, GENDER.labels)
    for record in (r for r in out["samples"] if "predictions" in r):
        sample = next(s for s in demo_samples if s.id == record["sample_id"])
        pair = clip_pair(demo_model, sample)
        with torch.no_grad():
            silent = demo_model(pair.silent)[0, -1].float().softmax(-1)[target[sample.label]]
            clean = demo_model(pair.clean)[0, -1].float().softmax(-1)[target[sample.label]]
        assert abs(record["p_correct"][0] - float(silent)) <= 1e-6
        assert abs(record["p_correct"][1] - float(clean)) <= 1e-6
    assert gender["accuracy"][1] == 1.0 and gender["changed"][1] == 0.0
    assert gender["accuracy"][0] == 0.5, "steered to silence, the model answers silence's one option"


def test_a_calibration_direction_is_made_from_a_seeded_share_and_only_the_rest_is_evaluated(demo_model, demo_samples):
    def evaluated(seed):
        out = steering_sweep(demo_model, demo_samples[:4], betas=(1.0,), calibration=0.5, seed=seed, progress=False)
        return out["attributes"]["gender"], [r["sample_id"] for r in out["samples"]]

    gender, ids = evaluated(3)
    assert gender["calibration_clips"] == gender["counts"]["calibration"] == gender["counts"]["evaluated"] == 2
    assert evaluated(3)[1] == ids
    with pytest.raises(InputError, match=r"calibration must be a fraction in \(0, 1\)"):
        steering_sweep(demo_model, demo_samples, calibration=1.0, progress=False)


def test_lens_and_steer_commands_write_their_views_and_the_report_shows_them_beside_the_rr(tmp_path, capsys):
    from audiolens_ct import cli
    from audiolens_ct.demo import DEMO_MODEL
    from audiolens_ct.demo.synthetic import write_synthetic_sakura

    data = write_synthetic_sakura(tmp_path / "data", 1, seed=7, attributes=["gender"])
    out = tmp_path / "run"
    common = [str(DEMO_MODEL), str(data), "--out", str(out), "--no-progress"]
    assert cli.main(["lens", *common]) == 0
    assert "`audiolens-ct run` into the same --out shows it in the report" in capsys.readouterr().out
    assert cli.main(["steer", *common, "--betas", "-1", "1"]) == 0
    assert (out / "figures" / "lens_demo_model.html").is_file() and (out / "figures" / "steering_demo_model.html").is_file()
    assert cli.main(["run", *common, "--modes", "layer"]) == 0
    page = (out / "report.html").read_text()
    assert page.index("<h3>Layer-wise tracing</h3>") < page.index("<h3>Logit lens</h3>") < page.index("<h3>Steering</h3>")
    assert "Critical layer" in page and "gender: clean" in page
    assert cli.main(["steer", *common, "--calibration", "1.5"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "audiolens-ct: error: --calibration must be a fraction between 0 and 1, got 1.5")
    assert cli.main(["steer", *common, "--layers", "9"]) == 2
    assert "layers [9] do not exist: the model has layers 0..3" in capsys.readouterr().err
