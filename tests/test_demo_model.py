"""The shipped demo model: a real Qwen2-Audio checkpoint that loads like a hub model and answers from the audio."""

import json

import numpy as np
import pytest
import torch

import audiolens_ct as act
from audiolens_ct.data.prompts import ATTRIBUTES, get_track
from audiolens_ct.demo import DEMO_MODEL, DEMO_SEED, run_demo
from audiolens_ct.demo.synthetic import clip_rng, synthetic_clip
from audiolens_ct.store import RunStore
from audiolens_ct.tracing.scoring import answer_tokens

TEST_SEED = 11  # a clip seed used neither in training (0, 1) nor by the demo
CLIPS_PER_LABEL = {"animal": 1, "emotion": 2, "gender": 4, "language": 1}


@pytest.fixture(scope="module")
def demo_model():
    return act.HookedLALM.from_pretrained(str(DEMO_MODEL))


@pytest.fixture(scope="module")
def answers(demo_model):
    """Per attribute: (label, clean prediction, silent prediction) for fresh held-out clips."""
    out = {}
    for attribute in ATTRIBUTES:
        track = get_track(attribute)
        ids = answer_tokens(demo_model.tokenizer, track.labels)
        rows = []
        for index in range(CLIPS_PER_LABEL[attribute]):
            for label in track.labels:
                wave = synthetic_clip(attribute, label, clip_rng(TEST_SEED, attribute, label, index))
                predicted = []
                for audio in (wave, np.zeros_like(wave)):
                    inp = demo_model.prepare(audio, track.prompt, track.response_prefix, options=track.labels)
                    with torch.no_grad():
                        last = demo_model(inp)[0, -1]
                    predicted.append(max(track.labels, key=lambda o: float(last[ids[o]])))
                rows.append((label, *predicted))
        out[attribute] = rows
    return out


def test_demo_model_is_a_small_qwen2_audio_checkpoint(demo_model):
    size = sum(f.stat().st_size for f in DEMO_MODEL.iterdir() if f.is_file())
    assert size <= 10 * 2**20
    assert demo_model.port.name == "qwen2-audio"
    assert type(demo_model.hf_model).__name__ == "Qwen2AudioForConditionalGeneration"
    assert DEMO_SEED != TEST_SEED


def test_demo_model_answers_from_the_audio(answers):
    for attribute, rows in answers.items():
        clean = np.mean([label == pred for label, pred, _ in rows])
        assert clean >= 0.8, f"{attribute}: clean accuracy {clean:.2f} on {len(rows)} held-out clips"


def test_demo_model_falls_to_chance_on_silence(answers):
    for attribute, rows in answers.items():
        chance = 1 / len(get_track(attribute).labels)
        silent = np.mean([label == pred for label, _, pred in rows])
        assert silent <= chance + 0.25, f"{attribute}: silent accuracy {silent:.2f} (chance {chance:.2f})"
    everything = [label == pred for rows in answers.values() for label, _, pred in rows]
    assert np.mean(everything) <= 0.35  # chance over these 35 clips is 0.23


def test_a_traced_demo_sample_is_kept_with_finite_recovery_rates(demo_model, answers):
    track = get_track("gender")
    label, clean, silent = next(row for row in answers["gender"] if row[0] == row[1] != row[2])
    index = [row[0] for row in answers["gender"]].index(label) // len(track.labels)
    wave = synthetic_clip("gender", label, clip_rng(TEST_SEED, "gender", label, index))
    res = act.trace(demo_model, wave, track.prompt, track.response_prefix, target=label, options=track.labels)
    n_layers = demo_model.cfg.n_layers
    assert not res.excluded and res.p_clean > res.p_corrupted
    assert res.layer_rr.shape == (n_layers,) and res.token_rr.shape == (n_layers, len(res.positions))
    assert np.isfinite(res.layer_rr).all() and np.isfinite(res.token_rr).all()
    assert abs(res.layer_rr[0]) <= 1e-6  # at layer 0 the text rows hold only token embeddings: nothing to restore
    assert res.layer_rr.max() >= 0.5  # the audio information reaches the text positions


def test_run_demo_writes_records_figures_and_report_and_resumes(tmp_path, capsys):
    clips = {"animal": 1, "emotion": 1, "gender": 2, "language": 1}
    report = run_demo(tmp_path, clips_per_label=clips, progress=False, view_clips=1)
    assert report == tmp_path / "report.html" and report.stat().st_size > 0
    assert (tmp_path / "data" / "Gender" / "metadata.csv").is_file()
    assert (tmp_path / "figures" / "layer_rr.html").is_file()
    assert (tmp_path / "lens.json").is_file() and (tmp_path / "steering.json").is_file()  # the views, beside the RR
    n_clips = {a: n * len(get_track(a).labels) for a, n in clips.items()}
    records = list(RunStore(tmp_path).records())
    assert {a: sum(r["attribute"] == a for r in records) for a in ATTRIBUTES} == n_clips
    counts = json.loads((tmp_path / "aggregate.json").read_text())["attributes"]
    assert all(counts[a]["counts"]["kept"] >= 1 for a in ATTRIBUTES)
    run_demo(tmp_path, clips_per_label=clips, progress=False, view_clips=1)
    assert f"({sum(n_clips.values())} from an earlier run)" in capsys.readouterr().out
