"""The Voxtral port: release prompt layout, 30-s chunking, batches, loading offline (the conformance kit runs on
it in `test_conformance.py`).

Tiny random-weight models only; nothing is downloaded. The mistral-common path (every released checkpoint) is
checked against the offline assembly where mistral-common is installed, and skipped where it is not.
"""

from __future__ import annotations

import base64
import copy
import json
from pathlib import Path

import huggingface_hub.constants
import numpy as np
import pytest
import torch
from conftest import GENDER, GENDER_PREFIX, GENDER_PROMPT
from transformers import WhisperFeatureExtractor

from audiolens_ct import HookedLALM
from audiolens_ct.errors import CheckpointError
from audiolens_ct.inputs import LALMInput
from audiolens_ct.ports import get_port
from audiolens_ct.testing import ATOL, check_embed_is_resid_pre, check_logits_match, tiny_model, tone
from model_ports.voxtral import VoxtralPort, assembled_prompt, chunked_features, rows_per_chunk

PROMPT, PREFIX, OPTIONS = GENDER_PROMPT, GENDER_PREFIX, list(GENDER.labels)
AUDIO_ID = 24  # `[AUDIO]` in the released Tekken vocabulary
ROWS_PER_CHUNK = 375  # 30 s at 12.5 Hz


def _wrapped(seed: int = 0, **overrides) -> tuple[HookedLALM, torch.nn.Module]:
    hf_model, processor = tiny_model("voxtral", seed=seed, **overrides)
    reference = copy.deepcopy(hf_model).eval()
    return HookedLALM.from_hf(hf_model, processor, port="voxtral"), reference


@pytest.fixture(scope="module")
def gqa() -> tuple[HookedLALM, torch.nn.Module]:
    return _wrapped()


def _prepare(model: HookedLALM, wave: np.ndarray) -> LALMInput:
    return model.prepare(wave, PROMPT, PREFIX, options=OPTIONS)


# -- the release layout ----------------------------------------------------------------------------------------


def test_a_5_second_clip_gives_375_audio_rows_between_begin_audio_and_the_question(gqa):
    model, _ = gqa
    inp = _prepare(model, tone(5.0))
    tok = model.tokenizer

    assert inp.str_tokens[0][:3] == ["<s>", "[INST]", "[BEGIN_AUDIO]"]
    assert inp.audio_positions == list(range(3, 3 + ROWS_PER_CHUNK))
    assert inp.tokens[0, inp.audio_mask[0]].eq(AUDIO_ID).all()
    tail = tok.encode(PROMPT, add_special_tokens=False) + [tok.convert_tokens_to_ids("[/INST]")]
    tail += tok.encode(PREFIX, add_special_tokens=False)
    assert inp.tokens[0, 3 + ROWS_PER_CHUNK :].tolist() == tail
    assert inp.segments["last"] == [inp.shape[1] - 1]
    assert tuple(inp.audio_features["input_features"].shape) == (1, 1, 128, 3000)


def test_the_response_prefix_loses_its_trailing_spaces_as_in_mistral_common(gqa):
    model, _ = gqa
    spaced = model.prepare(tone(1.0), PROMPT, PREFIX + "  ")
    assert torch.equal(spaced.tokens, model.prepare(tone(1.0), PROMPT, PREFIX).tokens)


@pytest.mark.parametrize(("samples", "chunks"), [(8_000, 1), (480_000, 1), (480_001, 2), (560_000, 2)])
def test_audio_is_padded_to_whole_30_s_chunks_of_375_rows(gqa, samples, chunks):
    model, _ = gqa
    inp = _prepare(model, tone(40.0)[:samples])
    assert tuple(inp.audio_features["input_features"].shape) == (1, chunks, 128, 3000)
    assert len(inp.audio_positions) == chunks * ROWS_PER_CHUNK


def test_audio_hooks_see_encoder_frames_and_rows_batch_first(gqa):
    model, _ = gqa
    _, cache = model.run_with_cache(_prepare(model, tone(35.0)), names_filter=lambda n: n.startswith("audio."))
    assert tuple(cache["audio.hook_encoder_out"].shape) == (1, 2 * 1500, 32)
    assert tuple(cache["audio.hook_embeds"].shape) == (1, 2 * ROWS_PER_CHUNK, 64)


def test_backbone_is_a_llama_shell_sharing_the_decoder_and_head(gqa):
    model, _ = gqa
    backbone = VoxtralPort().backbone(model.hf_model)
    assert backbone.architecture == "LlamaForCausalLM"
    assert backbone.causal_lm.model is model.hf_model.model.language_model
    assert backbone.causal_lm.lm_head is model.hf_model.lm_head


# -- batches ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seconds", [5.0, 35.0])
def test_a_batch_of_two_clips_gives_each_clip_its_own_rows(gqa, seconds):
    model, reference = gqa
    first, second = _prepare(model, tone(seconds)), _prepare(model, tone(seconds, freq=440.0, seed=3))
    batch = LALMInput.stack([first, second])
    chunks = 1 if seconds < 30 else 2
    assert tuple(batch.audio_features["input_features"].shape) == (2, chunks, 128, 3000)

    check_logits_match(model, reference, batch)  # each check raises beyond 1e-5
    check_embed_is_resid_pre(model, batch)
    with torch.no_grad():
        together, alone = model(batch), torch.cat([model(first), model(second)])
    assert (together - alone).abs().max().item() <= ATOL
    assert (alone[0] - alone[1]).abs().max().item() > 1e-3  # the two clips do differ, so a row mix-up shows


