"""The Granite-Speech port: its log-mel features, the prompt layout, the Granite multipliers through the shell and
both engines, the LoRA-adapter refusal, and loading by hub id offline (the conformance kit runs on it in
`test_conformance.py`)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from _shared_checks import check_batch_of_two, check_loaded_like, offline_cache_repo, wrapped_with_reference
from conftest import GENDER, GENDER_PREFIX, GENDER_PROMPT
from transformers.audio_utils import mel_filter_bank, spectrogram, window_function

from audiolens_ct import HookedLALM
from audiolens_ct.errors import CheckpointError
from audiolens_ct.testing import tiny_model, tone
from audiolens_ct.tracing import trace
from model_ports.granite_speech import SYSTEM_PROMPT, GraniteLogMel, GraniteSpeechPort

OPTIONS = list(GENDER.labels)


@pytest.fixture(scope="module")
def granite() -> tuple[HookedLALM, torch.nn.Module]:
    return wrapped_with_reference("granite-speech", seed=1)


def test_the_log_mel_features_equal_transformers_numpy_power_mel_with_the_release_normalisation():
    """An independent oracle in float64: transformers' numpy `spectrogram` (a periodic Hann window of 400 centred in
    512, reflection padding, power 2) on its HTK mel filters without norm, then the release normalisation."""
    wave = tone(3.01, seed=2)
    filters = mel_filter_bank(num_frequency_bins=257, num_mel_filters=80, min_frequency=0.0, max_frequency=8000.0,
                              sampling_rate=16000, norm=None, mel_scale="htk")  # fmt: skip
    mel = spectrogram(
        wave.astype(np.float64), window_function(400, "hann", frame_length=512), frame_length=512, hop_length=160,
        fft_length=512, power=2.0, center=True, pad_mode="reflect", mel_filters=filters, dtype=np.float64,
    ).T
    log_mel = np.log10(np.maximum(mel, 1e-10))
    log_mel = np.maximum(log_mel, log_mel.max() - 8.0) / 4 + 1
    expected = log_mel[: len(log_mel) // 2 * 2].reshape(-1, 160)  # 302 frames -> 151 stacked pairs
    ours = GraniteLogMel()(wave)["input_features"][0].numpy()
    assert ours.shape == expected.shape == (151, 160)
    assert np.abs(ours - expected).max() <= 5e-5


def test_the_log_mel_features_equal_the_release_extractor_where_torchaudio_is_installed():
    pytest.importorskip("torchaudio", reason="the release GraniteSpeechFeatureExtractor needs torchaudio")
    from transformers import GraniteSpeechFeatureExtractor

    wave = tone(2.37, seed=4)
    release = GraniteSpeechFeatureExtractor()(torch.from_numpy(wave))
    ours = GraniteLogMel()(wave)
    assert (ours["input_features"] - release["input_features"]).abs().max().item() <= 1e-5
    assert torch.equal(ours["input_features_mask"], release["input_features_mask"])


@pytest.mark.parametrize(("seconds", "rows"), [(0.5, 6), (0.6, 6), (3.0, 30), (3.01, 33), (11.0, 111)])
def test_every_0_3_s_window_gives_3_rows_the_last_one_padded(granite, seconds, rows):
    model, _ = granite
    inp = model.prepare(tone(seconds), "Hi?", "It is")
    assert len(inp.audio_positions) == rows
    with torch.no_grad():
        assert model.audio_embeddings(inp).shape[1] == rows  # the projector agrees with the count
    assert model.port.audio_row_seconds(model.hf_model, model.processor, 4).tolist() == [0.0, 0.0, 0.0, 0.3]


def test_the_prompt_is_the_model_cards_system_turn_then_the_audio_and_question(granite):
    model, _ = granite
    inp = model.prepare(tone(1.0), GENDER_PROMPT, GENDER_PREFIX, options=OPTIONS)
    tokens = inp.str_tokens[0]
    first, last = inp.audio_positions[0], inp.audio_positions[-1]
    assert "".join(tokens[:first]) == (
        f"<|start_of_role|>system<|end_of_role|>{SYSTEM_PROMPT}<|end_of_text|>\n<|start_of_role|>user<|end_of_role|>"
    )
    assert set(tokens[first : last + 1]) == {"<|audio|>"}
    assert "".join(tokens[last + 1 :]) == (
        f"{GENDER_PROMPT}<|end_of_text|>\n<|start_of_role|>assistant<|end_of_role|>{GENDER_PREFIX}"
    )


def test_hook_embed_holds_what_enters_the_residual_stream_scaled_by_the_embedding_multiplier(granite):
    model, reference = granite
    inp = model.prepare(tone(1.0), "Hi?", "It is")
    multiplier = reference.config.text_config.embedding_multiplier
    assert multiplier != 1.0 and reference.config.text_config.residual_multiplier != 1.0
    with torch.no_grad():
        _, cache = model.run_with_cache(inp, names_filter=["hook_embed", "audio.hook_embeds"])
        hidden = reference(input_ids=inp.tokens, **inp.audio_features, output_hidden_states=True).hidden_states[0]
        unscaled = reference.model.projector(reference.model.encoder(inp.audio_features["input_features"]).last_hidden_state)
    text = ~inp.audio_mask[0]
    assert torch.equal(cache["hook_embed"][0, text], reference.model.language_model.embed_tokens(inp.tokens)[0, text] * multiplier)
    assert torch.equal(cache["audio.hook_embeds"], unscaled * multiplier)
    assert torch.equal(cache["hook_embed"], hidden)  # the release forward's input to layer 0


def test_a_batch_of_two_clips_matches_the_hf_forward_and_each_clip_alone(granite):
    model, reference = granite
    check_batch_of_two(model, reference, 2.0)


@pytest.fixture(scope="module")
def sensitive() -> HookedLALM:
    """Two layers with larger weights, so that patching one sublayer's output moves P(answer) measurably."""
    hf_model, processor = tiny_model(
        "granite-speech", seed=2, text_config={"num_hidden_layers": 2, "initializer_range": 0.3, "residual_multiplier": 0.3}
    )
    return HookedLALM.from_hf(hf_model, processor, port="granite-speech")


