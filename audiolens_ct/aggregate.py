"""Averaging a sweep's records: mean RR with 95% confidence intervals, and what was kept, excluded or failed.

This module is the one reader of records for analysis and the one writer of `aggregate.json`: a run writes it when
it ends (`write_aggregate`), the report reads it back (`load_aggregate`, which rewrites it first when it is missing
or older than the records), and figures read it through `load_runs`.

Interval: over the kept samples, the two-sided 95% Student t interval of the mean,
`mean ± t(0.975, n−1) · s / √n` with `s` the sample standard deviation (ddof 1). With n = 1 there is a mean but no
interval (`low`/`high` are null); with n = 0 the mean is null too. No NaN is ever written.

Per attribute, `aggregate.json` holds:

- `counts`: samples, kept, excluded per reason, errors; `errors` lists each failed sample with its message;
- `excluded`: each excluded sample with its reason, target, clean and corrupted predictions and probabilities;
- `p_clean`, `p_corrupted`: mean probabilities of the target answer token over kept samples;
- `layer_rr`: RR(l) of layer-wise tracing, per layer;
- `segment_rr`: token-wise RR averaged within each segment (early_prompt, object, late_prompt, last), per layer;
- `audit`: how many traced samples the fast engine's exactness audit checked (`samples`) and the largest
  |fast − reference| it found (`max_abs_diff`, in probability);
- `token_rr`: RR(l, i) per layer and position counted from the end of the sequence (`from_end`: ..., −1, 0; 0 is
  the last token), so samples whose prompts differ in length (e.g. a transcript) line up at the answer; `tokens`
  and `segments` name the columns (taken from the kept sample with the most columns).

Each statistic is `{"mean", "low", "high", "n"}`, arrays shaped like the quantity (`n` counts the samples behind
each cell).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from jaxtyping import Float
from scipy import stats

from audiolens_ct.inputs import SEGMENT_NAMES
from audiolens_ct.store import MANIFEST, RECORDS, RunStore, atomic_write_json

AGGREGATE = "aggregate.json"
CONFIDENCE = 0.95
INTERVAL = "95% Student t interval of the mean over kept samples: mean ± t(0.975, n−1)·s/√n; none for n = 1"


def summarise(values: Float[np.ndarray, " samples *shape"]) -> dict[str, Any]:
    """Mean and 95% t interval over axis 0, ignoring NaN (a sample without that cell); JSON-ready, no NaN."""
    values = np.asarray(values, dtype=np.float64)
    present = ~np.isnan(values)
    n = present.sum(axis=0)
    total = np.where(present, values, 0.0).sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = total / n
        deviations = np.where(present, values - mean, 0.0)
        sd = np.sqrt((deviations**2).sum(axis=0) / (n - 1))
        half = stats.t.ppf(0.5 + CONFIDENCE / 2, np.maximum(n - 1, 1)) * sd / np.sqrt(n)
    has_interval = n >= 2
    return {
        "mean": _json(np.where(n >= 1, mean, np.nan)),
        "low": _json(np.where(has_interval, mean - half, np.nan)),
        "high": _json(np.where(has_interval, mean + half, np.nan)),
        "n": n.tolist(),
    }


def _json(array: np.ndarray) -> Any:
    """Nested lists with None where the value is NaN."""
    if array.ndim == 0:
        return None if np.isnan(array) else float(array)
    return [_json(a) for a in array]


def aggregate_records(records: Iterable[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per-attribute counts and averaged maps (see the module docstring) from sweep records, in any order (they
    are sorted by attribute and sample id here, so an aggregate never depends on the order samples finished)."""
    by_attribute: dict[str, list[dict[str, Any]]] = {}
    for record in sorted(records, key=lambda r: (r["attribute"], r["sample_id"])):
        by_attribute.setdefault(record["attribute"], []).append(record)
    return {attribute: _attribute(rows) for attribute, rows in by_attribute.items()}


