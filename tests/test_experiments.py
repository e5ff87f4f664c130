"""Experiments: records are atomic and resumable, aggregates carry t intervals, figures and reports show them."""

import json
import os

import numpy as np
import pytest
import soundfile as sf
import torch

import audiolens_ct.sample_tracer as sample_tracer_module
from audiolens_ct.aggregate import aggregate_records, aggregate_run, summarise
from audiolens_ct.data.prompts import TRACKS, make_track
from audiolens_ct.data.sample import make_sample
from audiolens_ct.errors import DataError, InputError, RunMismatchError
from audiolens_ct.experiment import run_experiment
from audiolens_ct.plots import Run, layer_rr_figure, segment_rr_figure, token_rr_heatmap
from audiolens_ct.report import write_report
from audiolens_ct.store import RunStore, atomic_write_json, file_stem
from audiolens_ct.testing import tone
from audiolens_ct.tracing import TraceResult
from audiolens_ct.tracing.scoring import answer_tokens

T_975_DF1, T_975_DF2 = 12.706204736174694, 4.302652729749462  # scipy.stats.t.ppf(0.975, df)


def result(layer, token, positions, n_tokens, segments, reason=None):
    """A synthetic TraceResult: RR maps as given, segment curves as the mean over each segment's columns."""
    token = np.asarray(token, dtype=float)
    column = {p: j for j, p in enumerate(positions)}
    segment_rr = {name: token[:, [column[p] for p in ps]].mean(axis=1).tolist() for name, ps in segments.items()}
    kept = reason is None
    return TraceResult(
        p_clean=0.8, p_corrupted=0.2, excluded=not kept, exclusion_reason=reason, target="hen", options=["hen", "pig"],
        target_token=7, option_tokens=[7, 9], clean_prediction="hen", corrupted_prediction="pig", positions=positions,
        str_tokens=[f"t{i}" for i in range(n_tokens)], segments=segments,
        layer_rr=np.asarray(layer, dtype=float) if kept else None, token_rr=token if kept else None,
        segment_rr=segment_rr if kept else {},
    )  # fmt: skip


def record(sample_id, res=None, error=None, attribute="animal"):
    status = "error" if res is None else ("excluded" if res.excluded else "kept")
    return dict(sample_id=sample_id, attribute=attribute, label="hen", status=status, error=error,
                result=None if res is None else res.to_dict())  # fmt: skip


A = result([0.2, 0.9], [[0.0, 0.5, 1.0], [0.2, 0.4, 0.6]], [3, 4, 5], 6, {"object": [3], "late_prompt": [4], "last": [5]})
B = result([0.4, 0.7], [[0.1, 0.1, 0.3, 0.5], [0.0, 0.2, 0.6, 1.0]], [4, 5, 6, 7], 8,
           {"early_prompt": [4], "object": [5], "late_prompt": [6], "last": [7]})  # fmt: skip
C = result(None, None, [4, 5, 6, 7], 8, {}, reason="clean_wrong")
RECORDS = [record("b", B), record("a", A), record("c", C), record("d", error="d.wav: no such audio file")]


def test_summarise_gives_a_t_interval_and_none_for_one_sample():
    stat = summarise([0.2, 0.4, 0.6])
    assert stat["n"] == 3 and stat["mean"] == pytest.approx(0.4)
    half = T_975_DF2 * 0.2 / np.sqrt(3)
    assert stat["low"] == pytest.approx(0.4 - half, abs=1e-12) and stat["high"] == pytest.approx(0.4 + half, abs=1e-12)
    cells = summarise(np.array([[1.0, np.nan], [3.0, 5.0]]))  # the second sample alone has the second cell
    assert cells["mean"] == [2.0, 5.0] and cells["n"] == [2, 1]
    assert cells["low"][1] is None and cells["high"][1] is None
    assert summarise(np.array([[np.nan]]))["mean"] == [None]


