"""GPU plan: the paper's whole study (5 models x 4 SAKURA tracks x 500 clips, layer- and token-wise) projected
onto GPUs. Every number it prints is a PROJECTION from the models' dimensions, not a measurement.

For each model the decoder and the audio encoder are built from their released configurations (written below,
from each port's docstring and `shared/reference/ports_spec.md`) on the `meta` device: exact parameter counts and
shapes, no weights. One clip's work is then counted as the fast engine does it (`tracing/engine_fast.py`), at the
median clip length of each SAKURA track (Animal 5.0 s, Emotion 2.65 s, Gender 5.6 s, Language 5.7 s;
`shared/reference/data_and_prompts.md`), with the paper's settings (silence, one corrupted copy, `resid_pre`):

- the audio encoder, clean and silent (and, for DeSTA, greedy Whisper ASR of the transcript, once);
- the clean run with its cache and the corrupted run, each a full forward;
- layer-wise: one suffix pass from the first text position after the audio, rows joining at layers 1..L-1 (the
  patch at layer 0 rewrites the text's own embeddings, identical in both runs, and is skipped);
- token-wise: one such suffix pass per text position after the audio, each recomputing only the positions after it;
- the exactness audit: 5 full forwards.

A pass costs the larger of its FLOPs at `--mfu` of the GPU's dense bf16 peak and one read of the weights it uses
at `--hbm-efficiency` of its memory bandwidth, plus `--layer-call-ms` per decoder-layer call (eager PyTorch
dispatch). Activation memory is what a clip holds beyond the bf16 weights: the corrupted run's residuals and
keys/values, the clean cache, and the working set of the largest suffix pass. Text lengths are estimated from the
prompts (one token per word or punctuation mark, one per special token); DeSTA's transcripts as 3 tokens per
second of speech (1 for the animal track). Clips are all traced in full (excluded clips cost less).

    python benchmarks/gpu_plan.py                                   # H100 SXM defaults
    python benchmarks/gpu_plan.py --peak-tflops 989 --hbm-tbps 4.8  # H200
"""

from __future__ import annotations

import argparse
import math
import re
from collections.abc import Callable
from dataclasses import dataclass

TRACK_SECONDS = {"animal": 5.0, "emotion": 2.65, "gender": 5.6, "language": 5.7}
"""SAKURA's median clip length per track, in seconds."""
CLIPS_PER_TRACK = 500
AUDIT_FORWARDS = 5
BF16 = 2
_TOKEN = re.compile(r"<\|[^|>]+\|>|\[[A-Z_/]+\]|</?s>|</?audio>|<(?:start|end)_audio>|\n+|\w+|[^\w\s]")


def tokens(text: str) -> int:
    """Estimated tokens of `text`: one per word, punctuation mark, special token or run of newlines."""
    return len(_TOKEN.findall(text))


@dataclass(frozen=True)
class Dims:
    """What sets a decoder's cost: layers, widths, heads, vocabulary, and its parameter count."""

    layers: int
    d_model: int
    heads: int
    kv_heads: int
    head_dim: int
    ffn: int
    vocab: int
    params: int

    def linear_flops(self) -> float:
        """FLOPs of one token through one layer's matrices (q, k, v, o and a gated MLP)."""
        attention = self.d_model * self.head_dim * (2 * self.heads + 2 * self.kv_heads)
        return 2.0 * (attention + 3 * self.d_model * self.ffn)

    def attention_flops(self, context: int) -> float:
        """FLOPs of one query attending to `context` keys in one layer (scores and weighted sum)."""
        return 4.0 * self.heads * self.head_dim * context


@dataclass(frozen=True)
class Model:
    """One port at its released size: the modules to build on `meta`, and its sequence layout."""

    port: str
    release: str
    backbone: Callable[[], object]
    encoder: Callable[[], object]
    encoder_positions: Callable[[float], int]
    audio_rows: Callable[[float, int], int]
    before_audio: str
    after_audio: str
    asr: Callable[[], object] | None = None
    transcript_as_text: bool = False


def _meta(build: Callable[[], object]) -> object:
    import torch

    with torch.device("meta"):
        return build()


def _params(module) -> int:
    return sum(p.numel() for p in module.parameters())


