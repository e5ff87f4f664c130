"""`TraceResult`: what one traced sample yields, serialisable to JSON or NPZ and back."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

_ARRAYS = ("layer_rr", "token_rr", "p_layer", "p_token", "time_rr", "p_time")


@dataclass
class TraceResult:
    """One sample's causal trace.

    Attributes:
        p_clean, p_corrupted: P(target answer token) at the last position, softmax over the full vocabulary.
        excluded: True when the paper's rules drop the sample; `exclusion_reason` says which rule.
        layer_rr: RR(l) of layer-wise tracing, `[n_layers]` (None if not run or excluded).
        token_rr: RR(l, i) of token-wise tracing, `[n_layers, len(positions)]` (None if not run or excluded).
        p_layer, p_token: the patched probabilities behind `layer_rr` / `token_rr`.
        positions: the sequence positions (clean run) of the `token_rr` columns: every text position after audio.
        str_tokens: the clean sequence's token strings.
        segments: positions of early_prompt / object / late_prompt / last.
        segment_rr: mean RR over each segment's positions per layer, `{segment: [n_layers]}`.
        span_rr: group-wise tracing, RR(l) with each span's positions restored jointly, `{span: [n_layers]}`
            (`p_span`: the patched probabilities; `span_positions`: each span's clean positions). A segment the
            prompt lacks is left out.
        time_rr: time-wise tracing, RR(l, t) over `[n_layers, len(time_windows)]` (`p_time`: the probabilities);
            `time_windows` holds each window's `[start, end)` in seconds from the clip's start, and
            `audio_envelope` the heard clip's loudness to draw above it: `{"rate": frames per second, "rms": [...]}`.
        head_rr: head-wise tracing, RR(l, head) with one query head's output restored at the span's positions,
            `{span: [n_layers][n_heads]}` (`p_head`: the probabilities).
        attention: attention to the audio (`tracing/attention.py`): the attention mass onto the audio rows per
            (layer, head), `{"last"|"object": {"clean"|"corrupted": [n_layers][n_heads]}}`; kept and excluded clips.
        atp: the AtP* triage per grid (`tracing/triage.py`; keys "token", "time", "head:<span>"): the estimates,
            the verified cells and their exact values, and the comparison with the exact grid when it was traced.
        target, options: the correct option and the option set; `clean_prediction` / `corrupted_prediction` are the
            argmax among the options' answer tokens.
        meta: model, port, corruption, kind, window, engine, library versions, transcript policy, ...
        audit: the fast engine's exactness audit (`tracing/audit.py`): the recomputed cells with both values,
            `max_abs_diff`, `tolerance` and `dtype`; None for the reference engine or with `audit=False`.
    """

    p_clean: float
    p_corrupted: float
    excluded: bool
    exclusion_reason: str | None
    target: str
    options: list[str]
    target_token: int
    option_tokens: list[int]
    clean_prediction: str
    corrupted_prediction: str
    positions: list[int]
    str_tokens: list[str]
    segments: dict[str, list[int]]
    layer_rr: np.ndarray | None = None
    token_rr: np.ndarray | None = None
    p_layer: np.ndarray | None = None
    p_token: np.ndarray | None = None
    segment_rr: dict[str, list[float]] = field(default_factory=dict)
    span_rr: dict[str, list[float]] = field(default_factory=dict)
    p_span: dict[str, list[float]] = field(default_factory=dict)
    span_positions: dict[str, list[int]] = field(default_factory=dict)
    time_rr: np.ndarray | None = None
    p_time: np.ndarray | None = None
    time_windows: list[list[float]] = field(default_factory=list)
    audio_envelope: dict[str, Any] = field(default_factory=dict)
    head_rr: dict[str, list[list[float]]] = field(default_factory=dict)
    p_head: dict[str, list[list[float]]] = field(default_factory=dict)
    attention: dict[str, Any] | None = None
    atp: dict[str, Any] | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    audit: dict[str, Any] | None = None

    # -- serialisation -----------------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (arrays as nested lists)."""
        out = asdict(self)
        for name in _ARRAYS:
            value = getattr(self, name)
            out[name] = None if value is None else np.asarray(value).tolist()
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TraceResult:
        data = dict(data)
        for name in _ARRAYS:
            if data.get(name) is not None:
                data[name] = np.asarray(data[name], dtype=np.float64)
        return cls(**data)

    def save(self, path: str | Path) -> Path:
        """Write to `.json` (everything) or `.npz` (arrays, plus the rest as a JSON string)."""
        path = Path(path)
        if path.suffix == ".json":
            path.write_text(json.dumps(self.to_dict()))
        elif path.suffix == ".npz":
            scalars = {k: v for k, v in self.to_dict().items() if k not in _ARRAYS}
            arrays = {k: getattr(self, k) for k in _ARRAYS if getattr(self, k) is not None}
            np.savez(path, _json=np.array(json.dumps(scalars)), **arrays)
        else:
            raise ValueError(f"{path}: unknown result format {path.suffix!r}; use .json or .npz")
        return path

    @classmethod
    def load(cls, path: str | Path) -> TraceResult:
        path = Path(path)
        if path.suffix == ".json":
            return cls.from_dict(json.loads(path.read_text()))
        if path.suffix == ".npz":
            with np.load(path) as npz:
                data = json.loads(str(npz["_json"]))
                data.update({k: npz[k] for k in _ARRAYS if k in npz.files})
            return cls.from_dict(data)
        raise ValueError(f"{path}: unknown result format {path.suffix!r}; use .json or .npz")
