"""DeSTA2 and DeSTA2.5-Audio ports: the released sequence layouts, transcripts, Q-Former, Whisper taps and
checkpoint layouts (the conformance kit runs on both in `test_conformance.py`)."""

import hashlib
import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from conftest import GENDER, GENDER_PREFIX, GENDER_PROMPT
from safetensors.torch import save_file

import audiolens_ct as act
from audiolens_ct.errors import CheckpointError, InputError
from audiolens_ct.ports import get_port
from audiolens_ct.testing import tiny_model, tone
from model_ports._desta_common import QformerConnector
from model_ports.desta2 import Desta2Port
from model_ports.desta25 import Desta25Port

TRANSCRIPT = " Thank you for calling. Goodbye."
OPTIONS = list(GENDER.labels)


def hooked(port: str, **overrides) -> act.HookedLALM:
    hf_model, processor = tiny_model(port, **overrides)
    return act.HookedLALM.from_hf(hf_model, processor, port=port)


def skeleton(model: act.HookedLALM, inp: act.LALMInput) -> list[str]:
    """The structural tokens of an input: special tokens, "\\n\\n", and "A" for each audio row."""
    structural = set(model.tokenizer.all_special_tokens) | {"\n\n"}
    audio = set(inp.audio_positions)
    return ["A" if p in audio else s for p, s in enumerate(inp.str_tokens[0]) if p in audio or s in structural]


def transcript_positions(model: act.HookedLALM, inp: act.LALMInput) -> list[int]:
    """Where the transcript sits: DeSTA2 writes its tokens after the audio turn's "\n\n", up to the turn's
    `<|eot_id|>`; DeSTA2.5 makes its token embeddings the last audio rows."""
    if model.port.name == "desta2.5":
        return inp.audio_positions[-len(inp.extras["transcript_ids"]) :]
    start = inp.first_text_after_audio + 1
    end = inp.tokens[0].tolist().index(model.tokenizer.convert_tokens_to_ids("<|eot_id|>"), start)
    return list(range(start, end))


# -- sequence layouts ------------------------------------------------------------------------------------------------


def test_desta2_layout_two_bos_and_64_rows_between_audio_header_and_its_newlines():
    model = hooked("desta2")
    inp = model.prepare(tone(2.0), GENDER_PROMPT, GENDER_PREFIX, options=OPTIONS, transcript=TRANSCRIPT)
    bos, sh, eh, eot = "<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"
    assert skeleton(model, inp) == [
        bos, bos, sh, eh, "\n\n", eot,  # system
        sh, eh, *["A"] * 64, "\n\n", eot,  # audio turn: rows, then the transcript
        sh, eh, "\n\n", eot,  # user
        sh, eh, "\n\n",  # assistant, then the response prefix
    ]
    tokens, first = inp.str_tokens[0], inp.audio_positions[0]
    assert "".join(tokens[:first]).endswith("<|eot_id|><|start_header_id|>audio<|end_header_id|>")
    after = inp.first_text_after_audio
    assert inp.extras["transcript"] == TRANSCRIPT
    assert tokens[after] == "\n\n" and "".join(tokens[after + 1 :]).startswith(TRANSCRIPT + eot)
    assert "".join(tokens[-5:]).endswith(GENDER_PREFIX)
    assert "".join(tokens[p] for p in inp.segments["object"]).strip() == "male, female"


def test_desta2_tokens_are_the_released_ids_with_rows_at_the_left_token_count():
    model = hooked("desta2")
    inp = model.prepare(tone(1.0), "Describe the audio.", transcript=TRANSCRIPT)
    tok = model.tokenizer
    messages = [{"role": "system", "content": "Focus on the input audio."},
                {"role": "audio", "content": "clip.wav"}, {"role": "user", "content": "Describe the audio."}]
    left, right = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True).split("clip.wav")
    released = tok(left + TRANSCRIPT + right)["input_ids"]
    tokens = inp.tokens[0]
    assert tokens[~inp.audio_mask[0]].tolist() == released
    assert inp.audio_positions[0] == len(tok.tokenize(left))


