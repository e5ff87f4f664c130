"""Answer-token resolution: which vocabulary id stands for each answer option.

Convention (documented in the README and tested): an option is scored by the first token of `" " + option`,
the token a BPE model actually emits after a response prefix ending in "... is". (AudioLens scored the first
sub-token written without the space, which a model rarely produces at that point.) The options' first tokens
must be distinct, or two options would share one probability; that is checked and reported by name.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

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