def _qwen2_audio_rows(seconds: float, _: int) -> int:
    frames = int(seconds * 100)  # 10-ms mel hop
    return ((frames - 1) // 2 + 1 - 2) // 2 + 1


def models() -> list[Model]:
    """The paper's five models, at their released sizes."""
    from transformers import (
        LlamaConfig,
        LlamaForCausalLM,
        Qwen2AudioEncoderConfig,
        Qwen2Config,
        Qwen2ForCausalLM,
        VoxtralEncoderConfig,
        WhisperConfig,
    )
    from transformers.models.qwen2_audio.modeling_qwen2_audio import Qwen2AudioEncoder
    from transformers.models.voxtral.modeling_voxtral import VoxtralEncoder
    from transformers.models.whisper.modeling_whisper import WhisperModel

    whisper_large = dict(d_model=1280, encoder_layers=32, decoder_layers=32, encoder_attention_heads=20,
                         decoder_attention_heads=20, encoder_ffn_dim=5120, decoder_ffn_dim=5120)  # fmt: skip
    llama3_8b = dict(num_hidden_layers=32, hidden_size=4096, num_attention_heads=32, num_key_value_heads=8,
                     intermediate_size=14336, vocab_size=128256, tie_word_embeddings=False)  # fmt: skip
    chatml_before = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nAudio 1: "
    chatml_after = "\n{question}<|im_end|>\n<|im_start|>assistant\n{prefix}"
    llama3_after = "<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n{question}<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n{prefix}"  # fmt: skip
    return [
        Model(
            "qwen2-audio", "Qwen/Qwen2-Audio-7B-Instruct",
            lambda: Qwen2ForCausalLM(Qwen2Config(num_hidden_layers=28, hidden_size=3584, num_attention_heads=28,
                                                 num_key_value_heads=4, intermediate_size=18944, vocab_size=156032)),
            lambda: Qwen2AudioEncoder(Qwen2AudioEncoderConfig(num_mel_bins=128, encoder_layers=32, d_model=1280,
                                                              encoder_attention_heads=20, encoder_ffn_dim=5120)),
            lambda s: 1500,  # the whole 30-s window, padding masked
            _qwen2_audio_rows,
            chatml_before + "<|audio_bos|>", "<|audio_eos|>" + chatml_after,
        ),
        Model(
            "voxtral", "mistralai/Voxtral-Mini-3B-2507",
            lambda: LlamaForCausalLM(LlamaConfig(num_hidden_layers=30, hidden_size=3072, num_attention_heads=32,
                                                 num_key_value_heads=8, head_dim=128, intermediate_size=8192,
                                                 vocab_size=131072, tie_word_embeddings=False)),
            lambda: VoxtralEncoder(VoxtralEncoderConfig()),  # Whisper-large-v3 shape: 32 x 1280, 128 mels
            lambda s: 1500 * math.ceil(s / 30),  # one 1500-frame encoder pass per 30-s chunk
            lambda s, _: 375 * math.ceil(s / 30),  # 12.5 rows per second of the padded chunk
            "<s>[INST][BEGIN_AUDIO]", "{question}[/INST]{prefix}",
        ),
        Model(
            "qwen-audio", "Qwen/Qwen-Audio-Chat",
            lambda: Qwen2ForCausalLM(Qwen2Config(num_hidden_layers=32, hidden_size=4096, num_attention_heads=32,
                                                 num_key_value_heads=32, intermediate_size=11008, vocab_size=155947,
                                                 tie_word_embeddings=False)),
            lambda: Qwen2AudioEncoder(Qwen2AudioEncoderConfig(num_mel_bins=80, encoder_layers=32, d_model=1280,
                                                              encoder_attention_heads=20, encoder_ffn_dim=5120)),
            lambda s: int(s * 50),  # the mel cut to the clip's length, conv stride 2
            lambda s, _: int(s * 25) + 2,  # pooled frames + <audio> and </audio> rows
            chatml_before, chatml_after,
        ),
        Model(
            "desta2", "DeSTA-ntu/DeSTA2-8B-beta",
            lambda: LlamaForCausalLM(LlamaConfig(**llama3_8b)),
            lambda: WhisperModel(WhisperConfig(num_mel_bins=80, d_model=768, encoder_layers=12, decoder_layers=12,
                                               encoder_attention_heads=12, decoder_attention_heads=12,
                                               encoder_ffn_dim=3072, decoder_ffn_dim=3072)).encoder,  # whisper-small
            lambda s: 1500,
            lambda s, _: 64,  # Q-Former queries; the transcript follows as text
            "<|begin_of_text|><|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nFocus on the input "
            "audio.<|eot_id|><|start_header_id|>audio<|end_header_id|>",
            "\n\n{transcript}" + llama3_after,
            asr=lambda: WhisperModel(WhisperConfig(num_mel_bins=80, d_model=768, encoder_layers=12, decoder_layers=12,
                                                   encoder_attention_heads=12, decoder_attention_heads=12,
                                                   encoder_ffn_dim=3072, decoder_ffn_dim=3072)).decoder,
            transcript_as_text=True,
        ),
        Model(
            "desta2.5", "DeSTA-ntu/DeSTA2.5-Audio-Llama-3.1-8B",
            lambda: LlamaForCausalLM(LlamaConfig(**llama3_8b)),  # Llama-3.1-8B: Llama-3's shape
            lambda: WhisperModel(WhisperConfig(num_mel_bins=128, **whisper_large)).encoder,  # whisper-large-v3
            lambda s: 1500,
            lambda s, transcript: 64 + transcript,  # Q-Former queries and the transcript's embeddings
            "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: December 2023\n"
            "Today Date: 26 Jul 2024\n\nFocus on the audio clips and instructions.<|eot_id|><|start_header_id|>user"
            "<|end_header_id|>\n\n<start_audio>",
            "<end_audio>\n{question}<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n{prefix}",
            asr=lambda: WhisperModel(WhisperConfig(num_mel_bins=128, **whisper_large)).decoder,
        ),
    ]


@dataclass
class Gpu:
    """The GPU of the projection and the assumed efficiencies."""

    peak_tflops: float
    hbm_tbps: float
    mfu: float
    hbm_efficiency: float
    layer_call_ms: float

    def seconds(self, flops: float, bytes_read: float, layer_calls: int) -> float:
        """One pass: compute- or bandwidth-bound, whichever is slower, plus dispatch per layer call."""
        compute = flops / (self.peak_tflops * 1e12 * self.mfu)
        memory = bytes_read / (self.hbm_tbps * 1e12 * self.hbm_efficiency)
        return max(compute, memory) + layer_calls * self.layer_call_ms / 1000


@dataclass
class Clip:
    """One clip's projected work: sequence layout, FLOPs by part, seconds, activation bytes."""

    seq: int
    audio_rows: int
    text_after: int
    flops: dict[str, float]
    seconds: float
    activation_bytes: float


def full_forward_flops(m: Dims, seq: int, logit_rows: int) -> float:
    """A causal forward over `seq` positions, logits at `logit_rows` of them."""
    attention = sum(m.attention_flops(t + 1) for t in range(seq))
    return m.layers * (seq * m.linear_flops() + attention) + 2.0 * m.d_model * m.vocab * logit_rows


def suffix_pass_flops(m: Dims, start: int, seq: int) -> float:
    """One fast-engine suffix pass from position `start`: at layer k the k patches of layers 1..k are rows, each
    recomputing positions [start, seq) over the stored prefix; then one logit row per patch."""
    per_row_layer = (seq - start) * m.linear_flops() + sum(m.attention_flops(t + 1) for t in range(start, seq))
    row_layers = m.layers * (m.layers - 1) / 2
    return row_layers * per_row_layer + 2.0 * m.d_model * m.vocab * (m.layers - 1)


def encoder_shape(encoder) -> tuple[int, int, int]:
    """(layers, width, MLP width) of a Whisper-style encoder, whatever its config calls them."""
    c = encoder.config
    return (getattr(c, "encoder_layers", None) or c.num_hidden_layers, getattr(c, "d_model", None) or c.hidden_size,
            getattr(c, "encoder_ffn_dim", None) or c.intermediate_size)  # fmt: skip


def encoder_flops(encoder, positions: int) -> float:
    """A Whisper-style encoder over `positions` frames (bidirectional attention)."""
    layers, d, ffn = encoder_shape(encoder)
    return layers * positions * (2.0 * (4 * d * d + 2 * d * ffn) + 4.0 * d * positions)


def asr_flops(decoder, n_tokens: int, positions: int) -> float:
    """Greedy decoding of `n_tokens` with a Whisper decoder (cross-attending to `positions` frames)."""
    c = decoder.config
    per_token = 2.0 * (_params(decoder) - c.vocab_size * c.d_model) + 2.0 * c.d_model * c.vocab_size
    return n_tokens * (per_token + c.decoder_layers * 4.0 * c.d_model * positions)


def plan_clip(model: Model, built: dict, attribute: str, gpu: Gpu) -> Clip:
    """The projected work of one clip of `attribute` at its median length."""
    from audiolens_ct.data.prompts import get_track

    track, seconds = get_track(attribute), TRACK_SECONDS[attribute]
    m, encoder, asr = built["dims"], built["encoder"], built["asr"]
    transcript = 0 if asr is None else (1 if attribute == "animal" else round(3 * seconds))
    rows = model.audio_rows(seconds, transcript)
    after = tokens(model.after_audio.format(question=track.prompt, prefix=track.response_prefix, transcript=""))
    after += transcript if model.transcript_as_text else 0
    first_text = tokens(model.before_audio) + rows
    seq = first_text + after
    weights = m.params * BF16
    positions = model.encoder_positions(seconds)

    flops = {"audio encoder": 2 * encoder_flops(encoder, positions)}
    seconds_spent = 2 * gpu.seconds(flops["audio encoder"] / 2, _params(encoder) * BF16, encoder_shape(encoder)[0])
    if asr is not None:
        flops["ASR transcript"] = asr_flops(asr, transcript, positions)
        seconds_spent += transcript * gpu.seconds(flops["ASR transcript"] / max(transcript, 1), _params(asr) * BF16,
                                                  asr.config.decoder_layers)  # fmt: skip
    forwards = {"clean + corrupted runs": (full_forward_flops(m, seq, seq) + full_forward_flops(m, seq, 1), 2),
                "exactness audit": (AUDIT_FORWARDS * full_forward_flops(m, seq, seq), AUDIT_FORWARDS)}
    for name, (f, passes) in forwards.items():
        flops[name] = f
        seconds_spent += passes * gpu.seconds(f / passes, weights, m.layers)
    flops["layer-wise"] = suffix_pass_flops(m, first_text, seq)
    seconds_spent += gpu.seconds(flops["layer-wise"], weights, m.layers)
    token_passes = [suffix_pass_flops(m, start, seq) for start in range(first_text, seq)]
    flops["token-wise"] = sum(token_passes)
    seconds_spent += sum(gpu.seconds(f, weights, m.layers) for f in token_passes)

    kept = m.layers * seq * (2 * m.d_model + 2 * m.kv_heads * m.head_dim) * BF16  # residuals, clean cache, keys/values
    rows_max, suffix = m.layers - 1, seq - first_text
    hidden = rows_max * suffix * (m.d_model + 3 * m.ffn) * BF16
    scores = rows_max * m.heads * suffix * seq * (4 + BF16) + rows_max * m.kv_heads * seq * m.head_dim * 2 * BF16
    logits = seq * m.vocab * 4  # the clean run's logits at every position (float32)
    return Clip(seq, rows, after, flops, seconds_spent, kept + max(hidden + scores, logits))


def build(model: Model) -> dict:
    """The model's decoder and encoder on `meta`: parameter counts and dimensions, no weights."""
    backbone = _meta(model.backbone)
    c = backbone.config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    dims = Dims(c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.num_key_value_heads, head_dim,
                c.intermediate_size, c.vocab_size, _params(backbone))  # fmt: skip
    encoder = _meta(model.encoder)
    asr = _meta(model.asr) if model.asr is not None else None
    return {"dims": dims, "encoder": encoder, "asr": asr, "params": dims.params + _params(encoder) + (_params(asr) if asr else 0)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpu", default="H100 SXM (bf16 dense)", help="name printed with the projection")
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak, TFLOP/s")
    parser.add_argument("--hbm-tbps", type=float, default=3.35, help="memory bandwidth, TB/s")
    parser.add_argument("--mfu", type=float, default=0.4, help="assumed share of the peak the matrix work reaches")
    parser.add_argument("--hbm-efficiency", type=float, default=0.7, help="assumed share of the bandwidth reached")
    parser.add_argument("--layer-call-ms", type=float, default=0.15,
                        help="assumed dispatch time of one decoder-layer call (eager PyTorch), ms")
    parser.add_argument("--gpus", type=int, default=8, help="GPUs of the multi-GPU projection")
    parser.add_argument("--load-minutes", type=float, default=2.0,
                        help="assumed minutes for a worker to load its model (paid once per GPU)")
    args = parser.parse_args()
    gpu = Gpu(args.peak_tflops, args.hbm_tbps, args.mfu, args.hbm_efficiency, args.layer_call_ms)

    print(f"PROJECTIONS, not measurements: {args.gpu}, {gpu.peak_tflops:g} TFLOP/s peak at {gpu.mfu:.0%}, "
          f"{gpu.hbm_tbps:g} TB/s at {gpu.hbm_efficiency:.0%}, {gpu.layer_call_ms:g} ms per layer call; fast engine, "
          "silence, layer- and token-wise, audit on; SAKURA median clip lengths")
    header = (f"{'model':<12}{'params':>8}{'track':>10}{'clip s':>8}{'seq':>6}{'audio':>7}{'text':>6}"
              f"{'TFLOP layer':>13}{'TFLOP token':>13}{'TFLOP clip':>12}{'act. MiB':>10}{'s / clip':>10}")  # fmt: skip
    print(header)
    study = {}
    for model in models():
        built = build(model)
        clips = {attribute: plan_clip(model, built, attribute, gpu) for attribute in TRACK_SECONDS}
        for attribute, clip in clips.items():
            print(f"{model.port:<12}{built['params'] / 1e9:>7.2f}B{attribute:>10}{TRACK_SECONDS[attribute]:>8.2f}"
                  f"{clip.seq:>6}{clip.audio_rows:>7}{clip.text_after:>6}{clip.flops['layer-wise'] / 1e12:>13.2f}"
                  f"{clip.flops['token-wise'] / 1e12:>13.1f}{sum(clip.flops.values()) / 1e12:>12.1f}"
                  f"{clip.activation_bytes / 2**20:>10.0f}{clip.seconds:>10.2f}")  # fmt: skip
        study[model.port] = (built, list(clips.values()))

    n, load = args.gpus, args.load_minutes / 60
    print(f"\nper model, over its {len(TRACK_SECONDS)} tracks x {CLIPS_PER_TRACK} clips (projected):")
    print("| model | weights (bf16) | TFLOP per clip | activations per clip | seconds per clip | GPU-hours |")
    print("|---|---:|---:|---:|---:|---:|")
    total = 0.0
    for port, (built, clips) in study.items():
        hours = sum(CLIPS_PER_TRACK * clip.seconds for clip in clips) / 3600
        total += hours
        tflop = [sum(clip.flops.values()) / 1e12 for clip in clips]
        seconds = [clip.seconds for clip in clips]
        print(f"| {port} | {built['params'] * BF16 / 2**30:.1f} GiB | {min(tflop):.0f}-{max(tflop):.0f} | "
              f"{max(clip.activation_bytes for clip in clips) / 2**20:.0f} MiB | {min(seconds):.2f}-{max(seconds):.2f} | "
              f"{hours:.2f} |")  # fmt: skip
    models_n = len(study)
    print(f"\nthe study, {models_n} models x {len(TRACK_SECONDS)} tracks x {CLIPS_PER_TRACK} clips "
          f"= {models_n * len(TRACK_SECONDS) * CLIPS_PER_TRACK} traces (projected, {args.load_minutes:g} min to load "
          "a model):")  # fmt: skip
    print(f"  1 GPU:  {total + models_n * load:.1f} GPU-hours, {total + models_n * load:.1f} h wall-clock")
    print(f"  {n} GPUs: {total + n * models_n * load:.1f} GPU-hours (each GPU loads each model), "
          f"{total / n + models_n * load:.1f} h wall-clock (--executor ray --workers {n} --gpus-per-worker 1)")

if __name__ == "__main__":
    main()