def test_desta25_layout_one_bos_and_a_run_of_64_plus_t_rows_after_start_audio():
    model = hooked("desta2.5")
    transcript = TRANSCRIPT.strip()
    inp = model.prepare(tone(2.0), GENDER_PROMPT, GENDER_PREFIX, options=OPTIONS, transcript=transcript)
    n_text = len(model.tokenizer.encode(transcript, add_special_tokens=False))
    bos, sh, eh, eot = "<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"
    assert skeleton(model, inp) == [
        bos, sh, eh, "\n\n", "\n\n", eot,  # system, with the date header
        sh, eh, "\n\n", *["A"] * (64 + n_text), eot,  # user: <start_audio> rows <end_audio>\n question
        sh, eh, "\n\n",
    ]
    tokens, first, last = inp.str_tokens[0], inp.audio_positions[0], inp.audio_positions[-1]
    assert "".join(tokens[:first]).endswith(
        "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\nFocus on the audio clips and instructions."
        "<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n<start_audio>"
    )
    assert "".join(tokens[last + 1 :]).startswith("<end_audio>\n" + GENDER_PROMPT)
    assert set(inp.tokens[0, inp.audio_mask[0]].tolist()) == {model.tokenizer.convert_tokens_to_ids("<|reserved_special_token_87|>")}
    # The last T audio rows are the transcript's own token embeddings.
    _, cache = model.run_with_cache(inp, names_filter=["audio.hook_embeds", "hook_embed"])
    ids = torch.tensor(inp.extras["transcript_ids"])
    assert torch.equal(cache["audio.hook_embeds"][0, 64:], model.hf_model.embed(ids))


@pytest.mark.parametrize("port", ["desta2", "desta2.5"])
def test_another_transcript_changes_the_length_but_not_the_text_after_it(port):
    model = hooked(port)
    clean = model.prepare(tone(2.0), GENDER_PROMPT, GENDER_PREFIX, options=OPTIONS, transcript=TRANSCRIPT)
    silent = model.prepare_like(clean, np.zeros(32000, dtype=np.float32), transcript=" ")
    positions = transcript_positions(model, clean)
    assert len(transcript_positions(model, silent)) == 1
    assert clean.shape[1] - silent.shape[1] == len(positions) - 1
    tail = clean.shape[1] - (positions[-1] + 1)
    assert torch.equal(clean.tokens[0, -tail:], silent.tokens[0, -tail:])
    assert silent.extras["transcript"] == " "


def test_desta25_batch_of_two_clips_matches_each_alone():
    model = hooked("desta2.5")
    a = model.prepare(tone(1.0, 200, seed=1), GENDER_PROMPT, GENDER_PREFIX, transcript="Thank you.")
    b = model.prepare(tone(2.0, 400, seed=2), GENDER_PROMPT, GENDER_PREFIX, transcript="Thank you.")
    batch = act.LALMInput.stack([a, b])
    with torch.no_grad():
        both = model(batch)
        assert (both[0] - model(a)[0]).abs().max() <= 1e-5 and (both[1] - model(b)[0]).abs().max() <= 1e-5
        assert (both - model.hf_logits(batch)).abs().max() <= 1e-5


# -- transcripts -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("port", ["desta2", "desta2.5"])
def test_the_twin_reads_the_clean_transcript_or_transcribes_its_own_audio(port):
    """The corrupted twin's `prepare` arguments per transcript policy, and what a trace records of an input."""
    model = hooked(port)
    clean = model.prepare(tone(1.0), GENDER_PROMPT, GENDER_PREFIX, transcript=TRANSCRIPT)
    assert model.port.reads_transcript
    assert model.port.twin_kwargs(clean.extras, "clean") == {"transcript": TRANSCRIPT}
    assert model.port.twin_kwargs(clean.extras, "corrupted") == {"transcript": None}
    assert model.port.input_record(clean.extras) == {"transcript": TRANSCRIPT}
    with pytest.raises(InputError, match="unknown transcript policy 'audio'"):
        model.port.twin_kwargs(clean.extras, "audio")


