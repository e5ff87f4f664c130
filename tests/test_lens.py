"""The logit lens: the original model's own final norm and unembedding on its own layer outputs, on every port; the
last layer is the model's output; the attribute-mentioning position; the critical layer; a data set's lens."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _tiny_ports import GENDER, tiny

from audiolens_ct.errors import InputError
from audiolens_ct.lens import (
    REVERSED_PREFIXES,
    attribute_position,
    critical_layer,
    lens_distribution,
    lens_over_samples,
    logit_lens,
)
from audiolens_ct.ports import available_ports
from audiolens_ct.testing import decoder_layers
from audiolens_ct.tracing.scoring import answer_tokens

ATOL = 1e-6


def original_lens(model, reference, inp, position: int) -> torch.Tensor:
    """softmax(lm_head(norm(h_l))) on the untouched original: its decoder layers' outputs captured during its own
    forward, then its own final norm and `lm_head`, `[n_layers, vocab]`."""
    backbone = model.port.backbone(reference).causal_lm
    outputs: list[torch.Tensor] = []

    def keep(module, args, out):
        outputs.append((out[0] if isinstance(out, tuple) else out)[0, position].detach())

    handles = [layer.register_forward_hook(keep) for layer in decoder_layers(model.port, reference)]
    try:
        with torch.no_grad():
            model.port.hf_logits(reference, inp)
            return backbone.lm_head(backbone.model.norm(torch.stack(outputs))).float().softmax(-1)
    finally:
        for handle in handles:
            handle.remove()


@pytest.mark.parametrize("port", available_ports())
def test_lens_is_the_originals_final_norm_and_unembedding_on_each_layer_and_its_output_at_the_last(port):
    model, reference, inp = tiny(port)
    options = list(GENDER.labels)
    ids = list(answer_tokens(model.tokenizer, options).values())
    position = inp.shape[1] - 3  # not the last: the lens reads any position
    lens = logit_lens(model, inp, options, position)[0]
    assert lens.shape == (model.cfg.n_layers, len(options))
    theirs = original_lens(model, reference, inp, position)[:, ids]
    assert (lens - theirs).abs().max() <= ATOL
    with torch.no_grad():
        _, cache = model.run_with_cache(inp, names_filter=lambda name: name.endswith("hook_resid_post"))
    manual = torch.stack([model.unembed(model.ln_final(cache[f"blocks.{layer}.hook_resid_post"][0, position]))
                          for layer in range(model.cfg.n_layers)]).float().softmax(-1)[:, ids]  # fmt: skip
    assert (lens - manual).abs().max() <= ATOL
    last = logit_lens(model, inp, options)[0, -1]
    with torch.no_grad():
        own = model(inp)[0, -1].float().softmax(-1)[ids]
        original = model.port.hf_logits(reference, inp)[0, -1].float().softmax(-1)[ids]
    assert (last - own).abs().max() <= ATOL and (last - original).abs().max() <= ATOL


def test_lens_distribution_sums_to_one_over_the_vocabulary():
    model, _, inp = tiny("qwen2-audio")
    with torch.no_grad():
        _, cache = model.run_with_cache(inp, names_filter="blocks.1.hook_resid_post")
    dist = lens_distribution(model, cache["blocks.1.hook_resid_post"])
    assert dist.shape == (*inp.shape, model.cfg.d_vocab)
    assert torch.allclose(dist.sum(-1), torch.ones(inp.shape), atol=1e-5)


def test_attribute_position_is_the_attribute_word_of_the_reversed_prefix():
    model, _, _ = tiny("qwen2-audio")
    inp = model.prepare(np.zeros(8000, dtype=np.float32), GENDER.prompt, REVERSED_PREFIXES["gender"])
    position = attribute_position(model, inp, "gender")
    tokens = model.to_str_tokens(inp)
    assert position > inp.first_text_after_audio and "gender" not in "".join(tokens[position + 1 :])
    assert "gender" in "".join(tokens[inp.first_text_after_audio : position + 1])[-8:]
    assert "".join(tokens[position + 1 :]) == " of the speaker"
    with pytest.raises(InputError, match="'timbre' does not occur"):
        attribute_position(model, inp, "timbre")


def test_critical_layer_is_the_first_layer_where_the_correct_option_leads():
    probs = np.array([[0.5, 0.2], [0.3, 0.4], [0.6, 0.1], [0.2, 0.7]])
    assert critical_layer(probs, ["male", "female"], "female") == 1
    assert critical_layer(probs, ["male", "female"], "male") == 0
    assert critical_layer(np.array([[0.3, 0.3], [0.1, 0.2]]), ["a", "b"], "b") == 1  # a tie goes to the first listed
    assert critical_layer(probs[[0, 2]], ["male", "female"], "female") is None


def test_a_data_sets_lens_reads_every_clip_clean_and_silent_and_records_unreadable_ones(demo_model, demo_samples):
    out = lens_over_samples(demo_model, demo_samples, progress=False)
    assert [r["sample_id"] for r in out["samples"] if "error" in r] == ["missing.wav"]
    gender = out["attributes"]["gender"]
    assert gender["counts"] == {"samples": 5, "read": 4, "errors": 1}
    n_layers = demo_model.cfg.n_layers
    for kind in ("last", "attribute"):
        for audio in ("clean", "silent"):
            summary = gender["positions"][kind][audio]
            assert summary["n"] == 4 and len(summary["correct"]["mean"]) == n_layers
            assert set(summary["per_option"]) == {"male", "female"}
    read = [r for r in out["samples"] if "lens" in r]
    clean = [np.asarray(r["lens"]["last"]["clean"]["probs"]) for r in read]
    # the last layer's lens is the model's answer: its accuracy is the clean run's option accuracy
    expected = np.mean([grid[-1].argmax() == r["options"].index(r["label"]) for grid, r in zip(clean, read, strict=True)])
    assert gender["positions"]["last"]["clean"]["accuracy"] == expected == 1.0
    assert gender["positions"]["last"]["silent"]["accuracy"] == 0.5, "silence answers one fixed option"
