"""Generation: new tokens after a prepared input, with its audio spliced in and a key/value cache this package owns.

`HookedLALM.generate` is the entry point; this module is its loop. The prompt runs once (the prefill, with the
clip's audio rows written at `hook_embed`), then one token per step, each step attending to the keys and values of
every position before it.

Why not the bridge's own `generate`, or Hugging Face's on the wrapped model: the bridge hands a cache to the
decoder layers under the argument name `past_key_values`, which transformers 5.24 renamed to `cache`; the layers
then ignore it (measured: the returned cache holds 0 positions and the next token's logits differ by 0.8 from a
full recompute). So the loop runs the backbone's own decoder layers through `tracing/decoder.py`, the path the
fast tracing engine owns: each layer's attention receives the cache from `GrowingKV` below, never through a
cache argument. The TransformerLens hook points of the residual stream and of the attention / MLP outputs
(`hook_embed`, `blocks.{l}.hook_resid_pre`, `hook_attn_out`, `hook_mlp_out`, `hook_resid_post`, the final norm
and unembedding) fire at every step, on the prompt's positions in the prefill and on the one new position after.
A hook on another block hook point (attention pattern, q/k/v) would not fire, so it is refused by name.
Greedy generation equals the original model's own `generate` token for token (`tests/test_generate.py`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from jaxtyping import Float, Int
from transformers.generation.logits_process import (
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from audiolens_ct.errors import InputError
from audiolens_ct.inputs import LALMInput
from audiolens_ct.tracing.decoder import KV, PlainDecoder, RecordKV, plain_decoder

if TYPE_CHECKING:
    from audiolens_ct.model import HookedLALM, HookList

Choose = Callable[[Int[torch.Tensor, "batch pos"], Float[torch.Tensor, "batch vocab"]], Int[torch.Tensor, " batch"]]
"""Picks each row's next token from the tokens so far and the last position's logits."""


class GrowingKV(RecordKV):
    """Every layer's keys/values of all positions run so far: a pass appends its own and attends to all of them."""

    def extend(self, layer: int, keys: torch.Tensor, values: torch.Tensor) -> KV:
        if layer in self.kv:
            past_k, past_v = self.kv[layer]
            keys, values = torch.cat([past_k, keys], dim=2), torch.cat([past_v, values], dim=2)
        return super().extend(layer, keys, values)

    @property
    def length(self) -> int:
        """Positions held (0 before the prefill)."""
        return next(iter(self.kv.values()))[0].shape[2] if self.kv else 0


def chooser(
    do_sample: bool = False, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
    seed: int | None = None,
) -> Choose:
    """Greedy choice (the most probable token), or sampling from the softmax after transformers' temperature,
    top-k and top-p warpers (`seed` makes the draws repeatable)."""
    if not do_sample:
        return lambda tokens, logits: logits.argmax(-1)
    if not temperature > 0:
        raise InputError(f"temperature must be > 0 when sampling, got {temperature!r}")
    if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
        raise InputError(f"top_k must be an integer >= 1, got {top_k!r}")
    if top_p is not None and not 0 < top_p <= 1:
        raise InputError(f"top_p must be in (0, 1], got {top_p!r}")
    warpers = LogitsProcessorList(
        [TemperatureLogitsWarper(temperature)]
        + ([TopKLogitsWarper(top_k)] if top_k is not None else [])
        + ([TopPLogitsWarper(top_p)] if top_p is not None else [])
    )
    generators: dict[torch.device, torch.Generator] = {}

    def sample(tokens: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        generator = None
        if seed is not None:
            generator = generators.get(logits.device)
            if generator is None:
                generator = generators[logits.device] = torch.Generator(logits.device).manual_seed(seed)
        probs = warpers(tokens, logits.float()).softmax(-1)
        return torch.multinomial(probs, 1, generator=generator)[:, 0]

    return sample


def stop_tokens(model: HookedLALM, eos_token_id: int | list[int] | None = None) -> tuple[set[int], int | None]:
    """The token ids that end a row, and the id written after a row ended: `eos_token_id` when given, else the
    original model's generation config (as its own `generate` reads it), else the tokenizer's end-of-sequence.
    The pad id is the generation config's, else the first end-of-sequence id (as transformers does)."""
    config = getattr(model.hf_model, "generation_config", None)
    if eos_token_id is None:
        eos_token_id = config.eos_token_id if config is not None else getattr(model.tokenizer, "eos_token_id", None)
    ids = [eos_token_id] if isinstance(eos_token_id, int) else [int(i) for i in eos_token_id or ()]
    pad = getattr(config, "pad_token_id", None)
    return set(ids), (ids[0] if pad is None and ids else pad)


def _last_logits(
    model: HookedLALM, decoder: PlainDecoder, tokens: Int[torch.Tensor, "batch pos"], cache: GrowingKV
) -> Float[torch.Tensor, "batch vocab"]:
    """One pass over `tokens` (the positions after those in `cache`), appending their keys/values to it."""
    return decoder.run(model.bridge.embed(tokens), cache.length, cache)[1]


def generate_tokens(
    model: HookedLALM, inp: LALMInput, max_new_tokens: int, choose: Choose, stop: set[int], pad: int | None,
    fwd_hooks: HookList = (),
) -> Int[torch.Tensor, "batch new"]:
    """The loop behind `HookedLALM.generate` (module docstring): a prefill with the audio spliced in, then one
    position a step until `max_new_tokens` or every row has produced a token of `stop` (later ones are `pad`)."""
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise InputError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    decoder = plain_decoder(model)
    tokens = inp.tokens
    new: list[torch.Tensor] = []
    done = torch.zeros(tokens.shape[0], dtype=torch.bool, device=tokens.device)
    stop_ids = torch.tensor(sorted(stop), dtype=tokens.dtype, device=tokens.device)
    cache = GrowingKV()
    with torch.no_grad(), model.hooks(fwd_hooks=fwd_hooks):
        decoder.check_hooks()
        with model.spliced(inp):
            logits = _last_logits(model, decoder, tokens, cache)
        for step in range(max_new_tokens):
            token = choose(tokens, logits).to(tokens.dtype)
            if pad is not None:
                token = torch.where(done, torch.full_like(token, pad), token)
            new.append(token)
            tokens = torch.cat([tokens, token[:, None]], dim=1)
            done |= torch.isin(token, stop_ids)
            if bool(done.all()) or step == max_new_tokens - 1:
                break
            logits = _last_logits(model, decoder, token[:, None], cache)
    return torch.stack(new, dim=1)