def test_desta2_transcribes_with_whisper_when_no_transcript_is_given():
    model = hooked("desta2")
    wave = tone(1.5)
    inp = model.prepare(wave, "Describe the audio.")
    features = inp.audio_features["input_features"]
    generated = model.hf_model.whisper.generate(features)
    expected = model.processor.whisper.batch_decode(generated, skip_special_tokens=True)[0]  # not stripped
    assert inp.extras["transcript"] == expected
    assert model.tokenizer.decode(inp.tokens[0, transcript_positions(model, inp)]) == expected


def test_desta25_gives_silence_a_blank_transcript_and_strips_whisper_output():
    pytest.importorskip("silero_vad")
    hf_model, processor = tiny_model("desta2.5")
    silent = Desta25Port().encode_prompt(hf_model, processor, np.zeros(32000, np.float32), "Describe the audio.", "")
    assert silent.extras["transcript"] == " " and int(silent.audio_mask.sum()) == 64 + 1
    wave = tone(1.0)
    heard = Desta25Port(vad=False).encode_prompt(hf_model, processor, wave, "Describe the audio.", "")
    generated = hf_model.whisper.generate(processor.features(wave), max_new_tokens=128)
    assert heard.extras["transcript"] == processor.whisper.batch_decode(generated, skip_special_tokens=True)[0].strip()


def test_desta2_release_resampling_goes_through_22050_hz():
    import librosa

    hf_model, processor = tiny_model("desta2")
    wave = tone(1.0, 3000)
    released = Desta2Port().encode_prompt(hf_model, processor, wave, "Describe the audio.", "", transcript=TRANSCRIPT)
    direct = Desta2Port(release_resampling=False).encode_prompt(
        hf_model, processor, wave, "Describe the audio.", "", transcript=TRANSCRIPT
    )
    twice = librosa.resample(librosa.resample(wave, orig_sr=16000, target_sr=22050), orig_sr=22050, target_sr=16000)
    assert torch.equal(released.audio_features["input_features"], processor.features(twice))
    assert torch.equal(direct.audio_features["input_features"], processor.features(wave))
    assert (released.audio_features["input_features"] - direct.audio_features["input_features"]).abs().max() > 1e-3


# -- connector and taps ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_qformer_queries_attend_to_each_other_both_ways(attn):
    torch.manual_seed(0)
    connector = QformerConnector(d_model=32, n_heads=2, n_layers=2, prompt_size=64, n_taps=1, llm_hidden_size=16).eval()
    connector.qformer.config._attn_implementation = attn
    states = torch.randn(1, 50, 32)
    with torch.no_grad():
        before = connector.query(0, states)
        connector.layer_prompts[0][0, 63] += 1.0
        after = connector.query(0, states)
    assert (after[0, 0] - before[0, 0]).abs().max() > 1e-3  # query 0 sees query 63


def test_connector_mixes_the_taps_per_query_position():
    torch.manual_seed(0)
    connector = QformerConnector(d_model=32, n_heads=2, n_layers=1, prompt_size=6, n_taps=3, llm_hidden_size=16).eval()
    taps = [torch.randn(1, 40, 32) for _ in range(3)]
    chosen = torch.tensor([0, 1, 2, 2, 1, 0])  # query p takes (almost) all its weight from tap chosen[p]
    with torch.no_grad():
        connector.layer_weights.copy_(torch.nn.functional.one_hot(chosen, 3) * 60.0)
        out = connector(taps)
        expected = torch.stack([connector.query(int(j), taps[int(j)])[0, p] for p, j in enumerate(chosen)])
    assert (out[0] - connector.proj(expected)).abs().max() <= 1e-5


