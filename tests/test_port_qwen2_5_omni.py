"""The Qwen2.5-Omni Thinker port: the release prompt layout, the 300-s window, M-RoPE reducing to 1-D positions,
batches, and loading the release layout offline (the conformance kit runs on it in `test_conformance.py`)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from _shared_checks import check_batch_of_two, check_loaded_like, offline_cache_repo, wrapped_with_reference
from conftest import GENDER, GENDER_PREFIX, GENDER_PROMPT
from safetensors.torch import load_file, save_file

from audiolens_ct import HookedLALM
from audiolens_ct.errors import CheckpointError
from audiolens_ct.testing import tone
from model_ports._native import AudioTextProcessor

OPTIONS = list(GENDER.labels)


@pytest.fixture(scope="module")
def omni() -> tuple[HookedLALM, torch.nn.Module]:
    return wrapped_with_reference("qwen2.5-omni", seed=1)


def test_a_5_second_clip_gives_125_rows_between_audio_bos_and_eos_in_the_user_turn(omni):
    model, _ = omni
    inp = model.prepare(tone(5.0), GENDER_PROMPT, GENDER_PREFIX, options=OPTIONS)
    tokens = inp.str_tokens[0]
    positions = inp.audio_positions
    # 5 s -> 500 mel frames -> 250 after the stride-2 convolution -> 125 after AvgPool(2, 2)
    assert positions == list(range(positions[0], positions[0] + 125))
    assert tokens[positions[0] - 1] == "<|audio_bos|>" and tokens[positions[-1] + 1] == "<|audio_eos|>"
    text = "".join(tokens)
    assert text.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n")
    assert text.endswith(f"{GENDER_PROMPT}<|im_end|>\n<|im_start|>assistant\n{GENDER_PREFIX}")
    assert inp.segments["last"] == [inp.shape[1] - 1]


@pytest.mark.parametrize(("seconds", "rows"), [(35.0, 875), (299.9, 7497), (301.0, 7500)])
def test_the_release_window_is_300_s_and_a_longer_clip_is_cut(omni, seconds, rows):
    model, _ = omni
    assert model.port.audio_window == 300.0
    inp = model.prepare(tone(seconds), "Hi?", "It is")
    assert len(inp.audio_positions) == rows
    assert tuple(inp.audio_features["input_features"].shape) == (1, 128, 30000)


def test_the_thinkers_3d_positions_for_text_and_audio_are_one_sequential_position(omni):
    """Why a 1-D RoPE Qwen2 shell reproduces the Thinker: `get_rope_index` gives its three M-RoPE components the
    same positions 0..T-1 when the prompt holds text and audio only."""
    model, reference = omni
    inp = model.prepare(tone(3.0), GENDER_PROMPT, GENDER_PREFIX)
    length = inp.shape[1]
    audio_lengths = inp.audio_features["feature_attention_mask"].sum(-1)
    positions, _ = reference.model.get_rope_index(
        inp.tokens, attention_mask=torch.ones_like(inp.tokens), audio_seqlens=audio_lengths
    )
    assert tuple(positions.shape) == (3, 1, length)
    assert torch.equal(positions, torch.arange(length).expand(3, 1, length))


def test_a_batch_of_two_clips_matches_the_thinker_and_each_clip_alone(omni):
    model, reference = omni
    check_batch_of_two(model, reference, 4.0)


def test_the_audio_hooks_see_the_rows_of_the_towers_own_projection(omni):
    model, _ = omni
    inp = model.prepare(tone(3.0), "Hi?", "It is")
    _, cache = model.run_with_cache(inp, names_filter=lambda name: name.startswith("audio."))
    assert tuple(cache["audio.hook_encoder_out"].shape) == (1, 75, 64)
    assert torch.equal(cache["audio.hook_encoder_out"], cache["audio.hook_embeds"])
    assert model.port.audio_row_seconds(model.hf_model, model.processor, 3).tolist() == [0.0, 0.04, 0.08]


def _release_layout(directory, thinker: torch.nn.Module, processor: AudioTextProcessor) -> None:
    """The release layout: a Qwen2_5OmniModel config with the Thinker's as `thinker_config`, its weights under
    `thinker.`, and Talker / vocoder tensors beside them (here two stand-ins the port must leave unread)."""
    from transformers import Qwen2_5OmniConfig, Qwen2_5OmniForConditionalGeneration

    full = Qwen2_5OmniForConditionalGeneration(
        Qwen2_5OmniConfig(thinker_config=thinker.config.to_dict(), enable_audio_output=False)
    )
    full.thinker.load_state_dict(thinker.state_dict())
    full.save_pretrained(directory)
    processor.save_pretrained(directory)
    weights = load_file(directory / "model.safetensors")
    save_file({**weights, "talker.stand_in": torch.zeros(2), "token2wav.stand_in": torch.zeros(2)},
              directory / "model.safetensors", metadata={"format": "pt"})  # fmt: skip
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**config, "architectures": ["Qwen2_5OmniModel"]}))


def test_a_hub_id_resolves_from_an_offline_cache_of_the_release_layout(omni, tmp_path, monkeypatch):
    model, reference = omni
    snapshot = offline_cache_repo(tmp_path, monkeypatch, "Qwen/Qwen2.5-Omni-7B", "01234567" * 5)
    _release_layout(snapshot, reference, model.processor)
    loaded = HookedLALM.from_pretrained("Qwen/Qwen2.5-Omni-7B")
    assert loaded.port.name == "qwen2.5-omni"
    assert type(loaded.hf_model).__name__ == "Qwen2_5OmniThinkerForConditionalGeneration"
    check_loaded_like(loaded, model, reference, np.sin(np.arange(16000) / 9).astype(np.float32))


def test_a_checkpoint_without_a_chat_template_is_refused_naming_the_files(omni, tmp_path):
    model, _ = omni
    model.processor.tokenizer.save_pretrained(tmp_path)
    model.processor.feature_extractor.save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="no chat template .*chat_template.jinja, chat_template.json"):
        AudioTextProcessor.from_pretrained(str(tmp_path))


def test_the_audio_half_equals_the_release_processor_where_torchvision_is_installed(omni):
    pytest.importorskip("torchvision", reason="Qwen2_5OmniProcessor builds a video processor, which needs torchvision")
    from transformers import Qwen2_5OmniProcessor, Qwen2VLImageProcessor, Qwen2VLVideoProcessor

    model, _ = omni
    ours = model.processor
    release = Qwen2_5OmniProcessor(
        image_processor=Qwen2VLImageProcessor(), video_processor=Qwen2VLVideoProcessor(),
        feature_extractor=ours.feature_extractor, tokenizer=ours.tokenizer, chat_template=ours.chat_template,
    )
    wave = tone(7.3)
    inp = model.prepare(wave, GENDER_PROMPT, GENDER_PREFIX)
    text = model.port.chat_text(release, GENDER_PROMPT, GENDER_PREFIX)
    batch = release(text=[text], audio=[wave], return_tensors="pt")
    assert torch.equal(batch["input_ids"], inp.tokens)
    for key in ("input_features", "feature_attention_mask"):
        assert torch.equal(batch[key], inp.audio_features[key])
