"""Scoring: the answer token of each option, the probability a run gives it, and the paper's exclusion rules.

Answer tokens (documented in the README and tested): an option is scored by the first token of `" " + option`, the
token a BPE model actually emits after a response prefix ending in "... is". (AudioLens scored the first sub-token
written without the space, which a model rarely produces at that point.) The options' first tokens must be
distinct, or two options would share one probability; that is checked and reported by name.

P is the softmax over the full vocabulary at the last position, read at the answer token, averaged over the
corrupted copies of a batch (ROME's noise copies; one row otherwise). A run "predicts" the option whose answer
token has the highest probability among the options' answer tokens.

Exclusion (the paper's rules, checked in this order; the first that holds is the reason): `clean_wrong` (the clean
run does not predict the target), `corrupted_right` (the corrupted run still predicts it), `no_drop`
(P_clean <= P_corrupted). An excluded clip keeps P_clean and P_corrupted but no RR, so RR is never NaN or infinite.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from jaxtyping import Float

from audiolens_ct.errors import InputError


def answer_token(tokenizer: Any, option: str) -> int:
    """The id of the first token of `" " + option` (no special tokens)."""
    ids = tokenizer.encode(" " + option.strip(), add_special_tokens=False)
    if not ids:
        raise InputError(f"the option {option!r} encodes to no tokens")
    return int(ids[0])


def answer_tokens(tokenizer: Any, options: Sequence[str]) -> dict[str, int]:
    """Map each option to its answer token; a clear error when two options share a first token."""
    if not options:
        raise InputError("no answer options given")
    if len(set(options)) != len(options):
        raise InputError(f"the options contain duplicates: {list(options)}")
    ids = {option: answer_token(tokenizer, option) for option in options}
    by_id: dict[int, list[str]] = {}
    for option, token in ids.items():
        by_id.setdefault(token, []).append(option)
    clashes = [names for names in by_id.values() if len(names) > 1]
    if clashes:
        described = "; ".join(
            f"{', '.join(repr(n) for n in names)} all start with token {tokenizer.decode([ids[names[0]]])!r}"
            for names in clashes
        )
        raise InputError(
            f"answer options must start with distinct tokens, but {described}; "
            "rename the options (e.g. 'kitten' for 'cat') so each has its own first token"
        )
    return ids


def answer_distribution(last_logits: Float[torch.Tensor, "copies vocab"]) -> Float[torch.Tensor, " vocab"]:
    """The softmax over the vocabulary (float32), averaged over the copies in float64."""
    return last_logits.float().softmax(-1).double().mean(0)


def answer_probability(last_logits: Float[torch.Tensor, "copies vocab"], target: int) -> Float[torch.Tensor, ""]:
    """P(target) from a run's last-position logits: the metric every engine evaluates."""
    return last_logits.float().softmax(-1)[:, target].double().mean()


def predicted_option(distribution: Float[torch.Tensor, " vocab"], option_ids: dict[str, int]) -> str:
    """The option whose answer token is most probable (first listed wins a tie)."""
    return max(option_ids, key=lambda option: float(distribution[option_ids[option]]))


EXCLUSION_REASONS = ("non_finite", "clean_wrong", "corrupted_right", "no_drop")


def exclusion_reason(
    target: str, p_clean: float, p_corrupted: float, clean_prediction: str, corrupted_prediction: str
) -> str | None:
    """Why the paper's rules drop a clip (`EXCLUSION_REASONS`, first that holds), or None when it is kept."""
    if not (math.isfinite(p_clean) and math.isfinite(p_corrupted)):
        return "non_finite"
    if clean_prediction != target:
        return "clean_wrong"
    if corrupted_prediction == target:
        return "corrupted_right"
    if p_clean <= p_corrupted:
        return "no_drop"
    return None