def test_aggregate_counts_reasons_and_aligns_tokens_from_the_end():
    agg = aggregate_records(RECORDS)["animal"]
    assert agg["counts"] == {"samples": 4, "kept": 2, "excluded": {"clean_wrong": 1}, "errors": 1}
    assert agg["errors"] == [{"sample_id": "d", "error": "d.wav: no such audio file"}]
    layer = agg["layer_rr"]
    assert layer["mean"] == pytest.approx([0.3, 0.8]) and layer["n"] == [2, 2]
    half = T_975_DF1 * np.std([0.2, 0.4], ddof=1) / np.sqrt(2)
    assert layer["low"][0] == pytest.approx(0.3 - half) and layer["high"][1] == pytest.approx(0.8 + half)
    token = agg["token_rr"]
    assert token["from_end"] == [-3, -2, -1, 0]
    assert token["tokens"] == ["t4", "t5", "t6", "t7"]  # from B, the sample with the most columns
    assert token["segments"] == ["early_prompt", "object", "late_prompt", "last"]
    assert token["n"][0] == [1, 2, 2, 2]
    assert token["mean"][0] == pytest.approx([0.1, 0.05, 0.4, 0.75])
    assert token["low"][0][0] is None  # one sample reaches that far from the end
    assert agg["segment_rr"]["object"]["mean"] == pytest.approx([0.05, 0.2])
    assert agg["segment_rr"]["early_prompt"]["n"] == [1, 1]
    assert agg["p_clean"]["mean"] == pytest.approx(0.8)


