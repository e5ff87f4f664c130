"""Train the small Qwen2-Audio-format model shipped in `audiolens_ct/assets/demo_model/`.

The demo (`audiolens-ct demo`) needs a model that really listens: random weights answer wrongly on every clip, so
every sample would be excluded. This script trains a tiny `Qwen2AudioForConditionalGeneration` (the real class and
checkpoint format: config.json, model.safetensors, processor and tokenizer files) to answer the four AudioLens
questions from synthetic SAKURA-like clips (`audiolens_ct.demo.synthetic`).

Training sees exactly what tracing sees. Each example is the port's own prompt: the sequence of
`Qwen2AudioPort.encode_prompt` (the processor's chat template with the clip, the AudioLens question and the
response prefix ending in " is"); the target is the answer token, the first token of `" " + label`
(`audiolens_ct.tracing.scoring`); the loss is the cross-entropy over the full vocabulary at the last position. Only
clips with their true label are seen, and every question of a track is the same text, so the answer can only come
from the audio: with silence the model answers one fixed option per track (chance level).

For speed the log-mel features are computed once per clip and cropped to the clip's own frames, and the audio tower
runs on those frames only. That gives the same rows as the release forward on all 3000 padded frames (the tower's
key-padding mask hides the padding, and the convolutions reach at most two frames past the clip); the script
checks the prompt tokens and the last-position logits against `HookedLALM` on a few clips before it trains, and
scores the saved checkpoint through `HookedLALM.from_pretrained` after it.

    HF_HUB_OFFLINE=1 .venv/bin/python scripts/train_demo_model.py --out audiolens_ct/assets/demo_model

Measured (torch 2.13 CPU, one thread, on a 2-core machine shared with other jobs): 27.4 min of CPU time, 31.3 min
wall, of which 4 min build the 6000 training clips; held-out accuracy (120 clips per track) animal 0.99, emotion
0.93, gender 0.93, language 0.94, and exactly chance on silence. One thread is both deterministic and the fastest
here (two threads ran 4x slower on the shared cores). With every seed fixed and
`torch.use_deterministic_algorithms(True)`, a re-run on the same machine writes bit-identical weights (checked
by running a shortened training twice).
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import nn
from transformers.masking_utils import create_bidirectional_mask

from audiolens_ct.data.prompts import ATTRIBUTES, get_track
from audiolens_ct.demo import synthetic
from audiolens_ct.demo.synthetic import clip_rng, synthetic_clip
from audiolens_ct.model import HookedLALM
from audiolens_ct.ports import get_port
from audiolens_ct.testing import tiny_model
from audiolens_ct.tracing.scoring import answer_tokens

PORT = "qwen2-audio"
TRAIN_SEED, HELDOUT_SEED = 0, 1  # clip seeds; the demo draws its clips with another seed (audiolens_ct.demo)
AUDIO_CONFIG = dict(
    d_model=96, encoder_layers=2, encoder_attention_heads=4, encoder_ffn_dim=384, num_mel_bins=128,
    max_source_positions=1500,
)
TEXT_CONFIG = dict(
    hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
)
PAD_SECONDS = 0.1  # zeros after the clip before the mel: the frames the tower's convolutions reach past the clip
CROP_MARGIN = 4  # mel frames kept past the clip's own frames
WEIGHT_DECAY = 0.05


@dataclass
class Example:
    """One training or evaluation example: the cropped mel, the prompt tokens and the answer token."""

    attribute: str
    label: str
    features: Float[torch.Tensor, "mels frames"]
    n_frames: int  # the clip's own mel frames (the processor's feature_attention_mask sum)
    tokens: Int[torch.Tensor, " pos"]
    target: int


# -- data ------------------------------------------------------------------------------------------------------------


def mel_features(processor: Any, wave: Float[np.ndarray, " samples"]) -> tuple[torch.Tensor, int]:
    """The processor's log-mel of `wave`, cropped to the clip's frames plus a margin, and the clip's frame count.

    Padding to `len(wave) + PAD_SECONDS` instead of 30 s gives the same values on the kept frames: the features are
    normalised by the spectrogram's maximum, which the silent padding never holds.
    """
    extractor = processor.feature_extractor
    padded = len(wave) + int(PAD_SECONDS * extractor.sampling_rate)
    out = extractor(
        wave, sampling_rate=extractor.sampling_rate, padding="max_length", max_length=padded,
        return_attention_mask=True, return_tensors="pt",
    )
    n_frames = int(out["attention_mask"].sum())
    return out["input_features"][0, :, : n_frames + CROP_MARGIN].clone(), n_frames


class PromptTokens:
    """The port's prompt for each track, with the audio placeholder repeated once per audio row.

    Built from one `encode_prompt` call per track; `check_against_hooked` compares it with `HookedLALM.prepare`.
    """

    def __init__(self, hf_model: nn.Module, processor: Any) -> None:
        self.port = get_port(PORT)
        self.audio_id = hf_model.config.audio_token_id
        self.parts: dict[str, tuple[list[int], list[int]]] = {}
        probe = np.zeros(16000, dtype=np.float32)
        for attribute in ATTRIBUTES:
            track = get_track(attribute)
            ids = self.port.encode_prompt(hf_model, processor, probe, track.prompt, track.response_prefix).tokens[0]
            audio = (ids == self.audio_id).nonzero()[:, 0]
            self.parts[attribute] = (ids[: audio[0]].tolist(), ids[audio[-1] + 1 :].tolist())

    def __call__(self, attribute: str, n_rows: int) -> torch.Tensor:
        before, after = self.parts[attribute]
        return torch.tensor(before + [self.audio_id] * n_rows + after)


def audio_rows(tower: nn.Module, n_frames: torch.Tensor) -> torch.Tensor:
    """The number of audio rows the release forward keeps for clips of `n_frames` mel frames."""
    return tower._get_feat_extract_output_lengths(n_frames)[1]


def make_examples(
    hf_model: nn.Module, processor: Any, prompts: PromptTokens, seed: int, per_track: int, silent: bool = False
) -> list[Example]:
    """About `per_track` synthetic clips per track, the same number per label (clip i of a label is the same clip
    for any count); `silent` replaces each clip by zeros of its length."""
    tokenizer = processor.tokenizer
    tower = hf_model.model.audio_tower
    examples = []
    for attribute in ATTRIBUTES:
        track = get_track(attribute)
        ids = answer_tokens(tokenizer, track.labels)
        for index in range(math.ceil(per_track / len(track.labels))):
            for label in track.labels:
                wave = synthetic_clip(attribute, label, clip_rng(seed, attribute, label, index))
                if silent:
                    wave = np.zeros_like(wave)
                features, n_frames = mel_features(processor, wave)
                n_rows = int(audio_rows(tower, torch.tensor(n_frames)))
                examples.append(Example(attribute, label, features, n_frames, prompts(attribute, n_rows), ids[label]))
    return examples


# -- the forward pass on cropped features ------------------------------------------------------------------------------


def last_logits(hf_model: nn.Module, batch: list[Example]) -> Float[torch.Tensor, "batch vocab"]:
    """Logits at each example's last position, computed as the release forward does, on cropped mel frames."""
    tower = hf_model.model.audio_tower
    n_mels = batch[0].features.shape[0]
    width = max(e.features.shape[1] for e in batch)
    width += width % 2
    feats = torch.zeros(len(batch), n_mels, width)
    for i, e in enumerate(batch):
        feats[i, :, : e.features.shape[1]] = e.features
    n_frames = torch.tensor([e.n_frames for e in batch])
    conv_lengths, out_lengths = tower._get_feat_extract_output_lengths(n_frames)

    hidden = F.gelu(tower.conv1(feats))
    hidden = F.gelu(tower.conv2(hidden)).permute(0, 2, 1)  # [batch, frames/2, d_audio]
    hidden = hidden + tower.embed_positions.weight[: hidden.shape[1]]
    valid = torch.arange(hidden.shape[1])[None, :] < conv_lengths[:, None]
    mask = create_bidirectional_mask(config=tower.config, inputs_embeds=hidden, attention_mask=valid.long())
    for layer in tower.layers:
        hidden = layer(hidden, mask)
    hidden = tower.layer_norm(tower.avg_pooler(hidden.permute(0, 2, 1)).permute(0, 2, 1))
    projected = hf_model.model.multi_modal_projector(hidden)  # [batch, frames/4, d_model]

    length = max(len(e.tokens) for e in batch)
    tokens = torch.full((len(batch), length), int(batch[0].tokens[0]))
    for i, e in enumerate(batch):
        tokens[i, : len(e.tokens)] = e.tokens  # right padding: causal attention never looks at it
    language_model = hf_model.model.language_model
    embeds = language_model.embed_tokens(tokens)
    rows = torch.cat([projected[i, : out_lengths[i]] for i in range(len(batch))])
    audio_mask = tokens == hf_model.config.audio_token_id
    embeds = embeds.masked_scatter(audio_mask[..., None], rows.to(embeds.dtype))
    hidden_text = language_model(inputs_embeds=embeds).last_hidden_state
    last = torch.tensor([len(e.tokens) - 1 for e in batch])
    return hf_model.lm_head(hidden_text[torch.arange(len(batch)), last])


