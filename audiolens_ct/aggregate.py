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
  and `segments` name the columns (taken from the kept sample with the most columns);
- beyond the paper, when traced (`TraceConfig.spans`, `time_window`, `heads`): `span_rr`, RR(l) per span
  (`{span: stat}`); `time_rr`, RR(l, t) per layer and time window, windows aligned from the clip's start
  (`start`, `end` in seconds, from the sample with the most windows), with `envelope`, the clips' mean loudness
  (`rate` frames a second); `head_rr`, RR(l, head) per span (`{span: stat [n_layers, n_heads]}`).
- `attention` (`TraceConfig.attention`), over every traced clip, kept or excluded (n in `n`): the attention mass
  onto the audio rows per (layer, head), `{"last"|"object": {"clean"|"corrupted": stat [n_layers, n_heads]}}`, and
  `head_ranking`: per (layer, head) Pearson's r of the clean mass from the last position with answering right
  (`r`, `p`; null where undefined), the clips (`n`) and right answers (`correct`), and the `top` heads;
- `atp` (`TraceConfig.atp`), per grid (`token`, `time`, `head:<span>`), over kept samples: the mean number of
  `cells` and of `verified` ones, the mean `seconds` of the estimate and the verification; where the run also
  computed the exact grid: `rank_correlation` and `rank_correlation_atp` (stats), `worst_missed_rr` (stat of its
  magnitude, and `worst_missed_max`, the largest, signed), `max_error_rr` (stat), `error_by_layer` (stat
  `[n_layers]` of the mean |estimated RR − exact RR|), `verified_max_abs_diff` (the largest), `speedup` (stat)
  and the exact grid's mean `seconds`.

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
    traced = [r["result"] for r in rows if r["status"] != "error"]  # kept and excluded
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
        "span_rr": {},
        "time_rr": None,
        "envelope": None,
        "head_rr": {},
        "audit": _audit(traced),
        "attention": _attention_to_audio(traced),
        "atp": _atp_triage(kept),
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
    out.update(_beyond_the_paper(kept))
    return out


def _beyond_the_paper(kept: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """RR per span, per time window (with the clips' loudness) and per head, over the kept samples that have them."""
    out: dict[str, Any] = {"span_rr": {}, "head_rr": {}}
    for key in ("span_rr", "head_rr"):
        for spec in dict.fromkeys(spec for k in kept for spec in k.get(key) or {}):
            out[key][spec] = summarise([k[key][spec] for k in kept if spec in (k.get(key) or {})])
    timed = [k for k in kept if k.get("time_rr") is not None]
    if timed:
        widest = max(timed, key=lambda k: len(k["time_windows"]))
        rows = max(len(k["audio_envelope"]["rms"]) for k in timed)
        out["time_rr"] = {"start": [w[0] for w in widest["time_windows"]], "end": [w[1] for w in widest["time_windows"]],
                          **summarise(_padded([k["time_rr"] for k in timed], len(widest["time_windows"])))}  # fmt: skip
        out["envelope"] = {"rate": widest["audio_envelope"]["rate"],
                           **summarise(_padded([[k["audio_envelope"]["rms"]] for k in timed], rows)[:, 0])}  # fmt: skip
    return out


def _attention_to_audio(traced: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
    """Mean attention masses onto the audio (clean and corrupted, from each query group) over every traced clip,
    and the heads ranked by how their clean mass from the last position goes with answering right."""
    from audiolens_ct.tracing.attention import head_ranking  # imports torch: only for runs that have masses

    clips = [t for t in traced if t.get("attention")]
    if not clips:
        return None
    out: dict[str, Any] = {"n": len(clips)}
    for group in dict.fromkeys(g for t in clips for g in t["attention"]):
        having = [t["attention"][group] for t in clips if group in t["attention"]]
        out[group] = {run: summarise([masses[run] for masses in having]) for run in ("clean", "corrupted")}
    ranked = [t for t in clips if "last" in t["attention"]]
    ranking = head_ranking([t["attention"]["last"]["clean"] for t in ranked],
                           [t["clean_prediction"] == t["target"] for t in ranked])  # fmt: skip
    out["head_ranking"] = {"r": _json(ranking.r), "p": _json(ranking.p), "n": ranking.n, "correct": ranking.correct,
                           "top": ranking.top(10)}  # fmt: skip
    return out


def _atp_triage(kept: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Per AtP* grid: how many cells were estimated and verified, and, where the exact grid was computed as well,
    how the triage did against it (`triage.compare`), over the kept samples."""
    out: dict[str, Any] = {}
    for key in dict.fromkeys(key for k in kept for key in k.get("atp") or {}):
        runs = [k["atp"][key] for k in kept if key in (k.get("atp") or {})]
        grid: dict[str, Any] = {
            "n": len(runs), "cells": float(np.mean([len(r["p_atp_star"]) for r in runs])),
            "verified": float(np.mean([len(r["verified"]) for r in runs])),
            "seconds": {part: float(np.mean([r["seconds"][part] for r in runs])) for part in ("estimate", "verify")},
        }  # fmt: skip
        compared = [r["comparison"] for r in runs if r.get("comparison")]
        if compared:
            grid.update(_compared(compared))
        out[key] = grid
    return out


def _compared(compared: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The AtP* comparisons with the exact grid, summarised (NaN where a sample's value is None)."""

    def values(key: str, transform: Any = float) -> list[float]:
        return [np.nan if c[key] is None else transform(c[key]) for c in compared]

    missed = [c["worst_missed_rr"] for c in compared if c["worst_missed_rr"] is not None]
    layered = [c["error_by_layer"] for c in compared if c.get("error_by_layer") is not None]
    return {
        "rank_correlation": summarise(values("rank_correlation")),
        "rank_correlation_atp": summarise(values("rank_correlation_atp")),
        "worst_missed_rr": summarise(values("worst_missed_rr", abs)),
        "worst_missed_max": max(missed, key=abs) if missed else None,
        "max_error_rr": summarise(values("max_error_rr")),
        "error_by_layer": summarise(layered) if layered else None,
        "verified_max_abs_diff": max(c["verified_max_abs_diff"] for c in compared),
        "speedup": summarise([c["seconds"]["speedup"] for c in compared]),
        "exact_seconds": float(np.mean([c["seconds"]["exact"] for c in compared])),
    }


def _padded(grids: Sequence[Any], width: int) -> np.ndarray:
    """`[samples, rows, width]`: each grid's columns from the left, NaN where a shorter sample has none."""
    out = np.full((len(grids), len(grids[0]), width), np.nan)
    for s, grid in enumerate(grids):
        grid = np.asarray(grid, dtype=np.float64)
        out[s, :, : grid.shape[1]] = grid
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
