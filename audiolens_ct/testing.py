"""Tiny models built offline, and the port conformance kit.

`tiny_model(port)` gives a random-weight model and a working processor for any port, without a download (the port's
`tiny()`, built from `model_ports._tiny`: a small byte-level BPE tokenizer trained in code, random weights).

The conformance kit states what every port (built-in or third-party) must satisfy; `tests/test_conformance.py` runs
`check_port(port_name, hf_model, processor, waves)` on every port's `tiny_variants`. Each check raises an
`AssertionError` naming what differs, and returns the measured difference for reporting:

- `check_logits_match`: `HookedLALM` logits equal the original model's own forward (fp32 max |diff| <= 1e-5);
- `check_embed_is_resid_pre`: `hook_embed` equals `blocks.0.hook_resid_pre` at every position, audio rows included;
- `check_patch_is_causal`: patching position p at layer l leaves every earlier position unchanged;
- `check_tl_patching`: `transformer_lens.patching.get_act_patch_resid_pre` through `HookedLALM` equals a plain
  patching loop on the original model (forward pre-hook on decoder layer l replacing position p);
- `check_fast_engine`: the fast tracing engine runs the port's backbone (the requirements on `Port.backbone`) and
  gives the reference engine's numbers.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
from jaxtyping import Float, Int
from torch import nn
from transformers import GenerationMixin

from audiolens_ct.data.prompts import TRACKS
from audiolens_ct.inputs import LALMInput
from audiolens_ct.model import HookedLALM
from audiolens_ct.ports import Port, get_port
from model_ports._tiny import tiny_bpe_tokenizer

__all__ = [
    "ATOL",
    "ConformanceReport",
    "check_embed_is_resid_pre",
    "check_fast_engine",
    "check_logits_match",
    "check_patch_is_causal",
    "check_port",
    "check_tl_patching",
    "decoder_layers",
    "hf_greedy",
    "hf_patch_loop",
    "tiny_bpe_tokenizer",
    "tiny_model",
    "tone",
]

ATOL = 1e-5
GENDER = TRACKS["gender"]


def tiny_model(port: str, seed: int = 0, **config_overrides: Any) -> tuple[nn.Module, Any]:
    """A random-weight `(hf_model, processor)` for `port`, built offline. Overrides go to the model config."""
    torch.manual_seed(seed)
    return get_port(port).tiny(**config_overrides)


def tone(seconds: float, freq: float = 220.0, rate: int = 16000, seed: int = 0) -> Float[np.ndarray, " samples"]:
    """A test clip: a tone with a little noise, float32 mono."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * rate)) / rate
    return (0.3 * np.sin(2 * np.pi * freq * t) + 0.05 * rng.standard_normal(t.shape)).astype(np.float32)


# -- the conformance kit ------------------------------------------------------------------------------------------


@dataclass
class ConformanceReport:
    """The largest difference each check measured (NaN: the check was not run)."""

    logits_max_diff: float
    embed_resid_max_diff: float
    causal_max_diff_before: float
    tl_patching_max_diff: float
    fast_engine_max_diff: float = float("nan")


def decoder_layers(port: Port, hf_model: nn.Module) -> nn.ModuleList:
    """The text decoder's layers of `hf_model`, found through the port's backbone shell (for plain-HF loops)."""
    return port.backbone(hf_model).causal_lm.model.layers


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
    layers_of = decoder_layers(port, reference)
    captured: dict[int, torch.Tensor] = {}

    def hidden_of(args: tuple, kwargs: dict) -> torch.Tensor:
        return args[0] if args else kwargs["hidden_states"]

    def capture(layer: int):
        def hook(module, args, kwargs):
            captured[layer] = hidden_of(args, kwargs).detach().clone()

        return hook

    handles = [layers_of[lay].register_forward_pre_hook(capture(lay), with_kwargs=True) for lay in layers]
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

            handle = layers_of[lay].register_forward_pre_hook(replace, with_kwargs=True)
            with torch.no_grad():
                out[i, j] = metric(port.hf_logits(reference, corrupted))
            handle.remove()
    return out


class _Recorded(Exception):
    """Raised by `_ForwardRecorder` once it has the arguments of the call."""