def check_against_hooked(hf_model: nn.Module, processor: Any, prompts: PromptTokens, n_clips: int = 2) -> float:
    """Tokens must equal `HookedLALM.prepare`'s, logits its forward's; returns the max |logit diff|."""
    model = HookedLALM.from_hf(copy.deepcopy(hf_model), processor, port=PORT)  # the bridge rewraps its layers
    worst = 0.0
    for attribute in ATTRIBUTES:
        track = get_track(attribute)
        for index in range(n_clips):
            label = track.labels[index % len(track.labels)]
            wave = synthetic_clip(attribute, label, clip_rng(HELDOUT_SEED, attribute, label, 1000 + index))
            inp = model.prepare(wave, track.prompt, track.response_prefix, options=track.labels)
            features, n_frames = mel_features(processor, wave)
            n_rows = int(audio_rows(hf_model.model.audio_tower, torch.tensor(n_frames)))
            tokens = prompts(attribute, n_rows)
            if not torch.equal(tokens, inp.tokens[0]):
                raise AssertionError(f"{attribute}: the training tokens differ from HookedLALM.prepare's")
            with torch.no_grad():
                ours = last_logits(hf_model, [Example(attribute, label, features, n_frames, tokens, 0)])[0]
                theirs = model(inp)[0, -1]
            worst = max(worst, (ours - theirs).abs().max().item())
    if worst > 1e-3:
        raise AssertionError(f"the cropped forward differs from HookedLALM by {worst:.3g} in the last logits")
    return worst