def test_tap_conventions_select_hf_hidden_states_or_raw_layer_outputs():
    hf_model, processor = tiny_model("desta2")
    encoder = hf_model.whisper.model.encoder
    features = processor.features(tone(1.0))
    with torch.no_grad():
        hidden = encoder(features, output_hidden_states=True).hidden_states  # 5 states, the last layer-normed
        hf_model.settings = replace(hf_model.settings, target_layer_ids=(1, 4), tap_convention="hidden_states")
        released = hf_model.encoder_taps(features)
        hf_model.settings = replace(hf_model.settings, target_layer_ids=(0, 3), tap_convention="layer_loop")
        trained = hf_model.encoder_taps(features)
    assert (released[0] - hidden[1]).abs().max() <= 1e-6 and (released[1] - hidden[4]).abs().max() <= 1e-6
    assert (trained[0] - hidden[1]).abs().max() <= 1e-6
    assert (encoder.layer_norm(trained[1]) - hidden[4]).abs().max() <= 1e-5  # raw output of the last layer
    assert (trained[1] - hidden[4]).abs().max() > 1e-2
    # The tiny model's taps [0, 1, 2, 3] under the other convention: other states feed the connector.
    with torch.no_grad():
        hf_model.settings = replace(hf_model.settings, target_layer_ids=(0, 1, 2, 3), tap_convention="layer_loop")
        loop_rows = hf_model.connector_rows(features)
        hf_model.settings = replace(hf_model.settings, tap_convention="hidden_states")
        tuple_rows = hf_model.connector_rows(features)
    assert (loop_rows - tuple_rows).abs().max() > 1e-3
    hf_model.settings = replace(hf_model.settings, target_layer_ids=(0, 4), tap_convention="layer_loop")
    with pytest.raises(ValueError, match=r"\[4\] out of range 0\.\.3 for a 4-layer Whisper encoder"):
        hf_model.encoder_taps(features)


# -- release checkpoint layouts ------------------------------------------------------------------------------------


def snapshot(cache, repo_id):
    """A Hugging Face cache entry for `repo_id`: files written into the returned folder resolve by id."""
    commit = hashlib.sha1(repo_id.encode()).hexdigest()
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    folder = repo / "snapshots" / commit
    folder.mkdir(parents=True)
    return folder


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    import huggingface_hub.constants

    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return cache


def save_whisper_and_llm(hf_model, processor, whisper_dir, llm_dir):
    hf_model.whisper.save_pretrained(whisper_dir)
    processor.whisper.save_pretrained(whisper_dir)
    hf_model.llm.save_pretrained(llm_dir)
    processor.tokenizer.save_pretrained(llm_dir)


def write_desta2_release(hf_model, folder):
    """DeSTA2's layout: config.json naming Whisper and Llama by id, and `qformer_connector.pth`."""
    config = {"architectures": ["DestaModel"], "model_type": "DestaModel", "llama_model_id":
              "meta-llama/Meta-Llama-3-8B-Instruct", "whisper_model_id": "openai/whisper-small",
              "prompt_size": hf_model.settings.prompt_size, "target_layer_ids": list(hf_model.settings.target_layer_ids)}
    (folder / "config.json").write_text(json.dumps(config))
    torch.save(hf_model.connector.state_dict(), folder / "qformer_connector.pth")


def write_desta25_release(hf_model, folder):
    """DeSTA2.5's layout: config.json with the ids and Q-Former depth, `model.safetensors` with `perception.connector.*`."""
    config = {"architectures": ["DeSTA25AudioModel"], "model_type": "desta25", "llm_model_id":
              "DeSTA-ntu/Llama-3.1-8B-Instruct", "encoder_model_id": "openai/whisper-large-v3",
              "connector_mode": "qformer_1", "qformer_num_hidden_layers": len(hf_model.connector.qformer.layer),
              "prompt_size": hf_model.settings.prompt_size, "use_lora": False, "audio_locator": "<|AUDIO|>",
              "placeholder_token": "<|reserved_special_token_87|>",
              "target_layer_ids": list(hf_model.settings.target_layer_ids)}
    (folder / "config.json").write_text(json.dumps(config))
    state = {f"perception.connector.{k}": v.contiguous() for k, v in hf_model.connector.state_dict().items()}
    save_file(state, folder / "model.safetensors")


def local_release(tmp_path, port, **overrides):
    """A tiny model saved as a release directory, with Whisper and the LLM in local directories beside it."""
    hf_model, processor = tiny_model(port, **overrides)
    folder, whisper_dir, llm_dir = tmp_path / "release", tmp_path / "whisper", tmp_path / "llm"
    folder.mkdir()
    save_whisper_and_llm(hf_model, processor, whisper_dir, llm_dir)
    (write_desta2_release if port == "desta2" else write_desta25_release)(hf_model, folder)
    return hf_model, folder, dict(whisper=str(whisper_dir), llm=str(llm_dir))