# -- loading ---------------------------------------------------------------------------------------------------


def _offline(monkeypatch, cache: Path | None = None) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    if cache is not None:
        monkeypatch.setenv("HF_HUB_CACHE", str(cache))
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))


def _save(reference: torch.nn.Module, processor, directory: Path) -> None:
    """Save the untouched twin: wrapping puts bridge components into the HF module tree."""
    reference.save_pretrained(directory)
    processor.save_pretrained(directory)


def test_a_saved_checkpoint_loads_offline_with_the_port_read_from_config_json(gqa, tmp_path, monkeypatch):
    model, reference = gqa
    _save(reference, model.processor, tmp_path)
    _offline(monkeypatch)
    loaded = HookedLALM.from_pretrained(str(tmp_path))
    assert loaded.port.name == "voxtral"
    inp = _prepare(model, tone(2.0))
    with torch.no_grad():
        assert (loaded(_prepare(loaded, tone(2.0))) - model(inp)).abs().max().item() <= ATOL


def test_a_hub_id_resolves_from_the_hub_cache_offline(gqa, tmp_path, monkeypatch):
    model, reference = gqa
    repo = tmp_path / "models--mistralai--Voxtral-Mini-3B-2507"
    commit = "0123456789abcdef0123456789abcdef01234567"
    _save(reference, model.processor, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    _offline(monkeypatch, cache=tmp_path)
    loaded = HookedLALM.from_pretrained("mistralai/Voxtral-Mini-3B-2507")
    assert loaded.port.name == "voxtral"
    assert torch.equal(_prepare(loaded, tone(1.0)).tokens, _prepare(model, tone(1.0)).tokens)


# -- the release path: mistral-common ----------------------------------------------------------------------------

_TEKKEN_SPECIALS = {
    0: "<unk>", 1: "<s>", 2: "</s>", 3: "[INST]", 4: "[/INST]", 5: "[AVAILABLE_TOOLS]", 6: "[/AVAILABLE_TOOLS]",
    7: "[TOOL_RESULTS]", 8: "[/TOOL_RESULTS]", 9: "[TOOL_CALLS]", 10: "[IMG]", 11: "<pad>", 12: "[IMG_BREAK]",
    13: "[IMG_END]", 14: "[PREFIX]", 15: "[MIDDLE]", 16: "[SUFFIX]", 17: "[SYSTEM_PROMPT]", 18: "[/SYSTEM_PROMPT]",
    19: "[TOOL_CONTENT]", 24: "[AUDIO]", 25: "[BEGIN_AUDIO]", 34: "[TRANSCRIBE]",
}
_N_SPECIAL = 35


def _tiny_tekken() -> dict:
    """A Tekken tokenizer file with the release's special-token ids, byte tokens and Voxtral's audio config."""
    return {
        "config": {
            "pattern": r"[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+",
            "num_vocab_tokens": 256, "default_vocab_size": 256 + _N_SPECIAL,
            "default_num_special_tokens": _N_SPECIAL, "version": "v7",
        },
        "vocab": [{"rank": i, "token_bytes": base64.b64encode(bytes([i])).decode(), "token_str": None} for i in range(256)],
        "special_tokens": [
            {"rank": i, "token_str": _TEKKEN_SPECIALS.get(i, f"<SPECIAL_{i}>"), "is_control": True}
            for i in range(_N_SPECIAL)
        ],
        "audio": {
            "sampling_rate": 16000, "frame_rate": 12.5, "chunk_length_s": 30.0,
            "audio_encoding_config": {"num_mel_bins": 128, "hop_length": 160, "window_size": 400},
        },
    }


def _release_layout_checkpoint(directory: Path) -> None:
    hf_model, _ = tiny_model("voxtral", text_config={"vocab_size": 256 + _N_SPECIAL})
    hf_model.save_pretrained(directory)
    WhisperFeatureExtractor(feature_size=128).save_pretrained(directory)
    (directory / "tekken.json").write_text(json.dumps(_tiny_tekken()))


@pytest.mark.parametrize(("seconds", "prefix"), [(0.7, PREFIX), (31.0, PREFIX + " "), (5.0, "")])
def test_mistral_common_gives_the_same_tokens_and_features_as_the_offline_assembly(
    tmp_path, monkeypatch, seconds, prefix
):
    pytest.importorskip("mistral_common", reason="mistral-common not installed (the release tokenizer path)")
    _release_layout_checkpoint(tmp_path)
    _offline(monkeypatch)
    port = get_port("voxtral")
    hf_model, processor = port.load(str(tmp_path))
    assert type(processor.tokenizer).__name__ == "MistralCommonBackend"

    wave = tone(seconds)
    release = port.encode_prompt(hf_model, processor, wave, PROMPT, prefix)
    features = chunked_features(processor.feature_extractor, wave)
    n_audio = features.shape[1] * rows_per_chunk(hf_model.config.audio_config)
    offline = assembled_prompt(processor.tokenizer, AUDIO_ID, n_audio, PROMPT, prefix)
    assert torch.equal(release.tokens, offline)
    assert torch.equal(release.audio_features["input_features"], features)


def test_a_release_checkpoint_without_mistral_common_fails_with_the_install_hint(tmp_path, monkeypatch):
    from transformers.utils import is_mistral_common_available

    if is_mistral_common_available():
        pytest.skip("mistral-common is installed")
    _release_layout_checkpoint(tmp_path)
    _offline(monkeypatch)
    with pytest.raises(CheckpointError, match=r"tekken\.json.*pip install \"mistral-common\[audio\]"):
        VoxtralPort().load(str(tmp_path))