def _attribute(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    kept = [r["result"] for r in rows if r["status"] == "kept"]
    reasons: dict[str, int] = {}
    for r in rows:
        if r["status"] == "excluded":
            reason = r["result"]["exclusion_reason"]
            reasons[reason] = reasons.get(reason, 0) + 1
    errors = [{"sample_id": r["sample_id"], "error": r["error"]} for r in rows if r["status"] == "error"]
    out: dict[str, Any] = {
        "counts": {"samples": len(rows), "kept": len(kept), "excluded": dict(sorted(reasons.items())),
                   "errors": len(errors)},  # fmt: skip
        "errors": errors,
        "excluded": [_exclusion(r) for r in rows if r["status"] == "excluded"],
        "p_clean": summarise([k["p_clean"] for k in kept]) if kept else None,
        "p_corrupted": summarise([k["p_corrupted"] for k in kept]) if kept else None,
        "layer_rr": None,
        "segment_rr": {},
        "token_rr": None,
        "audit": _audit([r["result"] for r in rows if r["status"] != "error"]),
    }
    if not kept:
        return out
    layer = [k["layer_rr"] for k in kept if k.get("layer_rr") is not None]
    if layer:
        out["layer_rr"] = summarise(layer)
    for name in SEGMENT_NAMES:
        curves = [k["segment_rr"][name] for k in kept if name in k.get("segment_rr", {})]
        if curves:
            out["segment_rr"][name] = summarise(curves)
    token = [k for k in kept if k.get("token_rr") is not None]
    if token:
        out["token_rr"] = _token_from_end(token)
    return out


def _exclusion(record: dict[str, Any]) -> dict[str, Any]:
    """An excluded sample's predictions, so a reader can check why the rules dropped it."""
    result = record["result"]
    keys = ("target", "clean_prediction", "corrupted_prediction", "p_clean", "p_corrupted")
    return {"sample_id": record["sample_id"], "reason": result["exclusion_reason"], **{k: result[k] for k in keys}}


def _audit(results: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """How many traced samples the fast engine's exactness audit checked, and the largest difference it found."""
    audits = [r["audit"] for r in results if r.get("audit")]
    return {"samples": len(audits), "max_abs_diff": max((a["max_abs_diff"] for a in audits), default=None)}


def _token_from_end(results: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """RR(l, i) aligned by distance from the last token; cells a shorter sample lacks are left out of its mean."""
    width = max(len(r["positions"]) for r in results)
    n_layers = len(results[0]["token_rr"])
    stacked = np.full((len(results), n_layers, width), np.nan)
    for s, r in enumerate(results):
        grid = np.asarray(r["token_rr"], dtype=np.float64)
        stacked[s, :, width - grid.shape[1] :] = grid
    widest = next(r for r in results if len(r["positions"]) == width)
    last = len(widest["str_tokens"]) - 1
    segment_of = {p: name for name, positions in widest["segments"].items() for p in positions}
    return {
        "from_end": [p - last for p in widest["positions"]],
        "tokens": [widest["str_tokens"][p] for p in widest["positions"]],
        "segments": [segment_of.get(p) for p in widest["positions"]],
        **summarise(stacked),
    }


def aggregate_run(out_dir: str | Path) -> dict[str, Any]:
    """Aggregate an output directory's records afresh, with its manifest's settings (nothing is written)."""
    store = RunStore(out_dir)
    manifest = store.manifest() or {}
    return {
        "settings": manifest.get("settings", {}),
        "interval": INTERVAL,
        "attributes": aggregate_records(store.records()),
    }


def write_aggregate(out_dir: str | Path) -> dict[str, Any]:
    """Aggregate `out_dir`'s records and write `out_dir/aggregate.json` (the only writer of that file)."""
    result = aggregate_run(out_dir)
    atomic_write_json(Path(out_dir) / AGGREGATE, result)
    return result


def load_aggregate(out_dir: str | Path, write: bool = True) -> dict[str, Any]:
    """The aggregate of `out_dir`: `aggregate.json` when it is current, else aggregated afresh from the records
    (and written, when `write`), so a resumed or extended run is never shown stale."""
    path = Path(out_dir) / AGGREGATE
    if _is_current(Path(out_dir)):
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):  # unreadable or half-copied: aggregated again below
            pass
    return write_aggregate(out_dir) if write else aggregate_run(out_dir)


def _is_current(out_dir: Path) -> bool:
    """Whether `aggregate.json` is newer than the manifest, every record and every records folder (whose time
    changes when a record is added or removed)."""
    try:
        written = (out_dir / AGGREGATE).stat().st_mtime_ns
    except FileNotFoundError:
        return False
    records = out_dir / RECORDS
    sources = [out_dir / MANIFEST, records, *records.glob("*"), *records.glob("*/*.json")]
    try:
        return all(written > source.stat().st_mtime_ns for source in sources if source.exists())
    except FileNotFoundError:  # a record replaced while we looked: aggregate again
        return False


@dataclass
class Run:
    """One output directory's aggregate, with the label its lines carry in overlaid figures."""

    label: str
    aggregate: dict[str, Any]
    path: Path | None = None

    @property
    def attributes(self) -> list[str]:
        return list(self.aggregate["attributes"])


def load_runs(out_dirs: Sequence[str | Path]) -> list[Run]:
    """Each output directory's current aggregate (`load_aggregate`; nothing is written), labelled for figures.

    Lines are labelled by model name; runs of the same model add their directory name (and their place in
    `out_dirs` if that is not enough).
    """
    aggregates = [load_aggregate(d, write=False) for d in out_dirs]
    names = [Path(str(a["settings"].get("model", "run"))).name for a in aggregates]
    labels = [n if names.count(n) == 1 else f"{n} ({Path(d).name})" for n, d in zip(names, out_dirs, strict=True)]
    labels = [label if labels.count(label) == 1 else f"{label} #{i + 1}" for i, label in enumerate(labels)]
    return [Run(label, agg, Path(d)) for label, agg, d in zip(labels, aggregates, out_dirs, strict=True)]