# -- training and scoring ---------------------------------------------------------------------------------------------


def option_ids(tokenizer: Any) -> dict[str, dict[str, int]]:
    return {a: answer_tokens(tokenizer, get_track(a).labels) for a in ATTRIBUTES}


def accuracy(hf_model: nn.Module, examples: list[Example], options: dict[str, dict[str, int]], batch_size: int = 64) -> dict[str, float]:
    """Per track: how often the argmax among the option answer tokens is the label (the tracing rule)."""
    right: dict[str, list[bool]] = {a: [] for a in ATTRIBUTES}
    hf_model.eval()
    with torch.no_grad():
        for start in range(0, len(examples), batch_size):
            batch = examples[start : start + batch_size]
            logits = last_logits(hf_model, batch)
            for e, row in zip(batch, logits, strict=True):
                ids = options[e.attribute]
                predicted = max(ids, key=lambda label: float(row[ids[label]]))
                right[e.attribute].append(predicted == e.label)
    return {a: float(np.mean(v)) for a, v in right.items() if v}


def sinusoids(length: int, channels: int) -> torch.Tensor:
    """Whisper's fixed sinusoidal position table (the audio tower's positions are not trained)."""
    log_step = math.log(10000) / (channels // 2 - 1)
    inv = torch.exp(-log_step * torch.arange(channels // 2))
    angle = torch.arange(length)[:, None] * inv[None, :]
    return torch.cat([torch.sin(angle), torch.cos(angle)], dim=1)


def train(
    hf_model: nn.Module, examples: list[Example], steps: int, batch_size: int, lr: float, seed: int, log_every: int = 50
) -> list[float]:
    """AdamW with warm-up and cosine decay; cross-entropy over the full vocabulary at the last position."""
    generator = torch.Generator().manual_seed(seed)
    params = [p for p in hf_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=WEIGHT_DECAY, betas=(0.9, 0.98))
    warmup = max(1, steps // 20)

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    per_track = {a: sum(e.attribute == a for e in examples) for a in ATTRIBUTES}
    weights = torch.tensor([1.0 / per_track[e.attribute] for e in examples], dtype=torch.float64)
    losses = []
    hf_model.train()
    start = time.time()
    for step in range(steps):
        picked = torch.multinomial(weights, batch_size, replacement=False, generator=generator)
        batch = [examples[i] for i in picked.tolist()]  # each track a quarter of a batch, on average
        logits = last_logits(hf_model, batch)
        loss = F.cross_entropy(logits, torch.tensor([e.target for e in batch]))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
        if (step + 1) % log_every == 0:
            recent = float(np.mean(losses[-log_every:]))
            print(f"step {step + 1}/{steps}  loss {recent:.4f}  {time.time() - start:.0f}s", flush=True)
    hf_model.eval()
    return losses


def score_saved(out: Path, n_per_label: int) -> dict[str, dict[str, float]]:
    """Load the saved checkpoint by the hub code path and score a few held-out clips (clean and silent)."""
    model = HookedLALM.from_pretrained(str(out))
    options = option_ids(model.tokenizer)
    right: dict[str, dict[str, list[bool]]] = {"clean": {}, "silent": {}}
    for attribute in ATTRIBUTES:
        track = get_track(attribute)
        for index in range(n_per_label):
            for label in track.labels:
                wave = synthetic_clip(attribute, label, clip_rng(HELDOUT_SEED, attribute, label, index))
                for condition, audio in (("clean", wave), ("silent", np.zeros_like(wave))):
                    inp = model.prepare(audio, track.prompt, track.response_prefix, options=track.labels)
                    with torch.no_grad():
                        row = model(inp)[0, -1]
                    ids = options[attribute]
                    predicted = max(ids, key=lambda o: float(row[ids[o]]))
                    right[condition].setdefault(attribute, []).append(predicted == label)
    return {c: {a: float(np.mean(v)) for a, v in per.items()} for c, per in right.items()}


def _generator_sha256() -> str:
    """SHA-256 of the synthetic generator's modules (in name order): which generator made the clips."""
    digest = hashlib.sha256()
    for path in sorted(Path(synthetic.__file__).parent.glob("*.py")):
        digest.update(path.read_bytes())
    return digest.hexdigest()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("audiolens_ct/assets/demo_model"))
    parser.add_argument("--seed", type=int, default=0, help="model initialisation and batch order")
    parser.add_argument("--steps", type=int, default=1600)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--train-per-track", type=int, default=1500, help="training clips per track")
    parser.add_argument("--heldout-per-track", type=int, default=120, help="held-out clips per track")
    parser.add_argument("--n-hub-check", type=int, default=2, help="held-out clips per label scored via from_pretrained")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    wall0, cpu0 = time.time(), time.process_time()

    hf_model, processor = tiny_model(PORT, seed=args.seed, audio_config=AUDIO_CONFIG, text_config=TEXT_CONFIG)
    tower = hf_model.model.audio_tower
    with torch.no_grad():
        tower.embed_positions.weight.copy_(sinusoids(*tower.embed_positions.weight.shape))
    prompts = PromptTokens(hf_model, processor)
    diff = check_against_hooked(hf_model, processor, prompts)
    print(f"cropped forward == HookedLALM (max |logit diff| {diff:.2e})", flush=True)

    t0 = time.time()
    train_set = make_examples(hf_model, processor, prompts, TRAIN_SEED, args.train_per_track)
    heldout = make_examples(hf_model, processor, prompts, HELDOUT_SEED, args.heldout_per_track)
    silent = make_examples(hf_model, processor, prompts, HELDOUT_SEED, args.heldout_per_track, silent=True)
    print(f"{len(train_set)} training, {len(heldout)} held-out clips in {time.time() - t0:.0f}s", flush=True)

    losses = train(hf_model, train_set, args.steps, args.batch_size, args.lr, args.seed)
    options = option_ids(processor.tokenizer)
    clean_acc, silent_acc = accuracy(hf_model, heldout, options), accuracy(hf_model, silent, options)
    diff_after = check_against_hooked(hf_model, processor, prompts)

    args.out.mkdir(parents=True, exist_ok=True)
    hf_model.save_pretrained(args.out)
    processor.save_pretrained(args.out)
    for path in args.out.iterdir():
        path.chmod(0o644)  # safetensors writes 0600; package data must be readable by every user
    hub = score_saved(args.out, args.n_hub_check)
    cpu, wall = time.process_time() - cpu0, time.time() - wall0
    n_params = sum(p.numel() for p in hf_model.parameters())
    size = sum(f.stat().st_size for f in args.out.iterdir() if f.is_file() and f.name != "TRAINING.json")
    record = {
        "command": "HF_HUB_OFFLINE=1 .venv/bin/python scripts/train_demo_model.py " + " ".join(
            f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k != "out"
        ),
        "seed": args.seed,
        "train_clip_seed": TRAIN_SEED,
        "heldout_clip_seed": HELDOUT_SEED,
        "steps": args.steps,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "weight_decay": WEIGHT_DECAY,
        "threads": args.threads,
        "train_clips": {a: sum(e.attribute == a for e in train_set) for a in ATTRIBUTES},
        "heldout_clips": {a: sum(e.attribute == a for e in heldout) for a in ATTRIBUTES},
        "audio_config": AUDIO_CONFIG,
        "text_config": TEXT_CONFIG,
        "parameters": n_params,
        "checkpoint_bytes": size,
        "final_loss": float(np.mean(losses[-50:])),
        "cpu_seconds": round(cpu, 1),
        "wall_seconds": round(wall, 1),
        "heldout_accuracy_clean": clean_acc,
        "heldout_accuracy_silent": silent_acc,
        "chance": {a: 1 / len(get_track(a).labels) for a in ATTRIBUTES},
        "hub_path_check": {"clips_per_label": args.n_hub_check, **hub},
        "cropped_forward_max_logit_diff": diff_after,
        "torch": torch.__version__,
        "synthetic_generator_sha256": _generator_sha256(),
    }
    (args.out / "TRAINING.json").write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
