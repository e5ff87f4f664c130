"""Time-wise tracing: windows of audio rows in seconds of the clip, exact against the reference on every port with
a timeline, RR = 1 when a window covering every audio row is restored at layer 0, figures on an axis of seconds."""

from types import SimpleNamespace

import numpy as np
import pytest
import soundfile as sf
from _patching_cases import PATCHING, case, params
from conftest import GENDER_PREFIX, GENDER_PROMPT
from transformers import VoxtralEncoderConfig

import audiolens_ct as act
from audiolens_ct.aggregate import aggregate_records
from audiolens_ct.cli import build_parser, trace_config
from audiolens_ct.data.prompts import TRACKS
from audiolens_ct.data.sample import make_sample
from audiolens_ct.errors import InputError
from audiolens_ct.experiment import run_experiment
from audiolens_ct.plots import Run, figures, time_rr_figure, trace_time_figure
from audiolens_ct.ports import Port, get_port
from audiolens_ct.report import render_report
from audiolens_ct.testing import tone
from audiolens_ct.tracing.patches import group_wise
from audiolens_ct.tracing.timeline import envelope, row_seconds, time_windows

TIMED = [(port, variant) for port, variant in PATCHING
         if type(get_port(port)).audio_row_seconds is not Port.audio_row_seconds]  # fmt: skip
"""The small variants of the ports whose audio rows are frames in time (not DeSTA's Q-Former queries)."""


def test_each_port_says_when_its_audio_rows_start(qwen2_audio_model):
    clean = qwen2_audio_model.prepare(tone(1.0), GENDER_PROMPT, GENDER_PREFIX)
    assert np.allclose(row_seconds(qwen2_audio_model, clean), np.arange(25) / 25)  # Qwen2-Audio: 25 rows a second
    released = SimpleNamespace(config=SimpleNamespace(audio_config=VoxtralEncoderConfig()))
    assert np.allclose(get_port("voxtral").audio_row_seconds(released, None, 750), np.arange(750) / 12.5)
    qwen_audio = case("qwen-audio", "mha")  # <audio>, rows at 25 a second, </audio>
    seconds = row_seconds(qwen_audio.model, qwen_audio.clean)
    assert np.isnan(seconds[[0, -1]]).all() and np.allclose(seconds[1:-1], np.arange(len(seconds) - 2) / 25)
    desta = case("desta2", "patching")  # Q-Former queries stand for no moment
    with pytest.raises(InputError, match="desta2's audio rows stand for no moments of the clip"):
        row_seconds(desta.model, desta.clean)


def test_windows_tile_the_heard_seconds_and_leave_out_padding_rows(qwen2_audio_model):
    model = qwen2_audio_model
    clean = model.prepare(tone(1.0), GENDER_PROMPT, GENDER_PREFIX)
    rows = clean.audio_positions
    halves = time_windows(model, clean, clean, 1.0)
    assert [(w.start, w.end) for w in halves] == [(0.0, 0.5), (0.5, 1.0)]
    assert halves[0].src == tuple(rows[:13]) and halves[1].src == tuple(rows[13:])  # a row belongs to its start time
    overlapping = time_windows(model, clean, clean, 1.0, width=0.5, hop=0.25)
    assert [w.start for w in overlapping] == [0.0, 0.25, 0.5, 0.75] and overlapping[1].src == tuple(rows[7:19])
    with pytest.raises(InputError, match=r"time_window 0.03 s is shorter than one audio row of qwen2-audio \(0.04 s\)"):
        time_windows(model, clean, clean, 1.0, width=0.03)
    voxtral = case("voxtral", "patching")  # a 0.5-s clip in a 30-s chunk of 75 rows: 2 rows are the clip's
    (window,) = time_windows(voxtral.model, voxtral.clean, voxtral.corrupted, 0.5)
    assert window.src == tuple(voxtral.clean.audio_positions[:2]) and len(voxtral.clean.audio_positions) == 75


@pytest.mark.parametrize(("port", "variant"), params(TIMED))
def test_time_grids_match_the_reference_engine(port, variant):
    c = case(port, variant, seconds=1.2)
    windows = time_windows(c.model, c.clean, c.corrupted, 1.2, width=0.5, hop=0.4)
    fast, ref = c.both(group_wise(c.model.cfg.n_layers, [(w.src, w.dst) for w in windows]))
    assert len(windows) == 3 and np.abs(fast - ref).max() <= 1e-6 and np.ptp(fast) > 0


@pytest.mark.parametrize(("port", "variant"), params([("qwen2-audio", "patching"), ("qwen-audio", "mha")]))
def test_a_window_over_every_audio_row_at_layer_0_restores_the_clean_prediction(port, variant):
    c = case(port, variant)
    seconds = len(c.wave) / c.model.port.sampling_rate
    (window,) = time_windows(c.model, c.clean, c.corrupted, seconds, width=seconds)
    fast = c.both(group_wise(c.model.cfg.n_layers, [(window.src, window.dst)]))[0]
    assert fast[0] == pytest.approx(c.p_clean, abs=1e-6)


