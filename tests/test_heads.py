"""Head-wise tracing: one attention head's output (`hook_z`) restored at the last position or a span; exact against
the reference on every port and on grouped-query attention, against a plain PyTorch hook on `o_proj`, and all
heads of a layer together are the `attn_out` patch."""

import numpy as np
import pytest
import torch
from _patching_cases import PATCHING, case, params
from conftest import GENDER_PREFIX, GENDER_PROMPT

import audiolens_ct as act
import audiolens_ct.tracing.engine_fast as engine_fast
from audiolens_ct.aggregate import aggregate_records
from audiolens_ct.cli import build_parser, trace_config
from audiolens_ct.errors import ExactnessError
from audiolens_ct.plots import Run, figures, head_rr_heatmap
from audiolens_ct.report import render_report
from audiolens_ct.testing import decoder_layers, tone
from audiolens_ct.tracing.patches import Patch, PatchSet, head_wise
from audiolens_ct.tracing.spans import resolve_span

GQA = [("qwen2-audio", "gqa_4_to_1"), ("qwen2-audio", "mha_decoupled_head_dim"), ("voxtral", "decoupled_head_dim")]
"""8 query heads over 2 key/value heads; and head_dim x heads != d_model (both families)."""


def attention_config(c):
    """The text decoder's attention config, read from the untouched HF model."""
    return decoder_layers(c.model.port, c.reference)[0].self_attn.config


@pytest.mark.parametrize(("port", "variant"), params(PATCHING + GQA))
def test_head_grids_match_the_reference_engine(port, variant):
    c = case(port, variant)
    cfg = c.model.cfg
    assert cfg.n_heads == attention_config(c).num_attention_heads  # query heads
    for spec in ("last", "object"):
        src, dst = resolve_span(c.model, spec, c.clean, c.corrupted)
        fast, ref = c.both(head_wise(cfg.n_layers, cfg.n_heads, src, dst))
        assert fast.shape == (cfg.n_layers * cfg.n_heads,) and np.abs(fast - ref).max() <= 1e-6
        assert np.ptp(fast) > 0  # the heads do different things


def hf_head_patch(c, layer, head, positions):
    """The plain-PyTorch oracle on the untouched HF model: a pre-hook on layer `layer`'s `o_proj` writes the clean
    input columns of query head `head` (`head*d_head:(head+1)*d_head`) at `positions`."""
    o_proj = decoder_layers(c.model.port, c.reference)[layer].self_attn.o_proj
    d_head = c.model.cfg.d_head
    cols = slice(head * d_head, (head + 1) * d_head)
    seen = {}
    handle = o_proj.register_forward_pre_hook(lambda m, args: seen.setdefault("clean", args[0].detach().clone()))
    with torch.no_grad():
        c.model.port.hf_logits(c.reference, c.clean)
    handle.remove()

    def write(module, args):
        x = args[0].clone()
        x[:, positions, cols] = seen["clean"][:, positions, cols]
        return (x,)

    handle = o_proj.register_forward_pre_hook(write)
    with torch.no_grad():
        p = float(c.metric(c.model.port.hf_logits(c.reference, c.corrupted)[:, -1]))
    handle.remove()
    return p


