"""Attention to the audio: how much each head looks at the audio rows, and which heads' looking goes with answering.

Causal tracing asks where restoring the audio brings the answer back. A cheaper, descriptive question is where the
model *looks*: the attention mass of head h at layer l from a query position onto the audio rows,

    mass(l, h) = sum over audio rows s of pattern[l, h, query, s],

the share of that head's attention (its softmax sums to 1) that the query spends on the clip. AudioLens found that
LALMs query the audio at the last position rather than storing it at the tokens that name the attribute; so the
mass is read from the **last position** (where the answer is produced) and, as a control, from the **object
tokens** (the option list), in the clean run and in the corrupted one (silence): a head whose mass stays when the
clip is silent is looking at the audio rows' position, not at what they hold.

"Are Audio-Language Models Listening?" (arXiv 2603.06854) ranks heads by how their audio attention goes with
answering correctly: over a set of clips, the correlation between a head's mass from the last position in the
clean run and whether the model's answer was right (a point-biserial correlation: Pearson's r against 0/1).
`head_ranking` computes it per (layer, head) and lists the heads from the most positive r down.

The masses are read from TransformerLens's `blocks.{l}.attn.hook_pattern` (post-softmax, one row per *query*
head, so with grouped-query attention each of the query heads sharing a key/value head has its own mass) and
reduced inside the hook, so a 32-layer model on a 30-s clip keeps `[layers, heads]` numbers, not every pattern.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from jaxtyping import Float
from scipy import stats
from transformer_lens.utilities import get_act_name

from audiolens_ct.errors import InputError
from audiolens_ct.inputs import LALMInput

if TYPE_CHECKING:
    from audiolens_ct.model import HookedLALM

QUERY_GROUPS = ("last", "object")
"""Where the attention is read from: the last position (the answer) and the object tokens (the option list)."""

RUNS = ("clean", "corrupted")


def pattern_name(layer: int) -> str:
    """TransformerLens's post-softmax attention pattern of `layer`, `[batch, query_heads, query_pos, key_pos]`."""
    return get_act_name("pattern", layer)


def audio_attention(
    model: HookedLALM, inp: LALMInput, queries: Mapping[str, Sequence[int]]
) -> dict[str, Float[np.ndarray, "layers heads"]]:
    """Attention mass onto `inp`'s audio rows, per (layer, query head), from each named group of query positions.

    A group's mass is the mean over its query positions (and over the batch rows: noise copies) of the pattern
    summed over the audio rows. One forward pass; each layer's pattern is reduced as it passes.
    """
    length = inp.shape[1]
    groups = {name: list(positions) for name, positions in queries.items()}
    for name, positions in groups.items():
        if not positions or not all(-length <= p < length for p in positions):
            raise InputError(f"query group {name!r}: positions {positions} are empty or outside the {length}-position input")
    audio = torch.tensor(inp.audio_positions, device=inp.device)
    masses: dict[str, list[torch.Tensor]] = {name: [None] * model.cfg.n_layers for name in groups}

    def reduce(pattern: Float[torch.Tensor, "batch heads q k"], hook: Any, layer: int) -> None:
        onto_audio = pattern.index_select(-1, audio.to(pattern.device)).sum(-1, dtype=torch.float64)
        for name, positions in groups.items():
            masses[name][layer] = onto_audio[:, :, positions].mean(dim=(0, 2)).cpu()

    hooks = [(pattern_name(layer), partial(reduce, layer=layer)) for layer in range(model.cfg.n_layers)]
    with torch.no_grad():
        model.run_with_hooks(inp, fwd_hooks=hooks)
    return {name: torch.stack(per_layer).numpy() for name, per_layer in masses.items()}


def query_groups(clean: LALMInput, corrupted: LALMInput) -> tuple[dict[str, list[int]], dict[str, list[int]]]:
    """The query groups (`QUERY_GROUPS`) in the clean input and in the corrupted one, aligned from the end of the
    sequence (the text after the audio is the same in both; a DeSTA transcript may shift it). A prompt without
    object tokens has only `last`."""
    segments = clean.segments or {}
    last = clean.shape[1] - 1
    groups = {"last": [last], "object": list(segments.get("object", []))}
    groups = {name: positions for name, positions in groups.items() if positions}
    offset = corrupted.shape[1] - clean.shape[1]
    return groups, {name: [p + offset for p in positions] for name, positions in groups.items()}


def attention_record(model: HookedLALM, clean: LALMInput, corrupted: LALMInput) -> dict[str, Any]:
    """One clip's attention to its audio, JSON-ready: `{group: {"clean": [layers][heads], "corrupted": ...}}` for
    each query group of `query_groups` (two forward passes)."""
    clean_groups, corrupted_groups = query_groups(clean, corrupted)
    runs = {"clean": audio_attention(model, clean, clean_groups), "corrupted": audio_attention(model, corrupted, corrupted_groups)}
    return {group: {run: runs[run][group].tolist() for run in RUNS} for group in clean_groups}


@dataclass
class HeadRanking:
    """Heads ranked by the correlation of their audio attention with answering correctly, over a set of clips.

    Attributes:
        r: Pearson r between a head's mass and correctness (0/1), `[layers, heads]`; NaN where it is undefined
            (every clip right, every clip wrong, or a head whose mass does not vary).
        p: the two-sided p-value of each r (NaN where r is).
        n: clips in the set; correct: how many the model answered right.
        order: `(layer, head)` of every defined r, from the largest r down.
    """

    r: Float[np.ndarray, "layers heads"]
    p: Float[np.ndarray, "layers heads"]
    n: int
    correct: int
    order: list[tuple[int, int]]

    def top(self, k: int = 10) -> list[dict[str, Any]]:
        """The first `k` heads of the ranking, JSON-ready: layer, head, r, p."""
        return [
            {"layer": layer, "head": head, "r": float(self.r[layer, head]), "p": float(self.p[layer, head])}
            for layer, head in self.order[:k]
        ]


def head_ranking(
    masses: Float[np.ndarray, "clips layers heads"], correct: Sequence[bool]
) -> HeadRanking:
    """Rank heads by the correlation (2603.06854) of their audio attention `masses` with `correct`, over clips."""
    masses = np.asarray(masses, dtype=np.float64)
    right = np.asarray(correct, dtype=np.float64)
    if masses.ndim != 3 or masses.shape[0] != len(right):
        raise InputError(f"head_ranking needs masses [clips, layers, heads] for {len(right)} clips, got shape {masses.shape}")
    r = np.full(masses.shape[1:], np.nan)
    p = np.full(masses.shape[1:], np.nan)
    if len(right) >= 3 and 0 < right.sum() < len(right):
        for layer, head in np.ndindex(*r.shape):
            column = masses[:, layer, head]
            if np.ptp(column) > 0:
                result = stats.pearsonr(column, right)
                r[layer, head], p[layer, head] = result.statistic, result.pvalue
    defined = [(layer, head) for layer, head in np.ndindex(*r.shape) if not math.isnan(r[layer, head])]
    order = sorted(defined, key=lambda cell: -r[cell])
    return HeadRanking(r, p, len(right), int(right.sum()), order)
