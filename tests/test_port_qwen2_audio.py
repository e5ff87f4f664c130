"""Qwen2-Audio port: the sequence layout, batching, audio hook points, loading, and the TransformerLens surface of
`HookedLALM` (the conformance kit runs on it in `test_conformance.py`)."""

import numpy as np
import pytest
import torch
from conftest import GENDER_PREFIX, GENDER_PROMPT

import audiolens_ct as act
from audiolens_ct.errors import AudioLoadError, CheckpointError, InputError, PortError
from audiolens_ct.ports import get_port
from audiolens_ct.testing import tiny_model, tone


def test_batch_of_two_equal_length_inputs_matches_each_alone(qwen2_audio_model):
    model = qwen2_audio_model
    a = model.prepare(tone(2.0, 200, seed=1), GENDER_PROMPT, GENDER_PREFIX, options=["male", "female"])
    b = model.prepare(tone(2.0, 400, seed=2), GENDER_PROMPT, GENDER_PREFIX, options=["male", "female"])
    batch = act.LALMInput.stack([a, b])
    assert batch.shape == (2, a.shape[1])
    with torch.no_grad():
        both = model(batch)
        assert (both[0] - model(a)[0]).abs().max() <= 1e-5
        assert (both[1] - model(b)[0]).abs().max() <= 1e-5
        assert (both - model.hf_logits(batch)).abs().max() <= 1e-5


def test_audio_rows_and_prompt_layout(qwen2_audio_model):
    model = qwen2_audio_model
    inp = model.prepare(tone(5.0), GENDER_PROMPT, GENDER_PREFIX, options=["male", "female"])
    # 5 s -> 500 mel frames -> 250 conv frames -> 125 rows, contiguous, right after <|audio_bos|>.
    positions = inp.audio_positions
    assert len(positions) == 125 and positions == list(range(positions[0], positions[0] + 125))
    tokens = inp.str_tokens[0]
    assert tokens[positions[0] - 1] == "<|audio_bos|>" and tokens[positions[-1] + 1] == "<|audio_eos|>"
    assert "".join(tokens[-6:]).endswith(GENDER_PREFIX)
    assert "<|im_end|>" not in "".join(tokens[-6:])
    seg = inp.segments
    assert "".join(tokens[p] for p in seg["object"]).strip() == "male, female"
    assert [tokens[p] for p in seg["last"]] == [" is"]
    assert seg["early_prompt"][0] == positions[-1] + 1
    assert seg["late_prompt"][-1] == len(tokens) - 2


def test_run_with_cache_exposes_audio_hook_points(qwen2_audio_model):
    model = qwen2_audio_model
    inp = model.prepare(tone(1.0), GENDER_PROMPT, GENDER_PREFIX)
    _, cache = model.run_with_cache(inp)
    assert cache["audio.hook_encoder_out"].shape[-1] == model.hf_model.config.audio_config.d_model
    assert cache["audio.hook_embeds"].shape == (1, len(inp.audio_positions), model.cfg.d_model)
    assert inp.segments is None


def test_hooks_on_audio_embeds_change_the_output(qwen2_audio_model):
    model = qwen2_audio_model
    inp = model.prepare(tone(1.0), GENDER_PROMPT, GENDER_PREFIX)
    with torch.no_grad():
        base = model(inp)
        zeroed = model.run_with_hooks(inp, fwd_hooks=[("audio.hook_embeds", lambda x, hook: torch.zeros_like(x))])
        again = model(inp)
    assert (zeroed - base).abs().max() > 1e-3
    assert torch.equal(again, base)  # the temporary hook is gone and the cached rows are still right


def test_save_pretrained_round_trip_offline(tmp_path):
    hf_model, processor = tiny_model("qwen2-audio", seed=3)
    hf_model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    inputs = processor(text=["<|audio_bos|><|AUDIO|><|audio_eos|> hi"], audio=[tone(1.0)], sampling_rate=16000,
                       return_tensors="pt")
    with torch.no_grad():
        expected = hf_model(**inputs).logits
    model = act.HookedLALM.from_pretrained(str(tmp_path))
    assert model.port.name == "qwen2-audio"
    inp = model.prepare(tone(1.0), GENDER_PROMPT, GENDER_PREFIX)
    with torch.no_grad():
        assert (model(inp) - model.hf_logits(inp)).abs().max() <= 1e-5
        assert (model.hf_model(**inputs).logits - expected).abs().max() <= 1e-5


