"""The backbone's own decoder layers, run outside the bridge, with a key/value path the fast engine owns.

The fast engine recomputes suffixes of the sequence that attend to a stored prefix of keys and values. It does not
hand that prefix to the layers as a cache argument: how a decoder layer names that argument, and whether the
TransformerLens bridge reads the name, changed between releases (transformers 5.24 renamed `past_key_values` to
`cache`; TransformerLens 4.3 reads only the old name, and the prefix was then silently dropped). Instead:

- Each layer is the model's own Hugging Face decoder layer, unwrapped from the bridge's components (shallow copies
  sharing every parameter), so it runs at plain Hugging Face speed.
- Its attention module calls, through transformers' public `AttentionInterface`, an attention function registered
  here. That function receives the layer's queries, keys and values after the rotary embedding and either records
  the keys/values (the corrupted run) or prepends the stored prefix to them (a suffix pass), then applies causal
  attention offset by the prefix length. The layers are called without any cache argument. Its output, one
  `d_head` vector per query head before the output projection, is TransformerLens's `hook_z`: per-head patches
  (kind "z") are written there.
- The TransformerLens hook points of the four activation kinds (`hook_resid_pre`, `hook_attn_out`,
  `hook_mlp_out`, `hook_resid_post`) are called at the same places as in the bridge, so hooks a user set there fire,
  and the engine's own patches are written right after them. A hook on any other block hook point (attention
  pattern, q/k/v, norms...) would not fire here, so it is refused with a message naming it.
"""

from __future__ import annotations

import copy
import weakref
from collections.abc import Callable
from typing import Any

import torch
from jaxtyping import Float
from torch import nn
from transformer_lens.utilities import get_act_name
from transformers import AttentionInterface

from audiolens_ct.choices import KINDS
from audiolens_ct.errors import PortError, UnsupportedHookError
from audiolens_ct.tracing.patches import HEAD_KIND

ATTENTION_NAME = "audiolens_ct_prefix_kv"
"""The name under which the prefix-aware attention function is registered with transformers."""

Write = Callable[[torch.Tensor], torch.Tensor]
KV = tuple[Float[torch.Tensor, "batch kv_heads pos d_head"], Float[torch.Tensor, "batch kv_heads pos d_head"]]


class RecordKV:
    """Keys/values of one full forward: each layer's are kept, and attention runs on them unchanged."""

    def __init__(self) -> None:
        self.kv: dict[int, KV] = {}

    def extend(self, layer: int, keys: torch.Tensor, values: torch.Tensor) -> KV:
        self.kv[layer] = (keys, values)
        return keys, values


class PrefixKV:
    """A read-only prefix [0, start) of recorded keys/values, prepended to every row's own keys/values.

    The recorded run has `copies` rows (noise copies); a suffix batch holds `rows x copies` rows, copy-minor.
    """

    def __init__(self, kv: dict[int, KV], start: int, copies: int) -> None:
        self.prefix = {layer: (k[:, :, :start], v[:, :, :start]) for layer, (k, v) in kv.items()}
        self.copies = copies

    def extend(self, layer: int, keys: torch.Tensor, values: torch.Tensor) -> KV:
        prefix_k, prefix_v = self.prefix[layer]
        rows = keys.shape[0] // self.copies
        if self.copies == 1:  # a stride-0 view: the concatenation is the only copy
            prefix_k, prefix_v = prefix_k.expand(rows, -1, -1, -1), prefix_v.expand(rows, -1, -1, -1)
        else:
            prefix_k, prefix_v = prefix_k.repeat(rows, 1, 1, 1), prefix_v.repeat(rows, 1, 1, 1)
        return torch.cat([prefix_k, keys], dim=2), torch.cat([prefix_v, values], dim=2)


_UNSUPPORTED_ATTENTION_KWARGS = ("sliding_window", "softcap", "s_aux")


