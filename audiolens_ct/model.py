"""`HookedLALM`: an audio language model behind the TransformerLens API.

The LLM backbone is wrapped in a TransformerLens 4 `TransformerBridge` (same hook names as `HookedTransformer`:
`hook_embed`, `blocks.{l}.hook_resid_pre`, `blocks.{l}.hook_attn_out`, ...). The audio front-end is not bridged:
the port computes the audio embeddings with the model's own audio tower and projector, once per input, and a
permanent hook at `hook_embed` writes them into the audio rows. So `hook_embed` equals `blocks.0.hook_resid_pre`
at every position, audio rows included, and the logits equal the original model's.

    model = HookedLALM.from_pretrained("Qwen/Qwen2-Audio-7B-Instruct")
    inp = model.prepare(wave, "What is the gender of the speaker?", response_prefix="The speaker's gender is",
                        options=["male", "female"])
    logits, cache = model.run_with_cache(inp)
    cache["audio.hook_embeds"], cache["blocks.3.hook_resid_pre"]
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import nn
from transformer_lens.ActivationCache import ActivationCache
from transformer_lens.model_bridge.sources import build_bridge_from_module

from audiolens_ct.audio import as_waveform
from audiolens_ct.errors import CheckpointError, InputError
from audiolens_ct.hub import read_checkpoint_config
from audiolens_ct.inputs import LALMInput, object_span, text_after_audio, text_segments
from audiolens_ct.ports import AudioHooks, Port, get_port, port_for_config

_HOOK_LEVELS = itertools.count(1_000_000)
"""Context levels of the audio hooks added by `HookedLALM.hooks`, so each context removes exactly its own."""

HookList = Sequence[tuple[str | Callable[[str], bool], Callable]]
NamesFilter = str | list[str] | Callable[[str], bool] | None


def _names_predicate(names_filter: NamesFilter) -> Callable[[str], bool]:
    if names_filter is None:
        return lambda name: True
    if isinstance(names_filter, str):
        return lambda name: name == names_filter
    if isinstance(names_filter, (list, tuple, set)):
        wanted = set(names_filter)
        return lambda name: name in wanted
    return names_filter


def available_devices() -> list[str]:
    """The torch devices this installation can run on."""
    found = ["cpu"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        found.append("mps")
    return found


def check_device(device: str | torch.device | None) -> None:
    """Refuse a device this installation cannot use, before anything is loaded (`InputError` naming what is)."""
    if device is None:
        return
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise InputError(f"device {device!r} is not a torch device ({exc}); available here: "
                         f"{', '.join(available_devices())}") from None  # fmt: skip
    available = available_devices()
    usable = parsed.type == "cpu" or (
        f"{parsed.type}:{parsed.index or 0}" in available if parsed.type == "cuda" else parsed.type in available
    )
    if not usable:
        raise InputError(f"device {str(device)!r} is not available to torch {torch.__version__} here; available: "
                         f"{', '.join(available)}")  # fmt: skip


class HookedLALM(nn.Module):
    """An LALM whose text backbone is a TransformerLens `TransformerBridge` and whose audio rows are spliced in.

    Build it with `from_pretrained` (hub id or local directory) or `from_hf` (an in-memory model). Inputs come
    from `prepare`; any TransformerLens entry point (`__call__`, `run_with_cache`, `run_with_hooks`, `hooks`,
    `transformer_lens.patching`) accepts them.
    """

    def __init__(self, hf_model: nn.Module, processor: Any, port: Port, model_name: str = "external") -> None:
        super().__init__()
        self.port = port
        self.processor = processor
        self.model_name = model_name
        self.hf_model = hf_model.eval()
        self.audio = AudioHooks()
        backbone = port.backbone(hf_model)
        self.bridge = build_bridge_from_module(
            backbone.causal_lm,
            backbone.architecture,
            hf_config=backbone.text_config,
            model_name=model_name,
        ).eval()
        self._splice: tuple[torch.Tensor, torch.Tensor] | None = None
        hook_embed = self.bridge.get_hook_point("hook_embed")
        if hook_embed is None:
            raise RuntimeError(f"the bridge for {backbone.architecture} has no hook_embed")
        hook_embed.add_hook(self._splice_audio, dir="fwd", is_permanent=True, prepend=True)
        self.eval()

    # -- construction ------------------------------------------------------------------------------------------------
    @classmethod
    def from_hf(cls, hf_model: nn.Module, processor: Any, port: str | Port, model_name: str = "external") -> HookedLALM:
        """Wrap an in-memory Hugging Face model. The model is shared, not copied (the bridge wraps its layers)."""
        return cls(hf_model, processor, get_port(port), model_name=model_name)

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str,
        port: str | Port | None = None,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> HookedLALM:
        """Load a checkpoint (hub id or local directory) through its port; the port is inferred from config.json."""
        check_device(device)
        config = read_checkpoint_config(str(name_or_path))
        resolved = get_port(port) if port is not None else port_for_config(config, str(name_or_path))
        if port is not None and not resolved.matches(config):
            arch = config.get("architectures") or config.get("model_type")
            raise CheckpointError(
                f"{name_or_path}: architecture {arch!r} does not belong to port {resolved.name!r}"
            )
        hf_model, processor = resolved.load(str(name_or_path), device=device, dtype=dtype)
        return cls(hf_model, processor, resolved, model_name=str(name_or_path))

    # -- TransformerLens surface -------------------------------------------------------------------------------------
    def __getattr__(self, name: str) -> Any:
        """TransformerLens attributes not defined here (`unembed`, `ln_final`, `blocks`, `W_U`, `to_tokens`,
        `reset_hooks`, ...) come from the bridge, so TL tools that read them work on the whole model."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            bridge = self._modules.get("bridge")
            if bridge is None or name.startswith("_"):
                raise
            return getattr(bridge, name)

    @property
    def cfg(self) -> Any:
        return self.bridge.cfg

    @property
    def tokenizer(self) -> Any:
        return self.port.tokenizer(self.processor)

    @property
    def hook_dict(self) -> dict[str, Any]:
        return {**self.audio.hook_points(), **self.bridge.hook_dict}

    def prepare(
        self,
        audio: Any,
        prompt: str,
        response_prefix: str = "",
        options: Sequence[str] | None = None,
        sampling_rate: int | None = None,
        object_text: str | None = None,
        **port_kwargs: Any,
    ) -> LALMInput:
        """Build the model's input for one clip: its prompt format, audio features and audio rows.

        Args:
            audio: a mono waveform (array or tensor) at `sampling_rate`, or a path to an audio file.
            prompt: the user's question.
            response_prefix: written as the start of the assistant turn (e.g. "The speaker's gender is").
            options: the answer options; when given, the text after the audio is split into the paper's segments
                (early prompt / object tokens / late prompt / last token), the object tokens being the option list.
            sampling_rate: the rate of an array `audio` (default: the port's rate; a different rate is an error).
            object_text: the option list as it appears in `prompt`, when it is not `", ".join(options)`.
            port_kwargs: passed to the port (e.g. `transcript=` for DeSTA).
        """
        wave = as_waveform(audio, sampling_rate, self.port.sampling_rate, self.port.name)
        encoded = self.port.encode_prompt(
            self.hf_model, self.processor, wave, prompt, response_prefix, **port_kwargs
        )
        tokens = encoded.tokens
        if not encoded.audio_mask.any():
            raise InputError(f"{self.port.name}: the prompt produced no audio rows")
        str_tokens = [self._decode_each(tokens[0].tolist())]
        inp = LALMInput(
            tokens=tokens,
            audio_features=encoded.audio_features,
            audio_mask=encoded.audio_mask,
            str_tokens=str_tokens,
            port=self.port.name,
            prepare_kwargs=dict(
                prompt=prompt,
                response_prefix=response_prefix,
                options=list(options) if options is not None else None,
                object_text=object_text,
                **port_kwargs,
            ),
            extras=encoded.extras,
        )
        if options is not None:
            inp.segments = self._segments(inp, list(options), object_text)
        return inp

    def prepare_like(self, inp: LALMInput, audio: Any, sampling_rate: int | None = None, **overrides: Any) -> LALMInput:
        """Prepare another clip with the same prompt, prefix and options as `inp` (e.g. its silent twin)."""
        return self.prepare(audio, sampling_rate=sampling_rate, **{**inp.prepare_kwargs, **overrides})

    def _decode_each(self, ids: list[int]) -> list[str]:
        tok = self.tokenizer
        return [tok.decode([i]) for i in ids]

    def _segments(self, inp: LALMInput, options: list[str], object_text: str | None) -> dict[str, list[int]]:
        first = inp.first_text_after_audio
        if first >= inp.shape[1]:
            raise InputError(f"{self.port.name}: the prompt has no text after the audio")
        text, ends = text_after_audio(self.tokenizer, inp)
        return text_segments(ends, first, object_span(text, options, object_text))

    def to_str_tokens(self, x: LALMInput | torch.Tensor | str) -> list[str] | list[list[str]]:
        """Token strings of an input (batch 1 gives a flat list), a token tensor, or a string."""
        if isinstance(x, LALMInput):
            return x.str_tokens[0] if len(x) == 1 else x.str_tokens
        if isinstance(x, str):
            return self._decode_each(self.tokenizer.encode(x, add_special_tokens=False))
        ids = x.tolist()
        return self._decode_each(ids) if x.ndim == 1 else [self._decode_each(r) for r in ids]

    # -- audio ---------------------------------------------------------------------------------------------------------
    def _audio_hooked(self) -> bool:
        return any(hp._forward_hooks for hp in self.audio.hook_points().values())

    def audio_embeddings(self, inp: LALMInput) -> Float[torch.Tensor, "batch n_audio d_model"]:
        """The audio rows for `inp`, computed once and reused.

        They are recomputed (and not kept) when a hook watches the audio path, or when gradients are on, so that
        every backward pass has its own graph through the audio tower.
        """
        if inp.audio_embeds_override is not None:
            return inp.audio_embeds_override
        key = id(self)
        hooked = self._audio_hooked() or torch.is_grad_enabled()
        if not hooked and key in inp._audio_embeds_cache:
            return inp._audio_embeds_cache[key]
        embeds = self.port.audio_embeddings(self.hf_model, inp.audio_features, inp.extras, self.audio)
        expected = int(inp.audio_mask.sum())
        if embeds.shape[0] * embeds.shape[1] != expected:
            raise InputError(
                f"{self.port.name}: the audio tower gave {embeds.shape[0] * embeds.shape[1]} rows but the input has "
                f"{expected} audio positions"
            )
        if not hooked:
            inp._audio_embeds_cache[key] = embeds
        return embeds

    def _splice_audio(self, x: Float[torch.Tensor, "batch pos d_model"], hook: Any) -> torch.Tensor:
        if self._splice is None:
            return x
        mask, embeds = self._splice
        if mask.shape != x.shape[:2]:
            raise InputError(f"audio rows for shape {tuple(mask.shape)} do not fit hook_embed {tuple(x.shape[:2])}")
        out = x.clone()
        out[mask] = embeds.reshape(-1, embeds.shape[-1]).to(x.dtype)
        return out

    @contextmanager
    def spliced(self, inp: LALMInput) -> Iterator[None]:
        """Within this context, any bridge forward writes `inp`'s audio rows at `hook_embed` (what `forward` does);
        for code that drives the bridge's modules directly, as the fast engine does."""
        if not isinstance(inp, LALMInput):
            raise InputError(
                f"HookedLALM needs an LALMInput from model.prepare(...), got {type(inp).__name__}; "
                "use model.bridge for text-only runs"
            )
        embeds = self.audio_embeddings(inp)
        previous = self._splice
        self._splice = (inp.audio_mask.to(embeds.device), embeds)
        try:
            yield
        finally:
            self._splice = previous

    # -- running -------------------------------------------------------------------------------------------------------
    def forward(self, inp: LALMInput, **kwargs: Any) -> Any:
        """Logits `[batch, pos, d_vocab]` (or another bridge `return_type`) for a prepared input."""
        with self.spliced(inp):
            return self.bridge(inp.tokens, **kwargs)

    @contextmanager
    def hooks(self, fwd_hooks: HookList = (), bwd_hooks: HookList = (), reset_hooks_end: bool = True) -> Iterator[HookedLALM]:
        """Temporarily add hooks (bridge names or `audio.*` names, or name predicates), like TransformerLens."""
        audio_points = self.audio.hook_points()
        level = next(_HOOK_LEVELS)
        touched = []

        def split(hook_list: HookList, direction: str) -> list:
            for_bridge = []
            for name, fn in hook_list:
                if isinstance(name, str) and name in audio_points:
                    targets = [audio_points[name]]
                elif isinstance(name, str):
                    targets = []
                else:
                    targets = [hp for audio_name, hp in audio_points.items() if name(audio_name)]
                for hp in targets:
                    hp.add_hook(fn, dir=direction, level=level)
                    touched.append((hp, direction))
                if not (isinstance(name, str) and name in audio_points):
                    for_bridge.append((name, fn))
            return for_bridge

        bridge_fwd, bridge_bwd = split(fwd_hooks, "fwd"), split(bwd_hooks, "bwd")
        try:
            with self.bridge.hooks(fwd_hooks=bridge_fwd, bwd_hooks=bridge_bwd, reset_hooks_end=reset_hooks_end):
                yield self
        finally:
            if reset_hooks_end:
                for hp, direction in touched:
                    hp.remove_hooks(direction, level=level)

    def run_with_hooks(
        self, inp: LALMInput, fwd_hooks: HookList = (), bwd_hooks: HookList = (), **kwargs: Any
    ) -> Any:
        """Run with temporary hooks; hook names as in TransformerLens plus `audio.hook_encoder_out/embeds`."""
        with self.hooks(fwd_hooks=fwd_hooks, bwd_hooks=bwd_hooks):
            return self(inp, **kwargs)

    def run_with_cache(
        self, inp: LALMInput, names_filter: NamesFilter = None, remove_batch_dim: bool = False, **kwargs: Any
    ) -> tuple[Any, ActivationCache]:
        """Run and cache activations: the bridge's hook points plus `audio.hook_encoder_out` and `audio.hook_embeds`."""
        wanted = _names_predicate(names_filter)
        audio_names = self.audio.hook_points()
        audio_cache: dict[str, torch.Tensor] = {}

        def save(tensor: torch.Tensor, hook: Any) -> None:
            audio_cache[hook.name] = tensor[0].detach() if remove_batch_dim else tensor.detach()

        audio_hooks = [(name, save) for name in audio_names if wanted(name)]
        bridge_names = [n for n in self.bridge.hook_dict if n not in audio_names and wanted(n)]
        bridge_filter = None if names_filter is None else (lambda n: n not in audio_names and wanted(n))
        with self.hooks(fwd_hooks=audio_hooks), self.spliced(inp):
            if bridge_names or names_filter is None:
                out, cache = self.bridge.run_with_cache(
                    inp.tokens, names_filter=bridge_filter, remove_batch_dim=remove_batch_dim, **kwargs
                )
                bridge_cache = dict(cache.cache_dict)
            else:
                out, bridge_cache = self.bridge(inp.tokens, **kwargs), {}
        return out, ActivationCache({**audio_cache, **bridge_cache}, self.bridge, has_batch_dim=not remove_batch_dim)

    def hf_logits(self, inp: LALMInput) -> Float[torch.Tensor, "batch pos vocab"]:
        """The original model's own forward on `inp` (the conformance oracle)."""
        with torch.no_grad():
            return self.port.hf_logits(self.hf_model, inp)

    def generate(
        self,
        inp: LALMInput,
        max_new_tokens: int = 32,
        *,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        stop_at_eos: bool = True,
        eos_token_id: int | list[int] | None = None,
        fwd_hooks: HookList = (),
    ) -> Int[torch.Tensor, "batch new"]:
        """Continue `inp` (its audio spliced in) by up to `max_new_tokens` tokens; returns only the new tokens.

        Greedy by default, equal token for token to the original model's own `generate`; `do_sample` draws from
        the softmax after `temperature`, `top_k` and `top_p` (`seed`: repeatable draws). A row ends at an
        end-of-sequence token (`eos_token_id`, default the model's generation config) and is padded after it;
        `stop_at_eos=False` always generates `max_new_tokens`. A key/value cache is used, and `fwd_hooks` (as in
        `run_with_hooks`; also hooks set with `model.hooks(...)`) fire at every step: on the prompt's positions
        first, then on each new position. Hooks on the residual stream, attention/MLP outputs, embedding, final
        norm and unembedding are supported (`audiolens_ct.generation` says why and how).

            new = model.generate(inp, max_new_tokens=20)
            model.tokenizer.decode(new[0])
        """
        from audiolens_ct.generation import chooser, generate_tokens, stop_tokens

        stop, pad = stop_tokens(self, eos_token_id) if stop_at_eos else (set(), None)
        choose = chooser(do_sample, temperature, top_k, top_p, seed)
        return generate_tokens(self, inp, max_new_tokens, choose, stop, pad, fwd_hooks)

    @property
    def n_layers(self) -> int:
        return self.cfg.n_layers

    @property
    def dtype_name(self) -> str:
        """The weights' dtype as it is written in run manifests and records, e.g. "bfloat16"."""
        return str(next(self.hf_model.parameters()).dtype).removeprefix("torch.")