def _layer_wise(model: HookedLALM, engine: str, kind: str, audit: bool = False):
    return trace(model, tone(0.5), "Gender? male, female.", GENDER_PREFIX, target="male", options=OPTIONS,
                 engine=engine, kind=kind, modes=("layer",), trace_excluded=True, audit=audit)  # fmt: skip


@pytest.mark.parametrize("kind", ["resid_pre", "resid_post"])
def test_the_fast_engine_equals_the_reference_on_the_residual_stream(sensitive, kind):
    fast, reference = _layer_wise(sensitive, "fast", kind), _layer_wise(sensitive, "transformer_lens", kind)
    assert np.abs(fast.p_layer - reference.p_layer).max() <= 1e-6


@pytest.mark.parametrize("kind", ["attn_out", "mlp_out"])
def test_sublayer_patches_see_the_residual_multiplier_as_the_bridge_shows_it(sensitive, kind):
    """TransformerLens shows a Granite block's attention and MLP outputs scaled by `residual_multiplier` (what is
    added to the residual stream); the fast engine's layers show and restore the same scaled values, so its
    attn_out / mlp_out patches equal the reference engine's and pass the runtime audit."""
    fast = _layer_wise(sensitive, "fast", kind, audit=True)
    reference = _layer_wise(sensitive, "transformer_lens", kind)
    moved = np.abs(reference.p_layer - reference.p_corrupted).max()  # how far the patches move the answer
    assert moved > 1e-6 and np.abs(fast.p_layer - reference.p_layer).max() <= min(1e-6, 1e-3 * moved)


def test_a_release_checkpoint_with_a_lora_adapter_is_refused_without_peft(granite, tmp_path):
    from transformers.utils import is_peft_available

    if is_peft_available():
        pytest.skip("peft is installed: the release adapter loads")
    _, reference = granite
    reference.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "has_lora_adapter": True}))
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "target_modules": ["q_proj", "v_proj"]}))
    with pytest.raises(CheckpointError, match=r"LoRA adapter .* only with peft installed: pip install peft"):
        GraniteSpeechPort().load(str(tmp_path))


def test_a_hub_id_resolves_from_an_offline_cache_without_naming_the_port(granite, tmp_path, monkeypatch):
    model, reference = granite
    snapshot = offline_cache_repo(tmp_path, monkeypatch, "ibm-granite/granite-speech-3.3-2b", "fedcba98" * 5)
    reference.save_pretrained(snapshot)  # the untouched twin: wrapping changes the module tree
    model.processor.save_pretrained(snapshot)
    loaded = HookedLALM.from_pretrained("ibm-granite/granite-speech-3.3-2b")
    assert loaded.port.name == "granite-speech"
    check_loaded_like(loaded, model, reference, tone(2.0))
