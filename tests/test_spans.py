"""Group-wise tracing: a span's positions restored jointly; exact against the reference on every port; a span of
one position is the token-wise cell and the text after the audio is the layer-wise cell."""

import numpy as np
import pytest
import torch
from _patching_cases import GENDER, PATCHING, case, params
from conftest import GENDER_PREFIX, GENDER_PROMPT

import audiolens_ct as act
from audiolens_ct.aggregate import aggregate_records
from audiolens_ct.cli import build_parser, trace_config
from audiolens_ct.errors import InputError
from audiolens_ct.plots import Run, figures, span_rr_figure
from audiolens_ct.report import render_report
from audiolens_ct.testing import tone
from audiolens_ct.tracing import layer_wise, token_wise
from audiolens_ct.tracing.patches import Patch, PatchSet, group_wise
from audiolens_ct.tracing.spans import resolve_span, span_positions

SPANS = ("object", "audio", "last", "after_audio", "before_audio", "pos:-3:", "text:gender")


@pytest.mark.parametrize(("port", "variant"), params(PATCHING))
def test_span_groups_match_the_reference_engine_and_the_papers_two_maps(port, variant):
    c = case(port, variant)
    n_layers = c.model.cfg.n_layers
    groups = [resolve_span(c.model, spec, c.clean, c.corrupted) for spec in SPANS]
    fast, ref = c.both(group_wise(n_layers, groups))
    assert np.abs(fast - ref).max() <= 1e-6
    grid = fast.reshape(n_layers, len(SPANS))
    column = dict(zip(SPANS, grid.T, strict=True))
    # the audio rows restored before layer 0 make the corrupted input the clean one
    assert column["audio"][0] == pytest.approx(c.p_clean, abs=1e-6)
    # the text before the audio is computed alike in both runs: restoring it recovers nothing
    with torch.no_grad():
        unpatched = float(c.metric(c.model(c.corrupted)[:, -1]))
    assert np.abs(column["before_audio"] - unpatched).max() <= 1e-6
    # one position is the token-wise cell; every text position after the audio is the layer-wise cell
    src, dst = resolve_span(c.model, "after_audio", c.clean, c.corrupted)
    tokens = c.both(token_wise(n_layers, src, dst))[0].reshape(n_layers, len(src))
    assert np.abs(column["last"] - tokens[:, src.index(c.clean.shape[1] - 1)]).max() <= 1e-6
    assert np.abs(column["after_audio"] - c.both(layer_wise(n_layers, src, dst))[0]).max() <= 1e-6


def test_spans_of_other_kinds_and_windows_match_the_reference():
    c = case(*PATCHING[0])
    groups = [resolve_span(c.model, spec, c.clean, c.corrupted) for spec in ("object", "audio", "pos:-4:-1")]
    for kind, window in (("attn_out", 2), ("resid_post", 1)):
        fast, ref = c.both(group_wise(c.model.cfg.n_layers, groups, window=window, kind=kind))
        assert np.abs(fast - ref).max() <= 1e-6 and np.abs(fast - fast[0]).max() > 0


def test_spans_resolve_to_the_segments_positions_and_words(qwen2_audio_model):
    model = qwen2_audio_model
    clean = model.prepare(tone(1.0), GENDER_PROMPT, GENDER_PREFIX, options=list(GENDER.labels))
    corrupted = model.prepare_like(clean, np.zeros(16000))
    n = clean.shape[1]

    def positions(spec):
        return span_positions(model, spec, clean, corrupted)

    assert positions("object") == clean.segments["object"] and positions("last") == [n - 1]
    assert positions("audio") == clean.audio_positions and positions("before_audio") == list(range(clean.audio_positions[0]))
    assert positions("after_audio") == clean.text_positions and positions("pos:-3:") == [n - 3, n - 2, n - 1]
    # a phrase: the tokens overlapping its last occurrence in the text after the audio (here, the response prefix)
    words = positions("text:gender is")
    assert "".join(clean.str_tokens[0][p] for p in words).strip() == "gender is" and words[-1] == n - 1
    with pytest.raises(InputError, match=r"'text:tenor'.*'tenor' does not occur in the text after the audio"):
        positions("text:tenor")
    with pytest.raises(InputError, match="span 'pos:5:5' selects no position"):
        positions("pos:5:5")
    with pytest.raises(InputError, match="unknown span 'objects'; use one of early_prompt"):
        positions("objects")


