"""The Qwen-Audio (v1) release forward, re-stated with `torch.nn.functional` on the release's tensor names.

An oracle independent of the port's modules: `test_port_qwen_audio.py` checks that the port, which runs native
transformers modules on renamed weights, computes exactly this. It follows the release code (`Qwen/Qwen-Audio-Chat`:
`audio.py`, `modeling_qwen.py`) step by step, for a batch whose clips may have different encoder lengths.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int


def release_forward(
    w: dict[str, torch.Tensor], cfg: dict, ids: Int[torch.Tensor, "batch pos"],
    mel: Float[torch.Tensor, "batch mels frames"], lengths: Int[torch.Tensor, "batch 2"],
) -> Float[torch.Tensor, "batch pos vocab"]:
    """Logits `[batch, pos, vocab]` of the release forward, on the release's own tensor names `w` and config.

    Batch path of the release `audio.AudioEncoder.forward` (mel cut to the longest clip's 2·T_cnn frames, frames
    past a clip's length zeroed and masked as keys, AvgPool, `ln_post`, `proj`), the `<audio>` … `</audio>` span
    overwritten with bos, the clip's first N rows, eos (`QWenModel.forward`), then the QWen decoder blocks
    (`QWenAttention` with `c_attn` = q | k | v and rotary base `rotary_emb_base`, `QWenMLP` = `c_proj(w1(x) *
    silu(w2(x)))`, RMSNorm) and `lm_head`.
    """
    a, d_a, heads_a = "transformer.audio.", cfg["audio"]["n_state"], cfg["audio"]["n_head"]
    t_cnn = lengths[:, 0]
    n_frames = int(t_cnn.max())
    x = F.gelu(F.conv1d(mel[:, :, : 2 * n_frames], w[a + "conv1.weight"], w[a + "conv1.bias"], padding=1))
    x = F.gelu(F.conv1d(x, w[a + "conv2.weight"], w[a + "conv2.bias"], stride=2, padding=1)).permute(0, 2, 1)
    x = x + w[a + "positional_embedding"][:n_frames]
    pad = torch.arange(n_frames)[None, :] >= t_cnn[:, None]
    x = x.masked_fill(pad[..., None], 0.0)
    key_mask = torch.zeros(pad.shape).masked_fill(pad, float("-inf"))[:, None, None, :]

    def heads(t: torch.Tensor, n: int) -> torch.Tensor:
        return t.reshape(*t.shape[:2], n, -1).transpose(1, 2)

    def merge(t: torch.Tensor) -> torch.Tensor:
        return t.transpose(1, 2).flatten(2)

    for i in range(cfg["audio"]["n_layer"]):
        p = f"{a}blocks.{i}."
        h = F.layer_norm(x, (d_a,), w[p + "attn_ln.weight"], w[p + "attn_ln.bias"])
        scale = (d_a // heads_a) ** -0.25
        q = heads(F.linear(h, w[p + "attn.query.weight"], w[p + "attn.query.bias"]), heads_a) * scale
        k = heads(F.linear(h, w[p + "attn.key.weight"]), heads_a) * scale
        v = heads(F.linear(h, w[p + "attn.value.weight"], w[p + "attn.value.bias"]), heads_a)
        att = (q @ k.transpose(-1, -2) + key_mask).softmax(-1)
        x = x + F.linear(merge(att @ v), w[p + "attn.out.weight"], w[p + "attn.out.bias"])
        h = F.layer_norm(x, (d_a,), w[p + "mlp_ln.weight"], w[p + "mlp_ln.bias"])
        x = x + F.linear(F.gelu(F.linear(h, w[p + "mlp.0.weight"], w[p + "mlp.0.bias"])), w[p + "mlp.2.weight"], w[p + "mlp.2.bias"])
    x = F.avg_pool1d(x.permute(0, 2, 1), 2, 2).permute(0, 2, 1)
    x = F.layer_norm(x, (d_a,), w[a + "ln_post.weight"], w[a + "ln_post.bias"])
    x = F.linear(x, w[a + "proj.weight"], w[a + "proj.bias"])
    bos, eos = w[a + "audio_bos_eos_token.weight"]

    start_id = cfg["audio"]["audio_start_id"]
    h = w["transformer.wte.weight"][ids].clone()
    for b in range(ids.shape[0]):
        s, e = int((ids[b] == start_id).nonzero()), int((ids[b] == start_id + 1).nonzero())
        h[b, s : e + 1] = torch.cat([bos[None], x[b, : int(lengths[b, 1])], eos[None]])

    d, n_heads, eps = cfg["hidden_size"], cfg["num_attention_heads"], cfg["layer_norm_epsilon"]
    hd, seq = d // n_heads, ids.shape[1]
    inv_freq = 1.0 / cfg["rotary_emb_base"] ** (torch.arange(0, hd, 2).float() / hd)
    angles = torch.outer(torch.arange(seq).float(), inv_freq).repeat(1, 2)
    cos, sin = angles.cos(), angles.sin()

    def rope(t: torch.Tensor) -> torch.Tensor:
        t1, t2 = t.chunk(2, dim=-1)
        return t * cos + torch.cat([-t2, t1], dim=-1) * sin

    def rms(t: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + eps) * weight

    causal = torch.ones(seq, seq, dtype=torch.bool).tril()
    for i in range(cfg["num_hidden_layers"]):
        p = f"transformer.h.{i}."
        q, k, v = F.linear(rms(h, w[p + "ln_1.weight"]), w[p + "attn.c_attn.weight"], w[p + "attn.c_attn.bias"]).split(d, -1)
        q, k, v = rope(heads(q, n_heads)), rope(heads(k, n_heads)), heads(v, n_heads)
        att = (q @ k.transpose(-1, -2) / hd**0.5).masked_fill(~causal, float("-inf")).softmax(-1)
        h = h + F.linear(merge(att @ v), w[p + "attn.c_proj.weight"])
        m = rms(h, w[p + "ln_2.weight"])
        h = h + F.linear(F.linear(m, w[p + "mlp.w1.weight"]) * F.silu(F.linear(m, w[p + "mlp.w2.weight"])), w[p + "mlp.c_proj.weight"])
    return F.linear(rms(h, w["transformer.ln_f.weight"]), w["lm_head.weight"])
