"""Audio–silence steering: push the residual stream along the direction the audio moves it ("Are Audio-Language
Models Listening?", arXiv 2603.06854).

Tracing's silence corruption says how much of the answer the audio carries; steering acts on it. The direction is
what the audio adds to the last position's residual stream: s(x) = mean over a layer set of
(clean − silent) `resid_post` at the last position, for one clip x and its silent twin, or averaged over a
calibration set of clips (`audio_silence_direction`). A hook then adds β·s to `blocks.{l}.hook_resid_post` at
chosen layers and positions (`SteeringVector.hooks`), in a plain forward (`run_with_hooks`) or during
`HookedLALM.generate` (greedy or sampled; the hook fires at every step, on the prompt's last position in the
prefill and on each new token after). β > 0 amplifies what the audio contributes, β < 0 moves the model towards
what it does without audio, β = 0 changes nothing.

Positions: "last" adds at the last position of every pass (the position the next token is read from: the prompt's
last token, then each generated token), as the paper does; "all" adds at every position.

`steering_sweep` evaluates a set of β on held-out clips of a data set: per attribute, the option accuracy (the
prediction is the most probable option's answer token at the last position, as in tracing) and the fraction of
answers that change from the unsteered model's, with each clip's own s(x) or with one direction from a calibration
split. `audiolens-ct steer` writes it to `steering.json`; the report draws accuracy against β.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from jaxtyping import Float
from tqdm.auto import tqdm
from transformer_lens.utilities import get_act_name

from audiolens_ct.choices import STEERING_BETAS, STEERING_POSITIONS
from audiolens_ct.errors import SAMPLE_ERRORS, InputError
from audiolens_ct.inputs import LALMInput
from audiolens_ct.lens import resid_post_at
from audiolens_ct.tracing.scoring import answer_tokens, predicted_option
from audiolens_ct.twins import ClipPair, ask, clip_pair

if TYPE_CHECKING:
    from audiolens_ct.data.sample import Sample
    from audiolens_ct.model import HookedLALM


@dataclass(frozen=True)
class SteeringVector:
    """An audio–silence direction: `vector` is the mean (clean − silent) `resid_post` at the last position over
    `layers` and `n_clips` clips."""

    vector: Float[torch.Tensor, " d_model"]
    layers: tuple[int, ...]
    n_clips: int

    def hooks(
        self, beta: float | Float[torch.Tensor, " batch"], layers: Sequence[int] | None = None, positions: str = "last"
    ) -> list[tuple[str, Any]]:
        """Forward hooks adding `beta` · vector to `resid_post` at `layers` (default: the layers the direction was
        averaged over) and `positions` ("last" or "all"); for `run_with_hooks`, `hooks` or `generate`. A tensor
        `beta` gives each batch row its own β."""
        return steering_hooks(self.vector, beta, self.layers if layers is None else layers, positions)


def steering_hooks(
    vector: Float[torch.Tensor, " d_model"], beta: float | Float[torch.Tensor, " batch"], layers: Iterable[int],
    positions: str = "last",
) -> list[tuple[str, Any]]:
    """Forward hooks on `blocks.{l}.hook_resid_post` that add `beta` · `vector` at the last position of each pass
    ("last") or at every position ("all"); see `SteeringVector.hooks`."""
    _checked_positions(positions)
    scale = torch.as_tensor(beta, dtype=torch.float32).reshape(-1, 1)

    def add(resid: Float[torch.Tensor, "batch pos d_model"], hook: Any) -> torch.Tensor:
        shift = (scale.to(resid.device) * vector.to(resid.device, torch.float32)).to(resid.dtype)
        out = resid.clone()
        if positions == "last":
            out[:, -1] += shift
        else:
            out += shift[:, None]
        return out

    return [(get_act_name("resid_post", layer), add) for layer in _checked_layers(layers)]


def _checked_positions(positions: str) -> None:
    if positions not in STEERING_POSITIONS:
        raise InputError(f"unknown steering positions {positions!r}; use one of {', '.join(STEERING_POSITIONS)}")


def _checked_layers(layers: Iterable[int], n_layers: int | None = None) -> tuple[int, ...]:
    """`layers` as a tuple, refused when empty or (given the model's `n_layers`) naming a layer it lacks."""
    layers = tuple(int(layer) for layer in layers)
    if not layers:
        raise InputError("no steering layers given")
    bad = [layer for layer in layers if n_layers is not None and not 0 <= layer < n_layers]
    if bad:
        raise InputError(f"layers {bad} do not exist: the model has layers 0..{n_layers - 1}")
    return layers


def last_resid(
    model: HookedLALM, inp: LALMInput, layers: Sequence[int]
) -> Float[torch.Tensor, "batch n_layers d_model"]:
    """`resid_post` at the last position of each of `layers` (one forward, caching only those), in float32."""
    return resid_post_at(model, inp, layers).float()


def audio_silence_direction(
    model: HookedLALM, pairs: Iterable[tuple[LALMInput, LALMInput]], layers: Sequence[int] | None = None
) -> SteeringVector:
    """The mean over `pairs` (each a clean input and its silent twin, batch 1) and over `layers` (default: the last,
    the paper's final representation) of (clean − silent) `resid_post` at the last position.

        silent = model.prepare_like(clean, np.zeros_like(wave))
        s = audio_silence_direction(model, [(clean, silent)])     # s(x); several pairs: a calibration direction
    """
    layers = _checked_layers(layers if layers is not None else [model.cfg.n_layers - 1], model.cfg.n_layers)
    total, count = None, 0
    for clean, silent in pairs:
        diff = (last_resid(model, clean, layers) - last_resid(model, silent, layers)).mean(dim=1).sum(dim=0)
        total, count = diff if total is None else total + diff, count + len(clean)
    if total is None:
        raise InputError("audio_silence_direction needs at least one (clean, silent) pair")
    return SteeringVector(total / count, layers, count)


def steered_predictions(
    model: HookedLALM, inp: LALMInput, direction: SteeringVector, betas: Sequence[float], options: Sequence[str],
    layers: Sequence[int] | None = None, positions: str = "last",
) -> tuple[list[str], Float[np.ndarray, "n_betas n_options"]]:
    """The predicted option, and each option's answer-token probability, of `inp` (batch 1) steered with each β:
    one forward with a batch row per β."""
    option_ids = answer_tokens(model.tokenizer, options)
    beta = torch.tensor(list(betas), dtype=torch.float32)
    with torch.no_grad():
        rows = model.audio_embeddings(inp)  # computed once, shared by every β row
        batch = replace(LALMInput.stack([inp] * len(betas)), audio_embeds_override=rows.expand(len(betas), -1, -1))
        logits = model.run_with_hooks(batch, fwd_hooks=direction.hooks(beta, layers, positions))[:, -1]
    probs = logits.float().softmax(-1).double().cpu()
    return [predicted_option(row, option_ids) for row in probs], probs[:, list(option_ids.values())].numpy()


def _split(samples: Sequence[Sample], fraction: float, seed: int) -> tuple[list[Sample], list[Sample]]:
    """Per attribute, a seeded `fraction` of the clips for calibration (at least one) and the rest held out."""
    calibration, held_out = [], []
    for attribute in dict.fromkeys(s.attribute for s in samples):
        clips = sorted((s for s in samples if s.attribute == attribute), key=lambda s: s.id)
        random.Random(f"{seed}:{attribute}").shuffle(clips)
        k = max(1, round(fraction * len(clips)))
        calibration += clips[:k]
        held_out += clips[k:]
    return calibration, held_out


def steering_sweep(
    model: HookedLALM, samples: Sequence[Sample], betas: Sequence[float] = STEERING_BETAS,
    layers: Sequence[int] | None = None, positions: str = "last", calibration: float | None = None, seed: int = 0,
    progress: bool = True, prepared: dict[tuple[str, str], ClipPair] | None = None,
) -> dict[str, Any]:
    """Sweep β on held-out clips: per attribute, option accuracy and the fraction of answers changed from β = 0.

    With `calibration` None each clip is steered along its own s(x) (the direction needs its silent twin); with a
    fraction in (0, 1), that seeded share of each attribute's clips makes one direction (`audio_silence_direction`)
    and only the rest are evaluated. `layers`: where the direction is read and added (default: the last layer).
    A clip that cannot be read is recorded with its error; the sweep goes on. `prepared`: clip pairs to reuse
    (`twins.clip_pair`). Returns what `steering.json` holds.
    """
    betas = sorted({float(b) for b in betas} | {0.0})
    layers = _checked_layers(layers if layers is not None else [model.cfg.n_layers - 1], model.cfg.n_layers)
    _checked_positions(positions)
    if calibration is not None and not 0 < calibration < 1:
        raise InputError(f"calibration must be a fraction in (0, 1) of each attribute's clips, got {calibration!r}")
    usable = [s for s in samples if s.ok]
    records = [_record(s, error=s.error) for s in samples if not s.ok]
    directions: dict[str, SteeringVector] = {}
    held_out = usable
    if calibration is not None:
        calibrating, held_out = _split(usable, calibration, seed)
        pairs: dict[str, list[tuple[LALMInput, LALMInput]]] = {}
        for sample in tqdm(calibrating, desc="steering: calibration", unit="clip", disable=not progress):
            try:
                pair = clip_pair(model, sample, prepared)
            except SAMPLE_ERRORS as exc:
                records.append(_record(sample, error=str(exc)))
                continue
            pairs.setdefault(sample.attribute, []).append((pair.clean, pair.silent))
            records.append(_record(sample, calibration=True))
        directions = {a: audio_silence_direction(model, p, layers) for a, p in pairs.items()}
    for sample in tqdm(held_out, desc="steering: β sweep", unit="clip", disable=not progress):
        if calibration is not None and sample.attribute not in directions:
            records.append(_record(sample, error=f"no calibration clip of {sample.attribute!r} could be read, so "
                                   "there is no direction to steer along"))  # fmt: skip
            continue
        try:
            records.append(_steer(model, sample, directions.get(sample.attribute), betas, layers, positions, prepared))
        except SAMPLE_ERRORS as exc:
            records.append(_record(sample, error=str(exc)))
    attributes = dict.fromkeys(s.attribute for s in samples)
    return {
        "model": model.model_name,
        "settings": {"betas": betas, "layers": list(layers), "positions": positions, "calibration": calibration,
                     "seed": seed, "direction": "per clip s(x)" if calibration is None else "calibration set"},
        "attributes": {a: steering_aggregate([r for r in records if r["attribute"] == a], betas, directions.get(a))
                       for a in attributes},
        "samples": records,
    }  # fmt: skip


def _record(sample: Sample, **fields: Any) -> dict[str, Any]:
    return {"sample_id": sample.id, "attribute": sample.attribute, "label": sample.label, **fields}


def _steer(
    model: HookedLALM, sample: Sample, direction: SteeringVector | None, betas: list[float], layers: tuple[int, ...],
    positions: str, prepared: dict[tuple[str, str], ClipPair] | None,
) -> dict[str, Any]:
    """One held-out clip's predictions and probabilities under each β (its own s(x) when `direction` is None)."""
    if direction is None or (prepared is not None and (sample.attribute, sample.id) in prepared):
        pair = clip_pair(model, sample, prepared)
        clean = pair.clean
        direction = direction or audio_silence_direction(model, [(pair.clean, pair.silent)], layers)
    else:
        clean = ask(model, sample, sample.load(model.port.sampling_rate))
    predictions, probs = steered_predictions(model, clean, direction, betas, sample.options, layers, positions)
    target = list(sample.options).index(sample.label)
    return _record(sample, predictions=predictions, p_correct=probs[:, target].tolist(),
                   direction_norm=float(direction.vector.norm()))  # fmt: skip


def steering_aggregate(
    records: Sequence[dict[str, Any]], betas: Sequence[float], direction: SteeringVector | None
) -> dict[str, Any]:
    """Per β: option accuracy, fraction of answers changed from β = 0, mean P(correct answer token); and the
    counts of clips (calibration clips made the direction and are not evaluated)."""
    steered = [r for r in records if "predictions" in r]
    errors = [r for r in records if "error" in r]
    unsteered = list(betas).index(0.0)
    out: dict[str, Any] = {
        "counts": {"samples": len(records), "calibration": len(records) - len(steered) - len(errors),
                   "evaluated": len(steered), "errors": len(errors)},
        "errors": [{"sample_id": r["sample_id"], "error": r["error"]} for r in errors],
        "betas": list(betas),
        "calibration_clips": direction.n_clips if direction is not None else None,
        "accuracy": None, "changed": None, "p_correct": None,
    }  # fmt: skip
    if steered:
        right = np.array([[p == r["label"] for p in r["predictions"]] for r in steered], dtype=np.float64)
        moved = np.array([[p != r["predictions"][unsteered] for p in r["predictions"]] for r in steered], dtype=np.float64)
        out.update(accuracy=right.mean(0).tolist(), changed=moved.mean(0).tolist(),
                   p_correct=np.array([r["p_correct"] for r in steered]).mean(0).tolist())  # fmt: skip
    return out