def test_trace_records_span_rr_and_refuses_a_bad_span_before_any_run(qwen2_audio_model, monkeypatch):
    from test_tracing import listening_options

    model = qwen2_audio_model
    wave = tone(1.0, 250)
    target, options = listening_options(model, wave)
    res = act.trace(model, wave, GENDER_PROMPT, GENDER_PREFIX, target=target, options=options,
                    spans=("last", "after_audio", "early_prompt"))  # fmt: skip
    assert not res.excluded and list(res.span_rr) == ["last", "after_audio", "early_prompt"]
    last = res.positions.index(len(res.str_tokens) - 1)
    assert res.span_rr["last"] == pytest.approx(res.token_rr[:, last].tolist(), abs=1e-6)
    assert res.span_rr["after_audio"] == pytest.approx(res.layer_rr.tolist(), abs=1e-6)
    assert res.span_positions["early_prompt"] == res.segments["early_prompt"]
    group_cells = [c for c in res.audit["cells"] if c["mode"] == "group-wise"]
    assert len(group_cells) == 3 and {c["span"] for c in group_cells} <= set(res.span_rr)
    back = act.TraceResult.from_dict(res.to_dict())
    assert back.span_rr == res.span_rr and back.p_span == res.p_span
    monkeypatch.setattr(model, "run_with_cache", lambda *a, **k: pytest.fail("a model run before the span check"))
    with pytest.raises(InputError, match="'tenor' does not occur"):
        act.trace(model, wave, GENDER_PROMPT, GENDER_PREFIX, target=target, options=options, spans=("text:tenor",))


def test_a_patch_set_refuses_heads_on_whole_activations_and_empty_patches():
    with pytest.raises(ValueError, match="names heads only for kind 'z'"):
        PatchSet("resid_pre", (Patch((0,), (1,), (1,), heads=(0,)),))
    with pytest.raises(ValueError, match="at least one"):
        PatchSet("resid_pre", (Patch((0,), (), ()),))


def test_the_run_flag_sets_spans_and_a_run_without_them_keeps_its_settings():
    args = build_parser().parse_args(["run", "m", "d", "--out", "o", "--spans", "object", "pos:-3:", "text:the speaker"])
    assert trace_config(args).spans == ("object", "pos:-3:", "text:the speaker")
    assert "spans" not in trace_config(build_parser().parse_args(["run", "m", "d", "--out", "o"])).settings()
    with pytest.raises(InputError, match="spans: unknown span 'middle'"):
        act.TraceConfig(spans=("middle",))


def _record(sample_id, span_rr):
    return dict(sample_id=sample_id, attribute="gender", label="male", status="kept", error=None,
                result=dict(p_clean=0.8, p_corrupted=0.2, span_rr=span_rr, segment_rr={}, audit=None))  # fmt: skip


def test_span_curves_are_aggregated_with_intervals_and_drawn_and_reported():
    records = [_record("a", {"object": [0.0, 0.5], "audio": [1.0, 0.9]}), _record("b", {"object": [0.2, 0.7]})]
    agg = aggregate_records(records)["gender"]
    assert agg["span_rr"]["object"]["mean"] == pytest.approx([0.1, 0.6]) and agg["span_rr"]["object"]["n"] == [2, 2]
    assert agg["span_rr"]["audio"]["n"] == [1, 1] and agg["span_rr"]["audio"]["low"] == [None, None]
    run = Run("m", {"settings": {"spans": ["object", "audio"]}, "attributes": {"gender": agg}})
    fig = span_rr_figure([run])
    assert [t.name for t in fig.data if t.mode == "lines+markers"] == ["object", "audio"]
    assert "span_rr" in figures([run])
    page = render_report(run, {})
    assert "Group-wise tracing: gender" in page and "spans: [&#x27;object&#x27;, &#x27;audio&#x27;]" in page