class _ForwardRecorder:
    """Stands in for a model and records the arguments it is called with (then stops the caller)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.args: tuple = ()
        self.kwargs: dict[str, Any] = {}

    def __getattr__(self, name: str) -> Any:
        return getattr(self.model, name)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.args, self.kwargs = args, kwargs
        raise _Recorded


def hf_greedy(
    port_name: str, reference: nn.Module, inp: LALMInput, max_new_tokens: int, eos_token_id: int | None = None
) -> Int[torch.Tensor, "batch new"]:
    """The untouched original model's greedy continuation of `inp`, the oracle of `HookedLALM.generate`.

    A model with transformers' `generate` (a native audio class) runs it, with its own key/value cache, on the
    arguments the port's forward oracle (`Port.hf_logits`) passes to the model. Any other model (a port's
    re-implementation) is continued by a greedy loop over `Port.hf_logits` that recomputes the whole sequence each
    step, without a cache. Rows end at `eos_token_id` (None: never) and are padded with it afterwards.
    """
    port = get_port(port_name)
    if isinstance(reference, GenerationMixin):
        recorder = _ForwardRecorder(reference)
        try:
            port.hf_logits(recorder, inp)
        except _Recorded:
            pass
        with torch.no_grad():
            out = reference.generate(*recorder.args, **recorder.kwargs, max_new_tokens=max_new_tokens,
                                     min_new_tokens=0, do_sample=False, eos_token_id=eos_token_id,
                                     pad_token_id=eos_token_id)  # fmt: skip
        return out[:, inp.tokens.shape[1] :]
    new: list[torch.Tensor] = []
    done = torch.zeros(len(inp), dtype=torch.bool)
    for _ in range(max_new_tokens):
        with torch.no_grad():
            token = port.hf_logits(reference, inp)[:, -1].argmax(-1)
        if eos_token_id is not None:
            token = torch.where(done, torch.full_like(token, eos_token_id), token)
            done |= token == eos_token_id
        new.append(token)
        grown = torch.cat([inp.tokens, token[:, None].to(inp.tokens.dtype)], dim=1)
        inp = replace(inp, tokens=grown, audio_mask=torch.cat([inp.audio_mask, torch.zeros_like(token[:, None], dtype=torch.bool)], dim=1),
                      _audio_embeds_cache={})  # fmt: skip
        if bool(done.all()):
            break
    return torch.stack(new, dim=1)


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


def check_fast_engine(
    model: HookedLALM, wave: Float[np.ndarray, " samples"] | None = None, prompt: str = GENDER.prompt,
    response_prefix: str = GENDER.response_prefix, options: Sequence[str] = GENDER.labels, atol: float = 1e-6,
    **prepare_kwargs: Any,
) -> float:
    """The fast engine runs the port's backbone (`Port.backbone`'s requirements) and its layer- and token-wise
    patched probabilities equal the TransformerLens reference engine's on one clip (default: a 0.5-s tone)."""
    from audiolens_ct.tracing import trace
    from audiolens_ct.tracing.decoder import plain_decoder

    plain_decoder(model)  # the backbone's own layers, unwrapped from the bridge: fails here on a foreign layout
    wave = tone(0.5, rate=model.port.sampling_rate) if wave is None else wave
    common = dict(target=options[0], options=list(options), trace_excluded=True, audit=False, port_kwargs=prepare_kwargs)
    fast = trace(model, wave, prompt, response_prefix, engine="fast", **common)
    reference = trace(model, wave, prompt, response_prefix, engine="transformer_lens", **common)
    diff = max(float(np.abs(fast.p_layer - reference.p_layer).max()), float(np.abs(fast.p_token - reference.p_token).max()))
    assert diff <= atol, f"{model.port.name}: the fast engine's patched probabilities differ from the reference by {diff:.3g}"
    return diff


def check_port(
    port_name: str, hf_model: nn.Module, processor: Any, waves: Sequence[np.ndarray], prompt: str = GENDER.prompt,
    response_prefix: str = GENDER.response_prefix, options: Sequence[str] = GENDER.labels, tl_patching: bool = True,
    fast_engine: bool = False, **prepare_kwargs: Any,
) -> ConformanceReport:
    """Run the conformance checks for one port on the given clips (the first is also silenced for the patching
    checks). `tl_patching` and `fast_engine` add the two patching checks, which cost one forward per patch."""
    reference = copy.deepcopy(hf_model).eval()
    model = HookedLALM.from_hf(hf_model, processor, port=port_name)
    inputs = [model.prepare(w, prompt, response_prefix, options=options, **prepare_kwargs) for w in waves]
    logits_diff = max(check_logits_match(model, reference, inp) for inp in inputs)
    embed_diff = max(check_embed_is_resid_pre(model, inp) for inp in inputs)
    clean = inputs[0]
    corrupted = model.prepare_like(clean, np.zeros_like(waves[0]))
    causal = check_patch_is_causal(model, clean, corrupted)
    tl_diff = check_tl_patching(model, reference, clean, corrupted) if tl_patching else float("nan")
    fast_diff = (
        check_fast_engine(model, waves[0], prompt, response_prefix, options, **prepare_kwargs)
        if fast_engine else float("nan")
    )  # fmt: skip
    return ConformanceReport(logits_diff, embed_diff, causal, tl_diff, fast_diff)