def test_records_are_written_atomically_and_temporaries_of_dead_runs_removed(tmp_path, monkeypatch):
    store = RunStore(tmp_path)
    rec = record("Animal/x 1.wav", A)

    def crash(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        store.write_record(rec)
    monkeypatch.undo()
    path = store.record_path("animal", "Animal/x 1.wav")
    assert not path.exists() and list(path.parent.iterdir()) == []  # no partial record, no temporary
    assert store.read_record("animal", "Animal/x 1.wav") is None
    store.write_record(rec)
    assert store.read_record("animal", "Animal/x 1.wav")["result"]["layer_rr"] == [0.2, 0.9]
    dead = path.parent / f".{path.name}.999999999-deadbeef.tmp"
    mine = path.parent / f".{path.name}.{os.getpid()}-cafecafe.tmp"
    dead.write_text("{partial")
    mine.write_text("{being written")
    assert store.remove_stale_temporaries() == 1
    assert not dead.exists() and mine.exists()


def test_file_stems_are_safe_and_never_collide():
    stems = {file_stem(s) for s in ("Animal/a.wav", "Animal_a.wav", "Animal/a wav", "../../etc/passwd")}
    assert len(stems) == 4
    assert all(set(s) <= set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-") for s in stems)
    assert not any(s.startswith(".") for s in stems)


def test_manifest_refuses_other_settings_and_merges_new_attributes(tmp_path):
    store = RunStore(tmp_path)
    settings = {"model": "m", "corruption": "silence", "modes": ["layer"]}
    gender = {"gender": [{"prompt": "q?", "options": ["male", "female"]}]}
    store.open(settings, gender, {"torch": "x"}, "audiolens-ct trace m d")
    store.check(settings, gender)  # the same run: resumable
    with pytest.raises(RunMismatchError, match=r"corruption: 'silence' here, 'noise' asked.*another output directory"):
        store.check({**settings, "corruption": "noise"})
    with pytest.raises(RunMismatchError, match="prompts of 'gender'"):
        store.check(settings, {"gender": [{"prompt": "other?", "options": ["male", "female"]}]})
    emotion = {"emotion": [{"prompt": "e?", "options": ["sad"]}]}
    manifest = store.open(settings, emotion, {"torch": "x"}, "audiolens-ct trace m d --attributes emotion")
    assert set(manifest["prompts"]) == {"gender", "emotion"}
    assert [i["command"] for i in json.loads(store.manifest_path.read_text())["invocations"]] == [
        "audiolens-ct trace m d", "audiolens-ct trace m d --attributes emotion"]  # fmt: skip


def test_manifest_refuses_other_library_versions_unless_accepted(tmp_path):
    store = RunStore(tmp_path)
    settings = {"model": "m"}
    made = {"audiolens-ct": "0.2.0", "torch": "2.13.0", "transformers": "5.23.0", "transformer-lens": "4.3.0"}
    store.open(settings, {}, made, "first")
    store.check(settings, {}, made)
    newer = {**made, "transformers": "5.24.0", "torch": "2.14.0"}
    with pytest.raises(RunMismatchError, match=r"torch 2.13.0 -> 2.14.0, transformers 5.23.0 -> 5.24.0.*new --out"):
        store.open(settings, {}, newer, "second")
    manifest = store.open(settings, {}, newer, "second", accept_versions=True)
    assert manifest["versions"] == made and manifest["invocations"][-1]["versions"] == newer


def test_the_lock_is_reentrant_in_a_process_and_leaves_no_directory_it_did_not_fill(tmp_path):
    out = tmp_path / "new"
    with RunStore(out).lock("one"), RunStore(out).lock("the same process again"):
        assert json.loads((out / ".lock").read_text())["command"] == "one"
    assert not out.exists()  # created for the lock, nothing written: removed again
    with RunStore(out).lock("two"):
        atomic_write_json(out / "manifest.json", {})
    assert sorted(p.name for p in out.iterdir()) == [".lock", "manifest.json"]


def runs():
    one = {"settings": {"model": "m2"}, "attributes": aggregate_records([record("a", A)])}
    return [Run("m1", {"settings": {"model": "m1"}, "attributes": aggregate_records(RECORDS)}), Run("m2", one)]


def test_layer_figure_has_one_line_per_run_with_ci_bands_where_n_allows():
    fig = layer_rr_figure(runs())
    assert [t.name for t in fig.data] == ["m1 95% CI", "m1", "m2"]  # m2 has one kept sample: no band
    band, line, single = fig.data
    assert list(line.x) == [0, 1] and list(line.y) == pytest.approx([0.3, 0.8])
    assert len(band.x) == len(band.y) == 4 and band.fill == "toself"
    assert list(single.y) == pytest.approx([0.2, 0.9])


def test_token_heatmap_marks_segment_boundaries_and_segment_curves_have_bands():
    run = runs()[0]
    heat = token_rr_heatmap(run, "animal")
    (trace,) = heat.data
    assert np.asarray(trace.z, dtype=float).shape == (2, 4) and list(trace.x) == [-3, -2, -1, 0]
    assert [s.x0 for s in heat.layout.shapes] == [-2.5, -1.5, -0.5]  # between the four segments
    assert [a.text for a in heat.layout.annotations] == ["early prompt", "object tokens", "late prompt", "last token"]
    seg = segment_rr_figure([run], ["animal"])
    assert [t.name for t in seg.data] == ["early prompt", "object tokens 95% CI", "object tokens",
                                          "late prompt 95% CI", "late prompt", "last token 95% CI", "last token"]  # fmt: skip
    assert list(seg.data[2].y) == pytest.approx([0.05, 0.2])
    overlaid = segment_rr_figure(runs(), ["animal"])
    assert "m2 · last token" in [t.name for t in overlaid.data]


def test_report_is_self_contained_with_figures_counts_errors_and_manifest(tmp_path):
    store = RunStore(tmp_path)
    store.open({"model": "/models/tiny", "port": "qwen2-audio", "corruption": "silence"}, {}, {"torch": "x"}, "cmd")
    for rec in RECORDS:
        store.write_record(rec)
    page = write_report(tmp_path).read_text()
    assert page.count("plotly.js v") == 1  # the library, inlined once
    assert page.count("Plotly.newPlot") == 3  # layer curves, heatmap, segment curves
    assert "<td>animal</td><td>4</td><td>2</td><td>1</td><td>0</td><td>0</td><td>0</td><td>1</td>" in page
    assert "d.wav: no such audio file" in page and "Recovery rate" in page and "&quot;port&quot;: &quot;qwen2-audio&quot;" in page
    assert json.loads((tmp_path / "aggregate.json").read_text())["attributes"]["animal"]["counts"]["kept"] == 2


def test_sweep_records_every_sample_resumes_and_swaps_in_another_label(tmp_path, qwen2_audio_model, monkeypatch,
                                                                        capsys):  # fmt: skip
    model, track = qwen2_audio_model, TRACKS["animal"]
    waves = {"a": tone(0.5, 250), "b": tone(0.5, 600, seed=1)}
    ids = answer_tokens(model.tokenizer, track.labels)
    with torch.no_grad():
        clean = model(model.prepare(waves["a"], track.prompt, track.response_prefix))[0, -1]
    predicted = max(track.labels, key=lambda o: float(clean[ids[o]]))
    other = next(label for label in track.labels if label != predicted)
    for name, wave in waves.items():
        sf.write(tmp_path / f"{name}.wav", wave, 16000)
    (tmp_path / "broken.wav").write_bytes(b"RIFF....garbage")
    samples = [
        make_sample(track, "a", predicted, audio_path=tmp_path / "a.wav"),
        make_sample(track, "b", other, audio_path=tmp_path / "b.wav"),
        make_sample(track, "broken", predicted, audio_path=tmp_path / "broken.wav"),
        make_sample(track, "unicorn", "unicorn", audio_path=tmp_path / "a.wav"),
    ]
    out = tmp_path / "out"
    summary = run_experiment(model, samples, out, corruption="swap", modes=("layer",))
    assert (summary.total, summary.errors, summary.resumed) == (4, 2, 0)
    assert "errors=2" in capsys.readouterr().err  # the progress bar's postfix
    store = RunStore(out)
    swapped = store.read_record("animal", "a")
    assert swapped["swap_with"] == "b" and swapped["result"]["meta"]["corruption"] == "swap"
    assert "not a readable audio file" in store.read_record("animal", "broken")["error"]
    assert "'unicorn' is not among the options" in store.read_record("animal", "unicorn")["error"]
    assert aggregate_run(out)["attributes"]["animal"]["counts"]["samples"] == 4

    def must_not_run(*args, **kwargs):
        raise AssertionError("a finished sample was traced again")

    monkeypatch.setattr(sample_tracer_module, "trace", must_not_run)
    again = run_experiment(model, samples, out, corruption="swap", modes=("layer",), progress=False)
    assert (again.resumed, again.errors) == (2, 2)  # traced samples skipped, errors redone
    with pytest.raises(RunMismatchError, match="modes"):
        run_experiment(model, samples, out, corruption="swap", modes=("layer", "token"))
    clash = make_track("animal", labels=("cat", "cat food"))  # both start with the token " cat"
    with pytest.raises(InputError, match="distinct tokens"):
        run_experiment(model, [make_sample(clash, "a", "cat", audio_path=tmp_path / "a.wav")], tmp_path / "clash")
    assert not (tmp_path / "clash").exists()  # refused once, before any record


def test_clips_longer_than_the_audio_window_are_recorded_and_warned_skipped_or_refused(tmp_path, qwen2_audio_model,
                                                                                       capsys):  # fmt: skip
    model, track = qwen2_audio_model, TRACKS["gender"]
    assert model.port.audio_window == 30.0
    sf.write(tmp_path / "short.wav", tone(1.0, 250), 16000)
    long_wave = tone(31.0, 250, rate=22050)
    sf.write(tmp_path / "long.wav", np.stack([long_wave, long_wave], axis=1), 22050)  # 31 s, stereo, 22.05 kHz
    samples = [make_sample(track, name, "male", audio_path=tmp_path / f"{name}.wav") for name in ("short", "long")]

    run_experiment(model, samples, tmp_path / "truncate", modes=("layer",), progress=False)
    err = capsys.readouterr().err
    assert err.count("warning: 1 clip(s) are longer than qwen2-audio's 30-s audio window") == 1
    store = RunStore(tmp_path / "truncate")
    long = store.read_record("gender", "long")
    assert long["status"] != "error" and long["heard_seconds"] == 30.0
    assert long["audio_source"] == {"seconds": pytest.approx(31.0), "sample_rate": 22050, "channels": 2}
    assert store.read_record("gender", "short")["heard_seconds"] == pytest.approx(1.0)

    run_experiment(model, samples, tmp_path / "skip", modes=("layer",), long_audio="skip", progress=False)
    skipped = RunStore(tmp_path / "skip").read_record("gender", "long")
    assert skipped["status"] == "error" and "31.0 s, longer than qwen2-audio's 30-s audio window" in skipped["error"]
    assert RunStore(tmp_path / "skip").read_record("gender", "short")["status"] != "error"

    with pytest.raises(DataError, match=r"1 clip\(s\) are longer .* \(first: gender long, 31.0 s\)"):
        run_experiment(model, samples, tmp_path / "error", modes=("layer",), long_audio="error", progress=False)
    assert not (tmp_path / "error").exists()
