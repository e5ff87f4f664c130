"""Tiny models built offline, and the port conformance kit.

`tiny_model(port)` gives a random-weight model and a working processor for any port, without a download: the
tokenizer is a small byte-level BPE trained in code on the AudioLens prompts, with the model's special tokens.

The conformance kit states what every port (built-in or third-party) must satisfy; a port's tests call
`check_port(port_name, hf_model, processor, waves)`, or the single checks:

- `check_logits_match`: `HookedLALM` logits equal the original model's own forward (fp32 max |diff| <= 1e-5);
- `check_embed_is_resid_pre`: `hook_embed` equals `blocks.0.hook_resid_pre` at every position, audio rows included;
- `check_patch_is_causal`: patching position p at layer l leaves every earlier position unchanged;
- `check_tl_patching`: `transformer_lens.patching.get_act_patch_resid_pre` through `HookedLALM` equals a plain
  patching loop on the original model (forward pre-hook on decoder layer l replacing position p).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from typing import Any

import numpy as np
import torch
from torch import nn

from audiolens_ct.inputs import LALMInput
from audiolens_ct.model import HookedLALM
from audiolens_ct.ports import get_port

ATOL = 1e-5

_PROMPT_WORDS = """
What animal makes the sound? Possible options: dog, cat, pig, cow, frog, hen, rooster, sheep, crow.
What is the emotion of the speaker in the speech? Possible options: angry, disgust, fear, happy, sad.
What is the gender of the speaker in the speech? Possible options: male, female.
What is the language spoken in the speech? Possible options: English, German, Spanish, French, Italian, Chinese,
Japanese, Korean. The sound file's animal is The speaker's emotion is The speaker's gender is
The speech's spoken language is You are a helpful assistant. system user assistant Audio 1: Focus on the audio
clips and instructions. Describe this audio. Thank you for calling. Goodbye. Cutting Knowledge Date: December 2023
Today Date: 26 Jul 2024 transcribe the speech hello world the a an of in to and is it that this
"""
_OPTION_WORDS = (
    "dog cat pig cow frog hen rooster sheep crow angry disgust fear happy sad male female "
    "English German Spanish French Italian Chinese Japanese Korean"
).split()


@cache
def _trained_bpe(special_tokens: tuple[str, ...], vocab_size: int) -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # Every option is seen often with and without a leading space, so each becomes one token both ways.
    corpus = [_PROMPT_WORDS] * 20 + [f" {w}" for w in _OPTION_WORDS for _ in range(50)] + _OPTION_WORDS * 50
    tok.train_from_iterator(corpus, trainer=trainer)
    return tok.to_str()


def tiny_bpe_tokenizer(
    special_tokens: Sequence[str], vocab_size: int = 600, **special_roles: str
) -> Any:
    """A small byte-level BPE tokenizer trained in code, with `special_tokens` as single ids.

    `special_roles` names roles such as `eos_token="<|endoftext|>"`, `pad_token=...`, `bos_token=...`.
    """
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer.from_str(_trained_bpe(tuple(special_tokens), vocab_size))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, **special_roles)
    tokenizer.add_special_tokens({"additional_special_tokens": [t for t in special_tokens]})
    return tokenizer


def tiny_model(port: str, seed: int = 0, **config_overrides: Any) -> tuple[nn.Module, Any]:
    """A random-weight `(hf_model, processor)` for `port`, built offline. Overrides go to the model config."""
    torch.manual_seed(seed)
    return get_port(port).tiny(**config_overrides)


def tone(seconds: float, freq: float = 220.0, rate: int = 16000, seed: int = 0) -> np.ndarray:
    """A test clip: a tone with a little noise, float32 mono."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * rate)) / rate
    return (0.3 * np.sin(2 * np.pi * freq * t) + 0.05 * rng.standard_normal(t.shape)).astype(np.float32)


# -- the conformance kit ------------------------------------------------------------------------------------------


@dataclass
class ConformanceReport:
    logits_max_diff: float
    embed_resid_max_diff: float
    causal_max_diff_before: float
    tl_patching_max_diff: float


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def check_logits_match(model: HookedLALM, reference: nn.Module, inp: LALMInput, atol: float = ATOL) -> float:
    """`model(inp)` vs the untouched original model's own forward on the same inputs."""
    with torch.no_grad():
        ours = model(inp)
        theirs = model.port.hf_logits(reference, inp)
    diff = _max_diff(ours, theirs)
    assert diff <= atol, f"{model.port.name}: HookedLALM logits differ from the original forward by {diff:.3g}"
    return diff


def check_embed_is_resid_pre(model: HookedLALM, inp: LALMInput, atol: float = ATOL) -> float:
    """`hook_embed` equals `blocks.0.hook_resid_pre` everywhere, and the audio rows hold the audio embeddings."""
    with torch.no_grad():
        _, cache_ = model.run_with_cache(inp, names_filter=["hook_embed", "blocks.0.hook_resid_pre", "audio.hook_embeds"])
    diff = _max_diff(cache_["hook_embed"], cache_["blocks.0.hook_resid_pre"])
    assert diff <= atol, f"hook_embed != blocks.0.hook_resid_pre (max diff {diff:.3g})"
    audio_rows = cache_["hook_embed"][inp.audio_mask]
    expected = cache_["audio.hook_embeds"].reshape(-1, audio_rows.shape[-1])
    audio_diff = _max_diff(audio_rows, expected)
    assert audio_diff <= atol, f"audio rows of hook_embed differ from audio.hook_embeds by {audio_diff:.3g}"
    return diff