def prefix_attention(
    module: nn.Module,
    query: Float[torch.Tensor, "batch heads q_pos d_head"],
    key: Float[torch.Tensor, "batch kv_heads q_pos d_head"],
    value: Float[torch.Tensor, "batch kv_heads q_pos d_head"],
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[Float[torch.Tensor, "batch q_pos heads d_head"], None]:
    """Causal attention of `query` over the layer's key/value source (`module.kv_source`) plus its own keys.

    Query j of a suffix that starts after a prefix of P positions attends to keys 0..P+j. The arithmetic is the
    bridge's (scores by matmul, softmax in float32), so both engines round alike.
    """
    for name in _UNSUPPORTED_ATTENTION_KWARGS:
        if kwargs.get(name) is not None:
            raise NotImplementedError(f"the fast engine's attention does not implement {name}={kwargs[name]!r}")
    key, value = module.kv_source.extend(module.stack_index, key, value)
    batch, heads, q_len, d_head = query.shape
    kv_heads, kv_len = key.shape[1], key.shape[2]
    groups = heads // kv_heads
    # grouped-query attention without copying keys/values: the query heads sharing a key/value head are stacked
    # along the query axis (head h = kv_head * groups + g, as transformers' repeat_kv orders them)
    q = query.reshape(batch, kv_heads, groups * q_len, d_head)
    scores = torch.matmul(q, key.transpose(-1, -2)).mul_(d_head**-0.5 if scaling is None else scaling)
    # causal mask: only the block of the queries' own keys (the last q_len columns) has masked entries
    future = torch.ones(q_len, q_len, dtype=torch.bool, device=query.device).triu_(diagonal=1)
    scores.view(batch, kv_heads, groups, q_len, kv_len)[..., kv_len - q_len :].masked_fill_(future, float("-inf"))
    weights = scores.softmax(-1, dtype=torch.float32).to(query.dtype)
    out = torch.matmul(weights, value).reshape(batch, heads, q_len, d_head).transpose(1, 2)
    if module.z_write is not None:  # per-head patches: the clean output of some query heads at some positions
        out = module.z_write(out)
    return out.contiguous(), None


AttentionInterface.register(ATTENTION_NAME, prefix_attention)


def _unwrap(module: nn.Module) -> nn.Module:
    """The Hugging Face module under a bridge component, with every bridged child unwrapped the same way.

    A module whose children are all plain is returned as it is; otherwise a shallow copy (same parameters) with
    plain children. The bridge itself is not changed.
    """
    module = getattr(module, "original_component", None) or module
    children = {name: _unwrap(child) for name, child in module._modules.items() if child is not None}
    if all(children[name] is child for name, child in module._modules.items() if child is not None):
        return module
    plain = copy.copy(module)
    plain._modules = {**module._modules, **children}
    return plain


class _Tap(nn.Module):
    """Calls `module`, then a TransformerLens hook point and an optional write on its (first) output.

    Where the bridge shows a sublayer's contribution scaled (`residual_contribution_scale`, e.g. Granite's
    `residual_multiplier`), the hook point sees `output * scale` and an edited value is divided back, as the
    bridge's own blocks do, so hooks and patches read and write the same values as through the bridge.
    """

    def __init__(self, module: nn.Module, hook_point: nn.Module, scale: float = 1.0) -> None:
        super().__init__()
        self.module = module
        self.hook_point = hook_point
        self.scale = scale
        self.write: Write | None = None
        self.last_position_only = False

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.last_position_only:  # a position-wise module whose other outputs are never read
            (hidden,) = args
            out = torch.zeros_like(hidden)
            out[:, -1:] = self.module(hidden[:, -1:])
        else:
            out = self.module(*args, **kwargs)
        first = out[0] if isinstance(out, tuple) else out
        first = self._hooked(first)
        return (first, *out[1:]) if isinstance(out, tuple) else first

    def _hooked(self, output: torch.Tensor) -> torch.Tensor:
        if self.scale == 1.0:
            hooked = self.hook_point(output)
            return hooked if self.write is None else self.write(hooked)
        if not (self.hook_point.has_hooks(dir="fwd") or self.write is not None):
            return output
        shown = output * self.scale
        hooked = self.hook_point(shown)
        if self.write is not None:
            hooked = self.write(hooked)
        return output if torch.equal(hooked, output * self.scale) else hooked / self.scale


class PlainDecoder:
    """The bridge's decoder layers as plain Hugging Face layers with tapped hook points (see the module docstring).

    Build it with `plain_decoder(model)`; it shares every parameter with the model.
    """

    def __init__(self, bridge: Any) -> None:
        if getattr(bridge, "rotary_emb", None) is None:
            raise PortError(
                f"the fast engine needs a rotary-position (RoPE) decoder backbone, and the bridge of "
                f"{bridge.cfg.model_name!r} has no rotary_emb (see Port.backbone); use engine='transformer_lens'"
            )
        self.bridge = bridge
        self.layers: list[nn.Module] = []
        self.attn: list[nn.Module] = []
        self.taps: list[dict[str, _Tap]] = []
        self.block_hooks: list[dict[str, nn.Module]] = []
        for index, block in enumerate(bridge.blocks):
            hooks = {kind: bridge.get_hook_point(get_act_name(kind, index)) for kind in KINDS}
            layer = copy.copy(block.original_component)
            scale = float(getattr(block, "residual_contribution_scale", 1.0))
            children = dict(layer._modules)
            taps = {}
            for name, child in layer._modules.items():
                if child is block.attn:
                    attention = _unwrap(child)
                    attention = attention if attention is not child.original_component else copy.copy(attention)
                    attention.config = copy.copy(attention.config)
                    attention.config._attn_implementation = ATTENTION_NAME
                    attention.stack_index = index
                    attention.z_write = None
                    self.attn.append(attention)
                    children[name] = taps["attn_out"] = _Tap(attention, hooks["attn_out"], scale)
                elif child is block.mlp:
                    children[name] = taps["mlp_out"] = _Tap(_unwrap(child), hooks["mlp_out"], scale)
                else:
                    children[name] = _unwrap(child)
            if set(taps) != {"attn_out", "mlp_out"}:
                raise PortError(
                    f"block {index} of the bridge has no attention and MLP components the fast engine can call (see "
                    "Port.backbone); use engine='transformer_lens'"
                )
            layer._modules = children
            self.layers.append(layer)
            self.taps.append(taps)
            self.block_hooks.append(hooks)
        self._tapped = {id(hp) for hooks in self.block_hooks for hp in hooks.values()}

    def check_hooks(self) -> None:
        """Refuse hooks on block hook points these layers do not call (they would be silently skipped)."""
        for name, hook_point in self.bridge.hook_dict.items():
            if name.startswith("blocks.") and id(hook_point) not in self._tapped and hook_point.fwd_hooks:
                raise UnsupportedHookError(
                    f"a hook is set on {name}, which the fast engine does not call; remove it or use "
                    "engine='transformer_lens'"
                )

    def positions(self, start: int, end: int, like: torch.Tensor) -> tuple[torch.Tensor, Any]:
        """Position ids [start, end) and their rotary embeddings, for hidden states shaped like `like`."""
        positions = torch.arange(start, end, device=like.device)[None]
        return positions, self.bridge.rotary_emb(like, positions)

    def run_layer(
        self,
        index: int,
        h: Float[torch.Tensor, "rows pos d_model"],
        positions: torch.Tensor,
        rotary: Any,
        kv_source: RecordKV | PrefixKV,
        write: Write | None = None,
        kind: str | None = None,
        last_position_only: bool = False,
    ) -> Float[torch.Tensor, "rows pos d_model"]:
        """Layer `index` on `h` (positions `positions`), attending through `kv_source`; `write` edits the `kind`
        activation of this layer right after its hook point (kind "z": the attention's per-head output before the
        output projection, `[rows, pos, heads, d_head]`). With `last_position_only`, only the last position's
        output is computed (valid when the next step is the unembedding and no hook reads the rest)."""
        hooks, taps = self.block_hooks[index], self.taps[index]
        h = hooks["resid_pre"](h)
        if kind == "resid_pre" and write is not None:
            h = write(h)
        self.attn[index].kv_source = kv_source
        if kind == HEAD_KIND:
            self.attn[index].z_write = write
        if kind in taps:
            taps[kind].write = write
        taps["mlp_out"].last_position_only = last_position_only
        try:
            out = self.layers[index](h, attention_mask=None, position_ids=positions, position_embeddings=rotary)
        finally:
            self.attn[index].kv_source = self.attn[index].z_write = None
            for tap in taps.values():
                tap.write, tap.last_position_only = None, False
        out = hooks["resid_post"](out[0] if isinstance(out, tuple) else out)
        if kind == "resid_post" and write is not None:
            out = write(out)
        return out

    def run(
        self, h: Float[torch.Tensor, "rows pos d_model"], start: int, kv_source: RecordKV | PrefixKV
    ) -> tuple[list[Float[torch.Tensor, "rows pos d_model"]], Float[torch.Tensor, "rows vocab"]]:
        """Every layer on `h` (the embeddings of positions [start, start + pos)), attending through `kv_source`: the
        residual stream before each layer, and the last position's logits."""
        positions, rotary = self.positions(start, start + h.shape[1], h)
        resid = []
        last = len(self.layers) - 1
        for index in range(len(self.layers)):
            resid.append(h)
            h = self.run_layer(index, h, positions, rotary, kv_source,
                               last_position_only=index == last and self.last_layer_unread())  # fmt: skip
        return resid, self.unembed_last(h)

    def unembed_last(self, h: Float[torch.Tensor, "rows pos d_model"]) -> Float[torch.Tensor, "rows vocab"]:
        """The logits of the last position: the final norm and the unembedding."""
        return self.bridge.unembed(self.bridge.ln_final(h[:, -1:]))[:, 0]

    def last_layer_unread(self) -> bool:
        """True when no hook reads the last layer's MLP output or residual output (so only its last position
        needs computing before the unembedding)."""
        hooks = self.block_hooks[-1]
        return not (hooks["mlp_out"].fwd_hooks or hooks["resid_post"].fwd_hooks)


_DECODERS: weakref.WeakKeyDictionary[nn.Module, PlainDecoder] = weakref.WeakKeyDictionary()


def plain_decoder(model: Any) -> PlainDecoder:
    """The `PlainDecoder` of a `HookedLALM`, built once per model."""
    decoder = _DECODERS.get(model.bridge)
    if decoder is None:
        decoder = _DECODERS[model.bridge] = PlainDecoder(model.bridge)
    return decoder