def test_desta2_release_layout_loads_by_hub_id_with_the_same_logits(hub_cache):
    hf_model, processor = tiny_model("desta2")
    save_whisper_and_llm(hf_model, processor, snapshot(hub_cache, "openai/whisper-small"),
                         snapshot(hub_cache, "meta-llama/Meta-Llama-3-8B-Instruct"))
    write_desta2_release(hf_model, snapshot(hub_cache, "DeSTA-ntu/DeSTA2-8B-beta"))
    loaded = act.HookedLALM.from_pretrained("DeSTA-ntu/DeSTA2-8B-beta")
    assert loaded.port.name == "desta2"
    inp = loaded.prepare(tone(1.0), GENDER_PROMPT, GENDER_PREFIX, transcript=TRANSCRIPT)
    with torch.no_grad():
        assert (loaded(inp) - Desta2Port().hf_logits(hf_model, inp)).abs().max() <= 1e-6


def test_desta25_release_directory_loads_with_local_whisper_and_llm_overrides(hub_cache, tmp_path):
    hf_model, folder, overrides = local_release(tmp_path, "desta2.5")
    with pytest.raises(CheckpointError, match=r"(?s)cannot load the Whisper model 'openai/whisper-large-v3'.*whisper=<local directory>"):
        act.HookedLALM.from_pretrained(str(folder))  # the ids of config.json are not in the (empty) hub cache
    loaded = act.HookedLALM.from_pretrained(str(folder), port=Desta25Port(**overrides))
    assert len(loaded.hf_model.connector.qformer.layer) == 6
    inp = loaded.prepare(tone(1.0), GENDER_PROMPT, GENDER_PREFIX, transcript="Thank you.")
    with torch.no_grad():
        assert (loaded(inp) - Desta25Port().hf_logits(hf_model, inp)).abs().max() <= 1e-6


def test_desta2_missing_connector_file_or_key_is_named(tmp_path):
    _, folder, overrides = local_release(tmp_path, "desta2", prompt_size=4)
    state = torch.load(folder / "qformer_connector.pth")
    del state["layer_weights"]
    torch.save(state, folder / "qformer_connector.pth")
    with pytest.raises(CheckpointError, match=r"qformer_connector\.pth: connector keys .* missing \['layer_weights'\]"):
        act.HookedLALM.from_pretrained(str(folder), port=Desta2Port(**overrides))
    (folder / "qformer_connector.pth").unlink()
    with pytest.raises(CheckpointError, match=r"release: no qformer_connector\.pth in this directory"):
        act.HookedLALM.from_pretrained(str(folder), port=Desta2Port(**overrides))


def test_desta25_connector_depth_mismatch_names_the_missing_keys(tmp_path):
    _, folder, overrides = local_release(tmp_path, "desta2.5", prompt_size=4, qformer_layers=1)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "qformer_num_hidden_layers": 2}))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: connector keys .* missing \['qformer\.layer\.1\."):
        act.HookedLALM.from_pretrained(str(folder), port=Desta25Port(**overrides))


def test_release_configs_are_recognised_by_their_own_port_only():
    desta2 = {"architectures": ["DestaModel"], "model_type": "DestaModel", "llama_model_id": "x", "whisper_model_id": "y"}
    desta25 = {"architectures": ["DeSTA25AudioModel"], "model_type": "desta25", "llm_model_id": "x", "encoder_model_id": "y"}
    keys_only = {"llama_model_id": "x", "whisper_model_id": "y", "prompt_size": 64}
    assert [Desta2Port().matches(c) for c in (desta2, desta25, keys_only)] == [True, False, True]
    assert [Desta25Port().matches(c) for c in (desta2, desta25, keys_only)] == [False, True, False]
    assert not get_port("qwen2-audio").matches(desta2) and not get_port("qwen2-audio").matches(desta25)
