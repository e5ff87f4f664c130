"""The logit lens: what the answer would be if the model stopped at layer l (AudioLens, arXiv 2506.05140).

Causal tracing asks which hidden states carry the audio information; the logit lens asks, observationally, what
each layer's residual stream already says about the answer. The residual stream after layer l at one position,
`blocks.{l}.hook_resid_post`, is passed through the model's own final norm and unembedding, as if the remaining
layers were skipped: P_l(option) = softmax(unembed(ln_final(resid_post[l])))[answer token of the option]. At the
last layer this is the model's own output distribution.

- **Scoring** is tracing's (`tracing/scoring.py`): an option's answer token is the first token of `" " + option`,
  the token the model emits after a response prefix ending in "... is", and the softmax is over the whole
  vocabulary. AudioLens read the first sub-token of the option written *without* the leading space
  (`tokenizer.tokenize("female")[0]`), which a BPE model rarely produces at that point; its probabilities are
  therefore not comparable one for one with these.
- **Positions.** The default is the last position, where the answer is predicted. AudioLens also reads the
  *attribute-mentioning position*: it writes the response prefix reversed, so that it names the attribute first
  ("The gender of the speaker" instead of "The speaker's gender is", `REVERSED_PREFIXES`), and reads the lens at
  the token of the attribute word ("gender"). If the model gathered the answer there, the option would be
  decodable at that position; AudioLens found it mostly is not (the model queries the audio at the last position
  instead). `attribute_position` finds that token in any prepared input (the last token of the word's last
  occurrence after the audio, so a word split in several tokens is read where it is complete).
- **Critical layer** (AudioLens): the first layer at which the correct option is the most probable of the
  options; None when it never is. AudioLens found that the earlier a model resolves an attribute, the more often it
  is right.

`lens_over_samples` reads the lens of every clip of a data set at the last position and at the attribute position
of the reversed prefix, with the clip's audio and with silence (the tracing corruption), and averages per attribute
(per option over the clips labelled with it; the correct option over every clip; the critical layer), with the
95% intervals of `aggregate.summarise`. `audiolens-ct lens` writes it to `lens.json` (`observations.py`), and the
report shows it next to the layer-wise RR.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from jaxtyping import Float
from tqdm.auto import tqdm
from transformer_lens.utilities import get_act_name

from audiolens_ct.aggregate import INTERVAL, summarise
from audiolens_ct.errors import SAMPLE_ERRORS, InputError
from audiolens_ct.inputs import LALMInput, text_after_audio
from audiolens_ct.tracing.scoring import answer_tokens
from audiolens_ct.twins import ClipPair, clip_pair

if TYPE_CHECKING:
    from audiolens_ct.data.sample import Sample
    from audiolens_ct.model import HookedLALM

REVERSED_PREFIXES = {
    "animal": "The animal in the sound file",
    "emotion": "The emotion of the speaker",
    "gender": "The gender of the speaker",
    "language": "The spoken language of the speech",
}
"""AudioLens's reversed response prefixes: the attribute word (the track's name) comes first, no " is" after."""
POSITIONS = ("last", "attribute")
AUDIO = ("clean", "silent")


def lens_distribution(model: HookedLALM, resid: Float[torch.Tensor, "... d_model"]) -> Float[torch.Tensor, "... vocab"]:
    """softmax(unembed(ln_final(resid))) over the whole vocabulary, in float32: the lens of residual vectors."""
    return model.unembed(model.ln_final(resid)).float().softmax(-1)


def logit_lens(
    model: HookedLALM, inp: LALMInput, options: Sequence[str], position: int = -1
) -> Float[torch.Tensor, "batch n_layers n_options"]:
    """P(each option's answer token) read from `resid_post` of every layer at `position` (default: the last).

    One forward with a cache of the residual stream; layer l's row is what the model would answer if it stopped
    after layer l, the last row its own output distribution.
    """
    option_ids = answer_tokens(model.tokenizer, options)
    length = inp.shape[1]
    if not -length <= position < length:
        raise InputError(f"position {position} is outside the input's {length} positions")
    resid = resid_post_at(model, inp, range(model.cfg.n_layers), position)
    with torch.no_grad():
        return lens_distribution(model, resid)[..., list(option_ids.values())].cpu()


def resid_post_at(
    model: HookedLALM, inp: LALMInput, layers: Sequence[int], position: int = -1
) -> Float[torch.Tensor, "batch n_layers d_model"]:
    """`resid_post` of each of `layers` at `position` (one forward, caching only those)."""
    names = [get_act_name("resid_post", layer) for layer in layers]
    with torch.no_grad():
        _, cache = model.run_with_cache(inp, names_filter=names)
    return torch.stack([cache[name][:, position] for name in names], dim=1)


def attribute_position(model: HookedLALM, inp: LALMInput, word: str) -> int:
    """The position of the last token of the last occurrence of `word` (case-insensitive) after the audio."""
    text, ends = text_after_audio(model.tokenizer, inp)
    found = list(re.finditer(re.escape(word.strip()), text, flags=re.IGNORECASE))
    if not word.strip() or not found:
        raise InputError(f"the word {word!r} does not occur in the text after the audio: {text!r}")
    end = found[-1].end()
    return inp.first_text_after_audio + next(j for j, piece_end in enumerate(ends) if piece_end >= end)


def critical_layer(probs: Float[np.ndarray, "n_layers n_options"], options: Sequence[str], target: str) -> int | None:
    """The first layer at which `target` is the most probable option (first listed wins a tie), or None."""
    if target not in options:
        raise InputError(f"the target {target!r} is not among the options {list(options)}")
    probs = np.asarray(probs)
    target_index = list(options).index(target)
    top = probs.argmax(axis=-1)
    hits = np.flatnonzero(top == target_index)
    return int(hits[0]) if hits.size else None


def _reading(probs: torch.Tensor, options: Sequence[str], target: str, position: int) -> dict[str, Any]:
    grid = probs[0].double().numpy()
    return {"position": position, "probs": grid.tolist(), "critical_layer": critical_layer(grid, options, target)}


def lens_sample(
    model: HookedLALM, sample: Sample, prefixes: dict[str, str] = REVERSED_PREFIXES,
    prepared: dict[tuple[str, str], ClipPair] | None = None,
) -> dict[str, Any]:
    """One clip's lens readings, JSON-ready: `{position: {audio: {position, probs [n_layers, n_options],
    critical_layer}}}` at the last position (the clip's own prefix) and, when the attribute has a reversed prefix
    in `prefixes`, at the attribute position; audio "clean" (the clip) and "silent" (its silence twin)."""
    pair = clip_pair(model, sample, prepared)
    pairs = {"last": pair}
    if sample.attribute in prefixes:
        pairs["attribute"] = pair.with_prefix(model, prefixes[sample.attribute])
    options = list(sample.options)
    out: dict[str, Any] = {}
    for kind, twins in pairs.items():
        out[kind] = {}
        for audio, inp in (("clean", twins.clean), ("silent", twins.silent)):
            position = inp.shape[1] - 1 if kind == "last" else attribute_position(model, inp, sample.attribute)
            out[kind][audio] = _reading(logit_lens(model, inp, options, position), options, sample.label, position)
    return out


def lens_over_samples(
    model: HookedLALM, samples: Sequence[Sample], progress: bool = True, prefixes: dict[str, str] = REVERSED_PREFIXES,
    prepared: dict[tuple[str, str], ClipPair] | None = None,
) -> dict[str, Any]:
    """The lens of every clip (`lens_sample`) and per-attribute means: what `lens.json` holds (module docstring).

    A clip that cannot be read is recorded with its error and left out of the means; the run goes on. `prepared`:
    clip pairs to reuse (`twins.clip_pair`).
    """
    records = []
    for sample in tqdm(samples, desc="logit lens", unit="clip", disable=not progress):
        record = {"sample_id": sample.id, "attribute": sample.attribute, "label": sample.label,
                  "options": list(sample.options)}  # fmt: skip
        if not sample.ok:
            records.append({**record, "error": sample.error})
            continue
        try:
            records.append({**record, "lens": lens_sample(model, sample, prefixes, prepared)})
        except SAMPLE_ERRORS as exc:
            records.append({**record, "error": str(exc)})
    attributes = dict.fromkeys(r["attribute"] for r in records)
    return {
        "model": model.model_name,
        "n_layers": model.cfg.n_layers,
        "interval": INTERVAL,
        "attributes": {a: lens_aggregate([r for r in records if r["attribute"] == a]) for a in attributes},
        "samples": records,
    }


def lens_aggregate(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Per position and audio: P(option) per layer over the clips labelled with that option (`per_option`),
    P(correct option) over every clip (`correct`), the final layer's option accuracy, and the critical layer
    (mean with interval over the clips that reach one, and the fraction that do). Each clip is scored against its
    own options (a manifest may give clips of one attribute different option lists)."""
    read = [r for r in records if "lens" in r]
    out: dict[str, Any] = {
        "counts": {"samples": len(records), "read": len(read), "errors": len(records) - len(read)},
        "errors": [{"sample_id": r["sample_id"], "error": r["error"]} for r in records if "error" in r],
        "options": list(dict.fromkeys(option for r in read for option in r["options"])),
        "positions": {},
    }
    for kind in POSITIONS:
        rows = [r for r in read if kind in r["lens"]]
        if rows:
            out["positions"][kind] = {audio: _summary([(r, r["lens"][kind][audio]) for r in rows]) for audio in AUDIO}
    return out


def _summary(pairs: Sequence[tuple[dict[str, Any], dict[str, Any]]]) -> dict[str, Any]:
    """`lens_aggregate`'s statistics of one (position, audio) over (record, reading) pairs."""
    correct, right, per_option = [], [], {}
    for record, reading in pairs:
        grid = np.asarray(reading["probs"])
        target = record["options"].index(record["label"])
        correct.append(grid[:, target])
        right.append(bool(grid[-1].argmax() == target))
        per_option.setdefault(record["label"], []).append(grid[:, target])
    reached = [reading["critical_layer"] for _, reading in pairs if reading["critical_layer"] is not None]
    return {
        "per_option": {option: summarise(curves) for option, curves in per_option.items()},
        "correct": summarise(correct),
        "accuracy": float(np.mean(right)),
        "critical_layer": summarise(np.asarray(reached, dtype=np.float64)) if reached else None,
        "resolved": len(reached) / len(pairs),
        "n": len(pairs),
    }