def test_trace_records_rr_over_time_with_the_clips_loudness(qwen2_audio_model):
    from test_tracing import listening_options

    model = qwen2_audio_model
    wave = tone(1.0, 250)
    target, options = listening_options(model, wave)
    res = act.trace(model, wave, GENDER_PROMPT, GENDER_PREFIX, target=target, options=options, modes=("layer",),
                    time_window=0.5)  # fmt: skip
    assert res.time_rr.shape == (model.cfg.n_layers, 2) and res.time_windows == [[0.0, 0.5], [0.5, 1.0]]
    assert res.audio_envelope["rate"] == 50 and len(res.audio_envelope["rms"]) == 50
    assert np.mean(res.audio_envelope["rms"]) == pytest.approx(np.sqrt(0.3**2 / 2 + 0.05**2), rel=0.05)
    assert len([c for c in res.audit["cells"] if c["mode"] == "time-wise"]) == 3
    whole = act.trace(model, wave, GENDER_PROMPT, GENDER_PREFIX, target=target, options=options, modes=("layer",),
                      time_window=1.0)  # fmt: skip
    assert whole.time_rr[0, 0] == pytest.approx(1.0, abs=1e-4)  # RR = 1 at layer 0 (|P diff| <= 1e-6 / denominator)
    back = act.TraceResult.load(res.save(f"{__import__('tempfile').mkdtemp()}/r.npz"))
    assert np.array_equal(back.time_rr, res.time_rr) and back.audio_envelope == res.audio_envelope
    fig = trace_time_figure(res)
    assert fig.data[-1].type == "heatmap" and list(fig.data[-1].x) == [0.25, 0.75]


def test_envelope_is_the_rms_per_fiftieth_of_a_second():
    wave = np.concatenate([np.zeros(1600), np.ones(1600)])  # 0.1 s silent, 0.1 s at 1
    assert envelope(wave, 16000, 0.2) == {"rate": 50, "rms": [0.0] * 5 + [1.0] * 5}
    assert len(envelope(wave, 16000, 0.15)["rms"]) == 8  # the last frame is partly heard


def test_the_run_flags_set_windows_and_a_port_without_a_timeline_is_refused_before_writing(tmp_path):
    parse = build_parser().parse_args
    assert trace_config(parse(["run", "m", "d", "--out", "o", "--time-window"])).time_window == 0.5
    config = trace_config(parse(["run", "m", "d", "--out", "o", "--time-window", "1", "--time-hop", "0.25"]))
    assert (config.time_window, config.time_hop) == (1.0, 0.25)
    with pytest.raises(InputError, match="time_hop needs time_window"):
        trace_config(parse(["run", "m", "d", "--out", "o", "--time-hop", "0.25"]))
    sf.write(tmp_path / "a.wav", tone(0.5), 16000)
    sample = make_sample(TRACKS["gender"], "a", "male", audio_path=tmp_path / "a.wav")
    with pytest.raises(InputError, match="desta2's audio rows stand for no moments"):
        run_experiment(case("desta2", "patching").model, [sample], tmp_path / "out", time_window=0.5)
    assert not (tmp_path / "out").exists()


def _record(sample_id, grid, windows, rms):
    return dict(sample_id=sample_id, attribute="gender", label="male", status="kept", error=None,
                result=dict(p_clean=0.8, p_corrupted=0.2, time_rr=grid, time_windows=windows, segment_rr={}, audit=None,
                            audio_envelope={"rate": 50, "rms": rms}))  # fmt: skip


def test_time_maps_align_from_the_clip_start_with_intervals_and_are_drawn_in_seconds():
    long = _record("a", [[0.0, 0.4, 1.0], [0.2, 0.6, 0.8]], [[0, 0.5], [0.5, 1.0], [1.0, 1.5]], [0.1] * 75)
    short = _record("b", [[0.2, 0.6], [0.4, 0.8]], [[0, 0.5], [0.5, 1.0]], [0.3] * 50)
    agg = aggregate_records([long, short])["gender"]
    assert agg["time_rr"]["start"] == [0, 0.5, 1.0] and agg["time_rr"]["end"] == [0.5, 1.0, 1.5]
    assert np.allclose(agg["time_rr"]["mean"], [[0.1, 0.5, 1.0], [0.3, 0.7, 0.8]])
    assert agg["time_rr"]["n"] == [[2, 2, 1], [2, 2, 1]] and agg["time_rr"]["low"][0][2] is None
    assert agg["envelope"]["rate"] == 50 and agg["envelope"]["n"] == [2] * 50 + [1] * 25
    assert agg["envelope"]["mean"][0] == pytest.approx(0.2)
    run = Run("m", {"settings": {"time_window": 0.5}, "attributes": {"gender": agg}})
    fig = time_rr_figure(run, "gender")
    heatmap = next(t for t in fig.data if t.type == "heatmap")
    assert list(heatmap.x) == [0.25, 0.75, 1.25] and fig.layout.xaxis2.title.text == "time in the clip (s)"
    loudness = next(t for t in fig.data if t.name == "loudness (RMS)")
    assert loudness.x[0] == pytest.approx(0.01) and loudness.x[-1] == pytest.approx(1.49)  # frame centres, seconds
    assert "n = 1–2 per position" in fig.layout.title.text and "time_rr_m_gender" in figures([run])
    assert "Time-wise tracing: gender" in render_report(run, {})
