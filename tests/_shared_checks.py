"""What several test files share: a tiny model beside its untouched original, a batch of two clips, a hub id from
an offline cache, equal JSON trees."""

import copy

import huggingface_hub
import pytest
import torch
from conftest import GENDER, GENDER_PREFIX, GENDER_PROMPT

from audiolens_ct import HookedLALM
from audiolens_ct.inputs import LALMInput
from audiolens_ct.testing import check_embed_is_resid_pre, check_logits_match, tiny_model, tone


def wrapped_with_reference(port: str, seed: int = 0, **overrides) -> tuple[HookedLALM, torch.nn.Module]:
    """A tiny model of `port` wrapped as a `HookedLALM`, and an untouched copy of the original (wrapping changes the
    module tree) to check it against."""
    hf_model, processor = tiny_model(port, seed=seed, **overrides)
    reference = copy.deepcopy(hf_model).eval()
    return HookedLALM.from_hf(hf_model, processor, port=port), reference


def check_batch_of_two(model: HookedLALM, reference: torch.nn.Module, seconds: float) -> None:
    """Two different clips batched: logits equal the original forward's and each clip run alone."""
    options = list(GENDER.labels)
    first = model.prepare(tone(seconds), GENDER_PROMPT, GENDER_PREFIX, options=options)
    second = model.prepare(tone(seconds, freq=440.0, seed=3), GENDER_PROMPT, GENDER_PREFIX, options=options)
    batch = LALMInput.stack([first, second])
    check_logits_match(model, reference, batch)  # each check raises beyond 1e-5
    check_embed_is_resid_pre(model, batch)
    with torch.no_grad():
        together, alone = model(batch), torch.cat([model(first), model(second)])
    assert (together - alone).abs().max().item() <= 1e-5
    assert (alone[0] - alone[1]).abs().max().item() > 1e-3  # the clips differ, so a row mix-up would show


def offline_cache_repo(tmp_path, monkeypatch, hub_id: str, commit: str):
    """The snapshot folder of `hub_id` in a hub cache under `tmp_path` that the hub library reads offline; the
    caller writes the checkpoint's files into it."""
    repo = tmp_path / f"models--{hub_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # conftest sets the variable
    return repo / "snapshots" / commit


def check_loaded_like(loaded: HookedLALM, model: HookedLALM, reference: torch.nn.Module, wave) -> None:
    """A model loaded from a checkpoint prepares the same tokens as `model` and gives the original's logits."""
    inp = loaded.prepare(wave, GENDER_PROMPT, GENDER_PREFIX)
    assert torch.equal(inp.tokens, model.prepare(wave, GENDER_PROMPT, GENDER_PREFIX).tokens)
    with torch.no_grad():
        assert (loaded(inp) - model.port.hf_logits(reference, inp)).abs().max().item() <= 1e-5


def assert_same(a, b, path="run"):
    """Equal JSON trees, numbers to 1e-9."""
    if isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for key in a:
            assert_same(a[key], b[key], f"{path}.{key}")
    elif isinstance(a, list):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, f"{path}[{i}]")
    elif isinstance(a, float):
        assert b == pytest.approx(a, abs=1e-9), path
    else:
        assert a == b, path
