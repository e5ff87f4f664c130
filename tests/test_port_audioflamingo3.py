"""The Audio Flamingo 3 port: the release prompt layout, 30-s windows up to 600 s, batches, and loading by hub id
offline (the conformance kit runs on it in `test_conformance.py`)."""

from __future__ import annotations

import pytest
import torch
from _shared_checks import check_batch_of_two, check_loaded_like, offline_cache_repo, wrapped_with_reference
from conftest import GENDER, GENDER_PREFIX, GENDER_PROMPT

from audiolens_ct import HookedLALM
from audiolens_ct.testing import tone

OPTIONS = list(GENDER.labels)


@pytest.fixture(scope="module")
def af3() -> tuple[HookedLALM, torch.nn.Module]:
    return wrapped_with_reference("audioflamingo3", seed=1)


def test_a_5_second_clip_gives_125_sound_rows_before_the_question(af3):
    model, _ = af3
    inp = model.prepare(tone(5.0), GENDER_PROMPT, GENDER_PREFIX, options=OPTIONS)
    tokens = inp.str_tokens[0]
    start = tokens.index("<sound>")
    assert inp.audio_positions == list(range(start, start + 125))  # 500 frames -> 250 -> AvgPool -> 125
    before, after = "".join(tokens[:start]), "".join(tokens[start + 125 :])
    assert before == "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
    assert after == f"{GENDER_PROMPT}<|im_end|>\n<|im_start|>assistant\n{GENDER_PREFIX}"


@pytest.mark.parametrize(("seconds", "windows", "rows"), [(0.5, 1, 12), (30.0, 1, 750), (35.0, 2, 875), (601.0, 20, 15000)])
def test_a_clip_is_cut_into_30_s_windows_and_its_first_600_s_are_heard(af3, seconds, windows, rows):
    model, _ = af3
    inp = model.prepare(tone(seconds), "Hi?", "It is")
    assert tuple(inp.audio_features["input_features"].shape) == (1, windows, 128, 3000)
    assert tuple(inp.audio_features["input_features_mask"].shape) == (1, windows, 3000)
    assert len(inp.audio_positions) == rows
    assert model.port.audio_window == 600.0


def test_the_audio_hooks_see_every_window_and_the_real_rows(af3):
    model, _ = af3
    _, cache = model.run_with_cache(model.prepare(tone(35.0), "Hi?", "It is"), names_filter=lambda n: n.startswith("audio."))
    assert tuple(cache["audio.hook_encoder_out"].shape) == (1, 2 * 750, 32)  # the second window's padding included
    assert tuple(cache["audio.hook_embeds"].shape) == (1, 875, 64)


@pytest.mark.parametrize("seconds", [4.0, 35.0])
def test_a_batch_of_two_clips_matches_the_hf_forward_and_each_clip_alone(af3, seconds):
    model, reference = af3
    check_batch_of_two(model, reference, seconds)


def test_a_hub_id_resolves_from_an_offline_cache_without_naming_the_port(af3, tmp_path, monkeypatch):
    model, reference = af3
    snapshot = offline_cache_repo(tmp_path, monkeypatch, "nvidia/audio-flamingo-3-hf", "89abcdef" * 5)
    reference.save_pretrained(snapshot)  # the untouched twin: wrapping changes the module tree
    model.processor.save_pretrained(snapshot)
    loaded = HookedLALM.from_pretrained("nvidia/audio-flamingo-3-hf")
    assert loaded.port.name == "audioflamingo3"
    check_loaded_like(loaded, model, reference, tone(2.0))