@pytest.mark.parametrize(("port", "variant"), params([("qwen2-audio", "gqa_4_to_1"), ("voxtral", "patching")]))
def test_grouped_query_heads_are_patched_one_query_head_at_a_time_as_a_plain_o_proj_hook_does(port, variant):
    c = case(port, variant)
    cfg = c.model.cfg
    assert cfg.n_heads > attention_config(c).num_key_value_heads  # grouped-query attention
    src, dst = resolve_span(c.model, "object", c.clean, c.corrupted)
    assert src == dst  # same-length twins: the oracle patches one set of positions
    grid = c.both(head_wise(cfg.n_layers, cfg.n_heads, src, dst))[0].reshape(cfg.n_layers, cfg.n_heads)
    for layer, head in [(0, 0), (0, cfg.n_heads - 1), (cfg.n_layers - 1, 1), (cfg.n_layers - 1, cfg.n_heads // 2)]:
        assert grid[layer, head] == pytest.approx(hf_head_patch(c, layer, head, src), abs=1e-6)


def test_every_head_of_a_layer_restored_together_is_the_attn_out_patch():
    c = case(*PATCHING[0])
    cfg = c.model.cfg
    src, dst = resolve_span(c.model, "pos:-4:", c.clean, c.corrupted)
    every_head = PatchSet("z", tuple(Patch((lay,), tuple(src), tuple(dst), tuple(range(cfg.n_heads)))
                                     for lay in range(cfg.n_layers)))  # fmt: skip
    attn_out = PatchSet("attn_out", tuple(Patch((lay,), tuple(src), tuple(dst)) for lay in range(cfg.n_layers)))
    assert np.abs(c.both(every_head)[0] - c.both(attn_out)[1]).max() <= 1e-6


@pytest.fixture(scope="module")
def kept(qwen2_audio_model):
    from test_tracing import listening_options

    wave = tone(1.0, 250)
    return (wave, *listening_options(qwen2_audio_model, wave))


def test_trace_records_head_rr_per_span_and_audits_three_head_cells(qwen2_audio_model, kept):
    model = qwen2_audio_model
    wave, target, options = kept
    res = act.trace(model, wave, GENDER_PROMPT, GENDER_PREFIX, target=target, options=options, modes=("layer",),
                    heads=("last", "object"))  # fmt: skip
    assert np.asarray(res.head_rr["last"]).shape == (model.cfg.n_layers, model.cfg.n_heads)
    assert set(res.head_rr) == {"last", "object"} and res.meta["heads"] == ["last", "object"]
    cells = [c for c in res.audit["cells"] if c["mode"] == "head-wise"]
    assert len(cells) == 6 and all(c["fast"] == res.p_head[c["span"]][c["layer"]][c["head"]] for c in cells)
    assert res.audit["max_abs_diff"] <= 1e-6


def test_a_fast_engine_that_drops_head_writes_is_caught_by_the_audit(qwen2_audio_model, kept, monkeypatch):
    model = qwen2_audio_model
    wave, target, options = kept
    monkeypatch.setattr(engine_fast, "_write_heads", lambda z, **kwargs: z)
    with pytest.raises(ExactnessError, match="head-wise cell"):
        act.trace(model, wave, GENDER_PROMPT, GENDER_PREFIX, target=target, options=options, modes=("layer",),
                  heads=("last",))  # fmt: skip


def test_the_run_flag_sets_heads():
    args = build_parser().parse_args(["run", "m", "d", "--out", "o", "--heads", "last", "object"])
    assert trace_config(args).heads == ("last", "object") and trace_config(args).settings()["heads"] == ["last", "object"]


def test_head_grids_are_aggregated_with_intervals_drawn_and_reported():
    def record(sample_id, grid):
        return dict(sample_id=sample_id, attribute="gender", label="male", status="kept", error=None,
                    result=dict(p_clean=0.8, p_corrupted=0.2, head_rr={"last": grid}, segment_rr={}, audit=None))  # fmt: skip

    agg = aggregate_records([record("a", [[0.0, 1.0], [0.5, 0.5]]), record("b", [[0.2, 0.6], [0.5, 0.7]])])["gender"]
    assert np.allclose(agg["head_rr"]["last"]["mean"], [[0.1, 0.8], [0.5, 0.6]])
    assert agg["head_rr"]["last"]["n"] == [[2, 2], [2, 2]] and agg["head_rr"]["last"]["low"][1][0] == pytest.approx(0.5)
    run = Run("m", {"settings": {}, "attributes": {"gender": agg}})
    fig = head_rr_heatmap(run, "gender", "last")
    assert np.allclose(fig.data[0].z, [[0.1, 0.8], [0.5, 0.6]])
    assert "n = 2" in fig.layout.title.text and "head_rr_m_gender_last" in figures([run])
    assert "Head-wise tracing at last: gender" in render_report(run, {})