def check_patch_is_causal(model: HookedLALM, clean: LALMInput, corrupted: LALMInput, atol: float = ATOL) -> float:
    """Patching the clean residual at (layer, p) changes nothing before p, and changes the last position."""
    layer, p = model.cfg.n_layers // 2, clean.text_positions[len(clean.text_positions) // 2]
    with torch.no_grad():
        _, clean_cache = model.run_with_cache(clean, names_filter=f"blocks.{layer}.hook_resid_pre")
        base = model(corrupted)

        def patch(x: torch.Tensor, hook: Any) -> torch.Tensor:
            x = x.clone()
            x[:, p] = clean_cache[f"blocks.{layer}.hook_resid_pre"][:, p]
            return x

        patched = model.run_with_hooks(corrupted, fwd_hooks=[(f"blocks.{layer}.hook_resid_pre", patch)])
    before = _max_diff(patched[:, :p], base[:, :p])
    assert before <= atol, f"a patch at position {p} changed earlier logits by {before:.3g}"
    assert _max_diff(patched[:, p:], base[:, p:]) > 0, f"a patch at position {p} changed nothing after it"
    return before


def hf_patch_loop(
    port_name: str, reference: nn.Module, clean: LALMInput, corrupted: LALMInput, layers: Sequence[int],
    positions: Sequence[int], metric: Any,
) -> torch.Tensor:
    """The plain-HF oracle: a forward pre-hook on decoder layer l replaces position p with the clean value."""
    port = get_port(port_name)
    decoder_layers = port.decoder_layers(reference)
    captured: dict[int, torch.Tensor] = {}

    def hidden_of(args: tuple, kwargs: dict) -> torch.Tensor:
        return args[0] if args else kwargs["hidden_states"]

    def capture(layer: int):
        def hook(module, args, kwargs):
            captured[layer] = hidden_of(args, kwargs).detach().clone()

        return hook

    handles = [decoder_layers[lay].register_forward_pre_hook(capture(lay), with_kwargs=True) for lay in layers]
    with torch.no_grad():
        port.hf_logits(reference, clean)
    for h in handles:
        h.remove()

    out = torch.zeros(len(layers), len(positions))
    for i, lay in enumerate(layers):
        for j, p in enumerate(positions):

            def replace(module, args, kwargs, lay=lay, p=p):
                hidden = hidden_of(args, kwargs).clone()
                hidden[:, p] = captured[lay][:, p]
                if args:
                    return (hidden, *args[1:]), kwargs
                return args, {**kwargs, "hidden_states": hidden}

            handle = decoder_layers[lay].register_forward_pre_hook(replace, with_kwargs=True)
            with torch.no_grad():
                out[i, j] = metric(port.hf_logits(reference, corrupted))
            handle.remove()
    return out


def check_tl_patching(
    model: HookedLALM, reference: nn.Module, clean: LALMInput, corrupted: LALMInput, atol: float = ATOL
) -> float:
    """`get_act_patch_resid_pre` on `HookedLALM` equals the plain HF patching loop on the original model."""
    from transformer_lens import patching

    target = int(clean.tokens[0, -1])

    def metric(logits: torch.Tensor) -> torch.Tensor:
        return logits[:, -1].log_softmax(-1)[:, target].mean()

    with torch.no_grad():
        _, clean_cache = model.run_with_cache(clean)
        grid = patching.get_act_patch_resid_pre(model, corrupted, clean_cache, metric)
    positions = list(range(corrupted.shape[-1]))
    oracle = hf_patch_loop(model.port.name, reference, clean, corrupted, range(model.cfg.n_layers), positions, metric)
    diff = _max_diff(grid.cpu(), oracle)
    assert diff <= atol, f"TL patching grid differs from the HF patching loop by {diff:.3g}"
    return diff


def check_port(
    port_name: str, hf_model: nn.Module, processor: Any, waves: Sequence[np.ndarray], prompt: str = "What is the gender "
    "of the speaker in the speech? Possible options: male, female.", response_prefix: str = "The speaker's gender is",
    options: Sequence[str] = ("male", "female"), tl_patching: bool = True, **prepare_kwargs: Any,
) -> ConformanceReport:
    """Run every conformance check for one port on the given clips (the first is also silenced for patching)."""
    reference = copy.deepcopy(hf_model).eval()
    model = HookedLALM.from_hf(hf_model, processor, port=port_name)
    inputs = [model.prepare(w, prompt, response_prefix, options=options, **prepare_kwargs) for w in waves]
    logits_diff = max(check_logits_match(model, reference, inp) for inp in inputs)
    embed_diff = max(check_embed_is_resid_pre(model, inp) for inp in inputs)
    clean = inputs[0]
    corrupted = model.prepare_like(clean, np.zeros_like(waves[0]))
    causal = check_patch_is_causal(model, clean, corrupted)
    tl_diff = check_tl_patching(model, reference, clean, corrupted) if tl_patching else float("nan")
    return ConformanceReport(logits_diff, embed_diff, causal, tl_diff)