def test_clear_errors_for_bad_checkpoints_and_audio(tmp_path, qwen2_audio_model):
    with pytest.raises(CheckpointError, match="no such checkpoint directory"):
        act.HookedLALM.from_pretrained(str(tmp_path / "missing"))
    (tmp_path / "config.json").write_text('{"architectures": ["WhisperForConditionalGeneration"]}')
    with pytest.raises(PortError, match="WhisperForConditionalGeneration"):
        act.HookedLALM.from_pretrained(str(tmp_path))
    with pytest.raises(PortError, match="unknown port 'qwen3-audio'"):
        get_port("qwen3-audio")
    with pytest.raises(AudioLoadError, match="44100 Hz but qwen2-audio expects 16000 Hz"):
        qwen2_audio_model.prepare(tone(1.0), GENDER_PROMPT, GENDER_PREFIX, sampling_rate=44100)
    with pytest.raises(AudioLoadError, match="mono 1-D waveform"):
        qwen2_audio_model.prepare(np.zeros((2, 16000), np.float32), GENDER_PROMPT, GENDER_PREFIX)
    with pytest.raises(InputError, match="LALMInput"):
        qwen2_audio_model(torch.zeros(1, 5, dtype=torch.long))


def test_hub_id_resolves_from_an_offline_hub_cache(tmp_path):
    """`from_pretrained("org/name")` takes exactly the hub path: a Hugging Face cache laid out by hand, offline."""
    import os
    import subprocess
    import sys

    hf_model, processor = tiny_model("qwen2-audio", seed=4)
    snapshot = tmp_path / "models--tiny-org--tiny-qwen2-audio" / "snapshots" / ("ab" * 20)
    hf_model.save_pretrained(snapshot)
    processor.save_pretrained(snapshot)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("ab" * 20)
    code = (
        "import audiolens_ct as act, numpy as np, torch\n"
        "m = act.HookedLALM.from_pretrained('tiny-org/tiny-qwen2-audio')\n"
        "inp = m.prepare(np.zeros(16000, np.float32) + 0.1, 'Hi?', 'It is')\n"
        "print(m.port.name, float((m(inp) - m.hf_logits(inp)).abs().max()))\n"
    )
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path), "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    name, diff = out.stdout.split()[-2:]
    assert name == "qwen2-audio" and float(diff) <= 1e-5
    missing = subprocess.run(
        [sys.executable, "-c", "import audiolens_ct as act; act.HookedLALM.from_pretrained('tiny-org/absent')"],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert missing.returncode != 0 and "tiny-org/absent: not a local directory" in missing.stderr


def test_run_with_cache_of_audio_hooks_alone(qwen2_audio_model):
    inp = qwen2_audio_model.prepare(tone(1.0), GENDER_PROMPT, GENDER_PREFIX)
    logits, cache = qwen2_audio_model.run_with_cache(inp, names_filter="audio.hook_embeds")
    assert list(cache.keys()) == ["audio.hook_embeds"]
    assert (logits - qwen2_audio_model(inp)).abs().max() == 0


def test_transformer_lens_tools_that_read_bridge_attributes_work(qwen2_audio_model):
    from transformer_lens.tools.analysis.logit_lens import logit_lens

    model = qwen2_audio_model
    inp = model.prepare(tone(1.0), GENDER_PROMPT, GENDER_PREFIX)
    assert model.unembed is model.bridge.unembed and len(model.blocks) == model.cfg.n_layers
    with torch.no_grad():
        lens = logit_lens(model, inp)
        final = model(inp)
    assert lens.labels[0] == "0_pre" and len(lens.labels) >= model.cfg.n_layers + 1
    assert lens.values.shape[0] == len(lens.labels) and final.shape[1] == inp.shape[1]


def test_two_backward_passes_on_one_input(qwen2_audio_model):
    model = qwen2_audio_model
    inp = model.prepare(tone(1.0), GENDER_PROMPT, GENDER_PREFIX)
    for _ in range(2):
        model(inp)[0, -1].logsumexp(-1).backward()
    grad = model.hf_model.model.audio_tower.conv1.weight.grad
    assert grad is not None and grad.abs().sum() > 0
    model.hf_model.zero_grad(set_to_none=True)


def test_to_str_tokens_accepts_inputs_tensors_and_strings(qwen2_audio_model):
    model = qwen2_audio_model
    inp = model.prepare(tone(0.5), "Hi?", "It is")
    assert model.to_str_tokens(inp) == inp.str_tokens[0]
    assert model.to_str_tokens(inp.tokens[0, -3:]) == inp.str_tokens[0][-3:]
    assert "".join(model.to_str_tokens(" female")) == " female"
