"""`TraceConfig`: one validated value of every tracing option, read by `trace`, the data-set runner and the CLI."""

import json
from dataclasses import FrozenInstanceError, fields

import pytest
from conftest import GENDER_PREFIX, GENDER_PROMPT

import audiolens_ct as act
from audiolens_ct.errors import InputError
from audiolens_ct.testing import tone


def test_defaults_are_the_papers_setting():
    config = act.TraceConfig()
    assert (config.corruption, config.modes, config.kind, config.window, config.engine) == (
        "silence", ("layer", "token"), "resid_pre", 1, "fast")
    assert config.layer_positions == "after_audio" and config.audit


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (dict(corruption="blur"), "unknown corruption 'blur'; use one of silence, noise, swap"),
        (dict(engine="nnsight"), "unknown engine 'nnsight'"),
        (dict(kind="hook_z"), "unknown kind 'hook_z'"),
        (dict(modes=("layer", "head")), r"unknown tracing modes \['head'\]"),
        (dict(modes=()), "unknown tracing modes"),
        (dict(window=0), "window must be an integer >= 1, got 0"),
        (dict(max_batch=2.5), "max_batch must be an integer >= 1"),
        (dict(noise_scale=0), "noise_scale must be > 0"),
        (dict(long_audio="cut"), "unknown long_audio 'cut'"),
    ],
)
def test_a_bad_option_is_refused_naming_the_value(options, message):
    with pytest.raises(InputError, match=message):
        act.TraceConfig(**options)


def test_modes_are_normalised_and_the_config_is_frozen():
    config = act.TraceConfig(modes=["token", "layer"])
    assert config.modes == ("layer", "token") and act.TraceConfig(modes="token").modes == ("token",)
    with pytest.raises(FrozenInstanceError):
        config.window = 3


def test_make_replaces_fields_and_names_the_valid_ones_for_a_typo():
    base = act.TraceConfig(kind="mlp_out")
    assert act.TraceConfig.make(base, window=3) == act.TraceConfig(kind="mlp_out", window=3)
    with pytest.raises(InputError, match="unknown tracing option.*windw.*TraceConfig has corruption, modes"):
        act.TraceConfig.make(base, windw=3)


def test_settings_hold_what_changes_the_numbers_and_nothing_else():
    settings = act.TraceConfig(max_batch=8, audit=False).settings()
    assert "max_batch" not in settings and "audit" not in settings
    assert settings["noise_scale"] is None and settings["noise_copies"] is None
    assert act.TraceConfig(corruption="noise").settings()["noise_copies"] == 10
    assert act.TraceConfig().settings(reads_transcript=False)["transcript_policy"] is None
    assert act.TraceConfig(max_batch=8).settings() == act.TraceConfig().settings()  # resumable with another batch
    assert json.loads(json.dumps(act.TraceConfig().to_dict()))["modes"] == ["layer", "token"]
    assert {f.name for f in fields(act.TraceConfig)} == set(act.TraceConfig().to_dict())


def test_trace_takes_a_config_and_keyword_overrides_of_it(qwen2_audio_model):
    model = qwen2_audio_model
    config = act.TraceConfig(modes=("layer",), kind="attn_out")
    res = act.trace(model, tone(0.5), GENDER_PROMPT, GENDER_PREFIX, "male", ["male", "female"], config,
                    window=3, trace_excluded=True)  # fmt: skip
    assert res.meta["kind"] == "attn_out" and res.meta["window"] == 3 and res.p_token is None
    assert res.p_layer.shape == (model.cfg.n_layers,)
    with pytest.raises(InputError, match="unknown tracing option"):
        act.trace(model, tone(0.5), GENDER_PROMPT, GENDER_PREFIX, "male", ["male", "female"], transcript="x")


def test_the_reference_engine_runs_the_corrupted_input_once(qwen2_audio_model):
    """One clean forward, one corrupted forward, one forward per patch: nothing run twice."""
    model = qwen2_audio_model
    calls = []
    with model.hooks(fwd_hooks=[("hook_embed", lambda x, hook: calls.append(x.shape[0]))]):
        res = act.trace(model, tone(0.5), GENDER_PROMPT, GENDER_PREFIX, "male", ["male", "female"],
                        engine="transformer_lens", modes=("layer",), trace_excluded=True)  # fmt: skip
    assert len(calls) == 2 + len(res.p_layer)
