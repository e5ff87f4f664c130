"""What the native transformers ports share (`model_ports/_native.py`), the built-in ports the command line names,
and Voxtral-Small-24B through the `voxtral` port at its real shape on the meta device (no weights allocated)."""

from __future__ import annotations

import pytest
import torch
from transformer_lens.model_bridge.sources import build_bridge_from_module
from transformers import LlamaForCausalLM, VoxtralConfig, VoxtralForConditionalGeneration

from audiolens_ct import choices
from audiolens_ct.cli import main
from audiolens_ct.ports import _BUILTIN, AudioHooks, available_ports, get_port
from audiolens_ct.testing import tiny_model, tone
from model_ports._native import NativePort, equal_rows

NATIVE = ("qwen2-audio", "voxtral", "qwen2.5-omni", "audioflamingo3")


def test_the_run_help_names_every_built_in_port(capsys):
    assert set(choices.PORTS) == set(_BUILTIN) and set(_BUILTIN) <= set(available_ports())
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    for name in choices.PORTS:
        assert name in help_text, name


@pytest.mark.parametrize("name", NATIVE)
def test_a_native_port_bridges_its_models_own_decoder_and_head_and_takes_no_extra_arguments(name):
    port = get_port(name)
    hf_model, processor = tiny_model(name)
    backbone = port.backbone(hf_model)
    assert isinstance(port, NativePort) and backbone.architecture == port.causal_lm_class.__name__
    assert backbone.causal_lm.model is hf_model.model.language_model and backbone.causal_lm.lm_head is hf_model.lm_head
    with pytest.raises(TypeError, match=f"{name} takes no extra prepare arguments, got \\['transcript'\\]"):
        port.encode_prompt(hf_model, processor, tone(0.5), "Hi?", "It is", transcript="hello")


def test_clips_of_a_batch_must_give_equal_audio_rows():
    assert equal_rows(torch.tensor([7, 7]), "some-port") == 7
    with pytest.raises(ValueError, match=r"some-port: clips in one batch must give equal audio rows, got \[7, 9\]"):
        equal_rows(torch.tensor([7, 9]), "some-port")


# -- Voxtral-Small-24B-2507 ---------------------------------------------------------------------------------------

SMALL_24B = VoxtralConfig(
    # the shape of mistralai/Voxtral-Small-24B-2507's config.json: a Whisper-large-v3 encoder, Mistral Small 3.1
    audio_config=dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                      num_mel_bins=128, max_source_positions=1500),
    text_config=dict(model_type="llama", hidden_size=5120, intermediate_size=32768, num_hidden_layers=40,
                     num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=131072,
                     max_position_embeddings=131072, rope_theta=1e8),
    audio_token_id=24,
)  # fmt: skip


@pytest.fixture(scope="module")
def small_24b() -> torch.nn.Module:
    with torch.device("meta"):
        return VoxtralForConditionalGeneration(SMALL_24B).eval()


def test_voxtral_small_24b_is_a_24b_model_that_the_voxtral_port_recognises(small_24b):
    assert 24.0e9 < sum(p.numel() for p in small_24b.parameters()) < 24.5e9
    port = get_port("voxtral")
    assert "mistralai/Voxtral-Small-24B-2507" in port.hf_ids
    assert port.matches({"architectures": ["VoxtralForConditionalGeneration"], "model_type": "voxtral"})


def test_voxtral_small_24b_gives_375_rows_of_d_model_5120_per_30_s_chunk(small_24b):
    port = get_port("voxtral")
    _, processor = tiny_model("voxtral")  # the prompt assembly reads the model's config and the tokenizer's ids
    encoded = port.encode_prompt(small_24b, processor, tone(35.0), "Hi?", "It is")
    assert int(encoded.audio_mask.sum()) == 2 * 375
    features = {key: value.to("meta") for key, value in encoded.audio_features.items()}
    rows = port.audio_embeddings(small_24b, features, {}, AudioHooks())
    assert tuple(rows.shape) == (1, 2 * 375, 5120)


def test_voxtral_small_24b_backbone_is_bridged_as_llama_with_gqa_and_a_decoupled_head_dim(small_24b):
    """The shell `Port.backbone` builds, bridged on the meta device: TransformerLens sees 40 layers of 32 query
    heads sharing 8 key/value heads of width 128 (32 x 128 = 4096, not d_model 5120)."""
    with torch.device("meta"):
        shell = LlamaForCausalLM(small_24b.config.text_config)
    shell.model, shell.lm_head = small_24b.model.language_model, small_24b.lm_head  # as `meta_shell` shares them
    cfg = build_bridge_from_module(shell, "LlamaForCausalLM", hf_config=small_24b.config.text_config).cfg
    assert (cfg.d_model, cfg.n_layers, cfg.n_heads, cfg.n_key_value_heads, cfg.d_head, cfg.d_vocab) == (
        5120, 40, 32, 8, 128, 131072
    )
