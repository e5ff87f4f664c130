"""The Qwen-Audio (v1) port: what a user of `qwen-audio` can rely on (the conformance kit runs on it in
`test_conformance.py`).

- its forward equals the release forward (`_qwen_audio_release.py`, on release-named tensors) for a batch whose
  clips have different encoder lengths (truncation, key masking, q|k|v split, SiLU on w2);
- the audio span is `<audio>` + N pads + `</audio>` with N + 2 rows, the tags' rows being the learned bos/eos;
- checkpoints in the release layout round-trip, and a bad one fails with the file and key in the message;
- with the real `qwen.tiktoken`, prompts tokenise exactly as the release does, and the features equal the release
  log-mel. These need two files of the release (`qwen.tiktoken`, `mel_filters.npz` from `Qwen/Qwen-Audio-Chat`) in
  the directory `$QWEN_AUDIO_RELEASE`, or in `shared/reference/qwen-audio-release` beside this checkout.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from _qwen_audio_release import release_forward
from conftest import GENDER_PREFIX, GENDER_PROMPT

from audiolens_ct import HookedLALM, LALMInput, testing
from audiolens_ct.errors import CheckpointError, InputError
from audiolens_ct.ports import get_port
from model_ports.qwen_audio import (
    QwenAudioProcessor,
    QwenAudioTokenizer,
    release_config,
    release_state_dict,
    save_release_checkpoint,
)

_BESIDE = Path(__file__).resolve().parents[2] / "shared" / "reference" / "qwen-audio-release"
_WHERE = (os.environ.get("QWEN_AUDIO_RELEASE"), _BESIDE)
RELEASE_FILES = next((Path(d) for d in _WHERE if d and (Path(d) / "qwen.tiktoken").is_file()), None)
NO_RELEASE_FILES = "the release's qwen.tiktoken and mel_filters.npz are not here (set QWEN_AUDIO_RELEASE)"
needs_release_files = pytest.mark.skipif(RELEASE_FILES is None, reason=NO_RELEASE_FILES)
PROMPT, PREFIX = GENDER_PROMPT, GENDER_PREFIX


@pytest.fixture(scope="module")
def tiny():
    return testing.tiny_model("qwen-audio")


@pytest.fixture(scope="module")
def release_tokenizer():
    if RELEASE_FILES is None:
        pytest.skip(NO_RELEASE_FILES)
    return QwenAudioTokenizer.from_file(RELEASE_FILES / "qwen.tiktoken")


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


# -- the release math -----------------------------------------------------------------------------------------------


def test_forward_equals_the_release_math_for_a_batch_of_unequal_clips(tiny):
    """0.20 s and 0.21 s give the same N (5) but T_cnn 10 vs 11: the shorter clip's extra frame is zeroed and
    masked as a key, as in the release batch path (5.00 s vs 5.01 s would be 250 vs 251 frames, N 125)."""
    hf_model, processor = tiny
    model = HookedLALM.from_hf(hf_model, processor, port="qwen-audio")
    clips = [testing.tone(0.2, seed=2), testing.tone(0.21, seed=3)]
    batch = LALMInput.stack([model.prepare(c, PROMPT, PREFIX) for c in clips])
    assert batch.audio_features["input_audio_lengths"].tolist() == [[10, 5], [11, 5]]
    with torch.no_grad():
        expected = release_forward(
            release_state_dict(hf_model), release_config(hf_model), batch.tokens,
            batch.audio_features["input_features"], batch.audio_features["input_audio_lengths"],
        )
        port_logits = model.hf_logits(batch)
        hooked_logits = model(batch)
    assert _max_diff(port_logits, expected) <= 1e-5
    assert _max_diff(hooked_logits, expected) <= 1e-5


def test_the_encoder_positions_are_the_release_sinusoids(tiny):
    """Release `positional_embedding`: sin | cos halves over timescales 10000^(-k / (d/2 - 1))."""
    table = tiny[0].audio.encoder.embed_positions.weight
    d = table.shape[1]
    angle = 7 * 10000.0 ** (-3 / (d // 2 - 1))
    assert table.shape == (1500, 32)
    assert table[7, 3].item() == pytest.approx(np.sin(angle), abs=1e-6)
    assert table[7, d // 2 + 3].item() == pytest.approx(np.cos(angle), abs=1e-6)


# -- the audio span ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("seconds", "span"), [(1.0, 27), (5.0, 127)])
def test_audio_span_is_tags_plus_pads_and_its_end_rows_are_the_learned_bos_eos(tiny, seconds, span):
    hf_model, processor = tiny
    tok = processor.tokenizer
    model = HookedLALM.from_hf(hf_model, processor, port="qwen-audio")
    inp = model.prepare(testing.tone(seconds), PROMPT, PREFIX, options=["male", "female"])
    positions = inp.audio_positions
    assert len(positions) == span and positions == list(range(positions[0], positions[0] + span))
    ids = inp.tokens[0, positions].tolist()
    assert ids == [tok.audio_start_id] + [tok.audio_pad_id] * (span - 2) + [tok.audio_end_id]
    with torch.no_grad():
        _, cache = model.run_with_cache(inp, names_filter=["audio.hook_embeds", "hook_embed"])
    rows = cache["audio.hook_embeds"][0]
    assert rows.shape == (span, hf_model.config.hidden_size)
    bos_eos = hf_model.audio.audio_bos_eos_token.weight
    assert torch.equal(rows[0], bos_eos[0]) and torch.equal(rows[-1], bos_eos[1])
    assert torch.equal(cache["hook_embed"][0, positions], rows)


@pytest.mark.parametrize(("seconds", "lengths"), [(1.0, [50, 25]), (10.0, [500, 250]), (30.0, [1500, 750]), (40.0, [1500, 750])])
def test_encoder_frames_and_audio_rows_follow_the_release_formula(tiny, seconds, lengths):
    _, processor = tiny
    features = processor.features(np.zeros(int(seconds * 16000), dtype=np.float32))
    assert features["input_features"].shape == (1, 80, 3000)
    assert features["input_audio_lengths"].tolist() == [lengths]


def test_a_clip_too_short_for_one_audio_row_is_refused(tiny):
    _, processor = tiny
    with pytest.raises(InputError, match="400 samples is too short"):
        processor.features(np.zeros(400, dtype=np.float32))


def test_inputs_longer_than_the_release_context_are_refused(tiny):
    hf_model, processor = tiny
    model = HookedLALM.from_hf(hf_model, processor, port="qwen-audio")
    with pytest.raises(InputError, match="beyond 2048 the release switches on dynamic NTK"):
        model.prepare(testing.tone(1.0), "hello world " * 1100, PREFIX)


def test_chat_format_defaults_to_the_checkpoint_and_can_be_overridden(tiny):
    hf_model, processor = tiny
    tok = processor.tokenizer
    model = HookedLALM.from_hf(hf_model, processor, port="qwen-audio")
    chat = model.prepare(testing.tone(1.0), PROMPT, PREFIX)
    raw = model.prepare(testing.tone(1.0), PROMPT, PREFIX, chat_format="raw")
    assert chat.tokens[0, 0].item() == tok.special_tokens["<|im_start|>"]
    assert raw.tokens[0].tolist() == (
        [tok.audio_start_id] + [tok.audio_pad_id] * 25 + [tok.audio_end_id] + tok.encode(PROMPT + PREFIX)
    )
    twin = model.prepare_like(raw, np.zeros(16000, dtype=np.float32))
    assert torch.equal(twin.tokens, raw.tokens)


# -- the release checkpoint layout ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("shards", "weights_format"), [(1, "safetensors"), (2, "safetensors"), (2, "bin")])
def test_release_layout_round_trips_through_from_pretrained(tiny, tmp_path, shards, weights_format):
    hf_model, processor = tiny
    save_release_checkpoint(hf_model, QwenAudioProcessor(processor.tokenizer, "raw"), tmp_path, shards, weights_format)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["architectures"] == ["QWenLMHeadModel"]
    assert config["audio"]["audio_start_id"] == processor.tokenizer.audio_start_id
    # the release code's QWenConfig defaults to fp16=True; its loader (fp32=True) needs all three flags false
    assert (config["bf16"], config["fp16"], config["fp32"]) == (False, False, False)
    loaded = HookedLALM.from_pretrained(str(tmp_path))
    assert loaded.port.name == "qwen-audio"
    assert loaded.processor.chat_format == "raw"
    inp = loaded.prepare(testing.tone(1.0), PROMPT, PREFIX)
    with torch.no_grad():
        assert _max_diff(loaded(inp), get_port("qwen-audio").hf_logits(hf_model, inp)) == 0.0


def test_a_hub_id_resolves_from_the_hf_cache_offline(tiny, tmp_path, monkeypatch):
    import huggingface_hub.constants as hub

    hf_model, processor = tiny
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "models--Qwen--Qwen-Audio-Chat"
    save_release_checkpoint(hf_model, processor, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)
    loaded = HookedLALM.from_pretrained("Qwen/Qwen-Audio-Chat")
    inp = loaded.prepare(testing.tone(1.0), PROMPT, PREFIX)
    with torch.no_grad():
        assert _max_diff(loaded(inp), get_port("qwen-audio").hf_logits(hf_model, inp)) == 0.0


def _rewrite_weights(directory: Path, edit) -> None:
    from safetensors.torch import load_file, save_file

    path = directory / "model.safetensors"
    weights = load_file(str(path))
    edit(weights)
    save_file(weights, str(path))


def _drop_ln_post(w, model):
    del w["transformer.audio.ln_post.weight"]


def _native_names(w, model):
    w.clear()
    w.update({k: v.clone() for k, v in model.state_dict().items()})


def _extra_layer(w, model):
    w["transformer.h.9.attn.c_attn.weight"] = w["transformer.h.0.attn.c_attn.weight"].clone()


def _transposed_proj(w, model):
    w["transformer.audio.proj.weight"] = w["transformer.audio.proj.weight"].T.contiguous()


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (_drop_ln_post, "{d}/model.safetensors: missing key transformer.audio.ln_post.weight"),
        (_native_names, "{d}/model.safetensors: missing key transformer.wte.weight"),
        (_extra_layer, "{d}/model.safetensors: unexpected key transformer.h.9.attn.c_attn.weight (not in the Qwen-Audio release layout)"),
        (_transposed_proj, "{d}/model.safetensors: key transformer.audio.proj.weight has shape (32, 64), config.json implies (64, 32)"),
    ],
)
def test_a_checkpoint_that_does_not_match_the_layout_names_file_and_key(tiny, tmp_path, edit, message):
    hf_model, processor = tiny
    save_release_checkpoint(hf_model, processor, tmp_path)
    _rewrite_weights(tmp_path, lambda w: edit(w, hf_model))
    with pytest.raises(CheckpointError) as err:
        HookedLALM.from_pretrained(str(tmp_path))
    assert str(err.value) == message.format(d=tmp_path)


def test_missing_tokenizer_and_audio_section_are_named(tiny, tmp_path):
    hf_model, processor = tiny
    save_release_checkpoint(hf_model, processor, tmp_path)
    (tmp_path / "qwen.tiktoken").unlink()
    with pytest.raises(CheckpointError, match=f"{tmp_path}/qwen.tiktoken: no such tokenizer file"):
        HookedLALM.from_pretrained(str(tmp_path))
    config = json.loads((tmp_path / "config.json").read_text())
    del config["audio"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="does not belong to port 'qwen-audio'"):
        HookedLALM.from_pretrained(str(tmp_path), port="qwen-audio")
    with pytest.raises(CheckpointError, match=f"{tmp_path}/config.json: no 'audio' section; this is a text-only QWen"):
        get_port("qwen-audio").load(str(tmp_path))


def test_the_port_claims_qwen_v1_configs_with_an_audio_section_only():
    port = get_port("qwen-audio")
    audio = {"n_mels": 80, "audio_start_id": 155163}
    assert port.matches({"architectures": ["QWenLMHeadModel"], "model_type": "qwen", "audio": audio})
    assert not port.matches({"architectures": ["QWenLMHeadModel"], "model_type": "qwen"})  # Qwen-7B
    assert not port.matches({"architectures": ["QWenLMHeadModel"], "model_type": "qwen", "visual": {}})  # Qwen-VL
    assert not port.matches({"architectures": ["Qwen2AudioForConditionalGeneration"], "model_type": "qwen2_audio"})


# -- the real vocabulary (the release files) -----------------------------------------------------------------------


def test_release_special_token_ids(release_tokenizer):
    ids = release_tokenizer.special_tokens
    assert len(release_tokenizer) == 155165
    assert [ids[t] for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|extra_204|>")] == [151643, 151644, 151645, 151850]
    assert [ids[t] for t in ("[[[AUDIO:modality]]]", "<|startoftranscript|>", "<|transcribe|>", "<|en|>")] == [151851, 151852, 151855, 151859]
    assert [ids[t] for t in ("<|notimestamps|>", "<|wo_itn|>", "<audio>", "</audio>")] == [151868, 154877, 155163, 155164]


def test_chat_prompt_tokenises_exactly_as_the_release(release_tokenizer):
    """Release `make_context` (chatml) for q = "what does the person say?" and a 5-s clip: 157 tokens."""
    processor = QwenAudioProcessor(release_tokenizer, "chatml")
    span = int(processor.features(np.zeros(80000, dtype=np.float32))["input_audio_lengths"][0, 1]) + 2
    ids = processor.prompt_ids("what does the person say?", "", span)
    assert len(ids) == 157 and ids.index(155163) == 18 and ids.index(155164) == 144
    assert ids[:19] == [151644, 8948, 198, 2610, 525, 264, 10950, 17847, 13, 151645, 198, 151644, 872, 198, 14755, 220, 16, 25, 155163]
    assert ids[144:] == [155164, 198, 12555, 1558, 279, 1697, 1977, 30, 151645, 198, 151644, 77091, 198]


def test_base_asr_prompt_tokenises_as_the_release(release_tokenizer):
    """The base model's ASR prompt (release README) is 133 tokens for 5 s, the task tags being special tokens."""
    processor = QwenAudioProcessor(release_tokenizer, "raw")
    ids = processor.prompt_ids("<|startoftranscript|><|en|><|transcribe|><|en|><|notimestamps|><|wo_itn|>", "", 127)
    assert len(ids) == 133
    assert ids[127:] == [151852, 151859, 151855, 151859, 151868, 154877]


@needs_release_files
def test_features_equal_the_release_log_mel_with_its_filterbank(tiny):
    """The release recipe: 30-s pad, centred STFT (n_fft 400, hop 160, Hann), last frame dropped, |X|^2, the
    shipped 80-mel filterbank, log10 clamped at 1e-10 and at max - 8, then (x + 4) / 4."""
    _, processor = tiny
    wave = np.random.default_rng(0).standard_normal(80000).astype(np.float32) * 0.1
    with np.load(RELEASE_FILES / "mel_filters.npz") as f:
        filters = torch.from_numpy(f["mel_80"]).double()
    padded = torch.from_numpy(np.pad(wave, (0, 480000 - len(wave)))).double()
    stft = torch.stft(padded, 400, 160, window=torch.hann_window(400, dtype=torch.float64), return_complex=True)
    log_spec = (filters @ stft[..., :-1].abs() ** 2).clamp(min=1e-10).log10()
    expected = (torch.maximum(log_spec, log_spec.max() - 8.0) + 4.0) / 4.0
    ours = processor.features(wave)["input_features"][0].double()
    assert _max_diff(ours, expected) <= 1e-5
