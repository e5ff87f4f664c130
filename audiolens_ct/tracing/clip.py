"""`trace`: the paper's causal tracing of one clip, as five named steps.

1. `prepare` the clean input (the model's prompt format, the clip's audio rows, the paper's text segments);
2. `corrupt` it into its twin (silence by default; `corruption.py`);
3. run both, unpatched: the clean run caches the activations to restore, the engine runs the corrupted one;
4. score both (`scoring.py`) and apply the paper's exclusion rules;
5. build the patch sets of the asked modes (`patches.py`), evaluate them with the engine, and turn the patched
   probabilities into Recovery Rates, RR = (P_patched - P_corrupted) / (P_clean - P_corrupted): the paper's
   layer-wise and token-wise maps, and, when asked, RR per span (`spans`), per time window of the audio
   (`time_window`) and per attention head (`heads`);
6. when asked, beyond the maps (`beyond.py`): the attention to the audio (`attention`) and the AtP* triage of
   grids (`atp`), compared with the exact grids step 5 evaluated.

The spans and time windows are resolved right after step 2, so a span that does not occur or a port without a
timeline fails before any model run.

Every option lives in a `TraceConfig`; `trace(..., engine="transformer_lens")` is shorthand for replacing one.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from transformer_lens.utilities import get_act_name

from audiolens_ct.audio import as_waveform
from audiolens_ct.config import TraceConfig
from audiolens_ct.corruption import corrupt
from audiolens_ct.errors import InputError
from audiolens_ct.inputs import SEGMENT_NAMES, LALMInput
from audiolens_ct.tracing import audit as exactness
from audiolens_ct.tracing.audit import versions
from audiolens_ct.tracing.beyond import beyond_the_maps
from audiolens_ct.tracing.engine import CorruptedRun, Engine, Metric, get_engine
from audiolens_ct.tracing.patches import HEAD_KIND, PatchSet, group_wise, head_wise, layer_wise, token_wise
from audiolens_ct.tracing.result import TraceResult
from audiolens_ct.tracing.scoring import (
    answer_distribution,
    answer_probability,
    answer_tokens,
    exclusion_reason,
    predicted_option,
)
from audiolens_ct.tracing.spans import after_audio, resolve_span
from audiolens_ct.tracing.timeline import TimeWindow, envelope, time_windows

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

    from transformer_lens.ActivationCache import ActivationCache

    from audiolens_ct.model import HookedLALM


def aligned_positions(
    clean: LALMInput, corrupted: LALMInput, layer_positions: str = "after_audio"
) -> tuple[list[int], list[int]]:
    """Clean text positions and their corrupted counterparts, aligned by offset from the end of the sequence.

    `after_audio` takes every text position after the audio block (the paper's setting); `all_text` also takes
    the text before the audio (needs equal lengths; those positions are identical in both runs).
    """
    offset = corrupted.shape[1] - clean.shape[1]
    if layer_positions == "all_text":
        if offset:
            raise InputError("layer_positions='all_text' needs clean and corrupted inputs of equal length")
        src = [p for p in range(clean.shape[1]) if not bool(clean.audio_mask[0, p])]
        return src, src
    src = after_audio(clean, corrupted)
    return src, [p + offset for p in src]


def trace(
    model: HookedLALM,
    audio: Any,
    prompt: str,
    response_prefix: str,
    target: str,
    options: Sequence[str],
    config: TraceConfig | None = None,
    *,
    sampling_rate: int | None = None,
    swap_audio: Any = None,
    object_text: str | None = None,
    port_kwargs: Mapping[str, Any] | None = None,
    **overrides: Any,
) -> TraceResult:
    """Causal tracing of one clip: clean, corrupted and patched runs, RR maps, exclusion.

    Args:
        model: a `HookedLALM`.
        audio: the clip (waveform at `sampling_rate`, or a path).
        prompt, response_prefix: the question and the start of the answer (ends in "... is").
        target: the correct option; options: every option (their answer tokens must differ).
        config: the tracing options (default: the paper's setting, `TraceConfig()`); `overrides` replace fields
            of it, e.g. `trace(..., engine="transformer_lens", modes=("layer",))`.
        swap_audio: the other clip heard by the corrupted run when `corruption="swap"` (same number of audio rows).
        object_text: the option list as written in `prompt`, when it is not `", ".join(options)` (segments).
        port_kwargs: passed to the port's prompt encoder (`HookedLALM.prepare`), e.g. a DeSTA `transcript`.

    Example:
        >>> res = trace(model, wave, "What is the gender of the speaker?", "The speaker's gender is",
        ...             target="female", options=["male", "female"])
        >>> res.layer_rr  # RR(l), one value per layer
    """
    config = TraceConfig.make(config, **overrides)
    options = list(options)
    if target not in options:
        raise InputError(f"the target {target!r} is not among the options {options}")
    option_ids = answer_tokens(model.tokenizer, options)
    metric = partial(answer_probability, target=option_ids[target])

    # 1. prepare, 2. corrupt
    wave = as_waveform(audio, sampling_rate, model.port.sampling_rate, model.port.name)
    clean = model.prepare(wave, prompt, response_prefix, options=options, object_text=object_text,
                          **dict(port_kwargs or {}))  # fmt: skip
    if swap_audio is not None:
        swap_audio = as_waveform(swap_audio, sampling_rate, model.port.sampling_rate, model.port.name)
    corrupted_input = corrupt(model, clean, wave, config, swap_audio)
    spans = {spec: resolve_span(model, spec, clean, corrupted_input) for spec in config.spans}
    heads = {spec: resolve_span(model, spec, clean, corrupted_input) for spec in config.heads}
    heard = min(len(wave) / model.port.sampling_rate, model.port.audio_window or float("inf"))
    windows = (
        time_windows(model, clean, corrupted_input, heard, config.time_window, config.time_hop)
        if config.time_window is not None else []
    )  # fmt: skip

    # 3. the clean run (caching the activations to restore) and the corrupted run
    engine = get_engine(config)
    kinds = [config.kind, *([HEAD_KIND] if heads else [])]
    names = {get_act_name(kind, layer) for kind in kinds for layer in range(model.cfg.n_layers)}
    with torch.no_grad():
        clean_logits, clean_cache = model.run_with_cache(clean, names_filter=lambda n: n in names)
    corrupted = engine.run_corrupted(model, corrupted_input)

    # 4. scores and the paper's exclusion rules
    clean_dist, corrupted_dist = answer_distribution(clean_logits[:, -1]), answer_distribution(corrupted.last_logits)
    p_clean, p_corrupted = float(metric(clean_logits[:, -1])), float(metric(corrupted.last_logits))
    clean_pred, corr_pred = predicted_option(clean_dist, option_ids), predicted_option(corrupted_dist, option_ids)
    reason = exclusion_reason(target, p_clean, p_corrupted, clean_pred, corr_pred)
    src, dst = aligned_positions(clean, corrupted_input)
    result = TraceResult(
        p_clean=p_clean, p_corrupted=p_corrupted, excluded=reason is not None, exclusion_reason=reason,
        target=target, options=options, target_token=option_ids[target], option_tokens=list(option_ids.values()),
        clean_prediction=clean_pred, corrupted_prediction=corr_pred, positions=src,
        str_tokens=clean.str_tokens[0], segments=clean.segments or {},
        meta=_meta(model, config, clean, corrupted_input),
    )  # fmt: skip
    audited = config.engine == "fast" and config.audit
    cells = [exactness.corrupted_cell(model, corrupted, metric)] if audited else []

    # 5. patch sets, evaluated by the engine; RR
    evaluated: dict[str, tuple[PatchSet, np.ndarray, float]] = {}
    if not result.excluded or config.trace_excluded:
        n_layers = model.cfg.n_layers
        denom = p_clean - p_corrupted
        grids = _Grids(model, engine, clean_cache, corrupted, metric, config.seed, cells if audited else None, evaluated)
        if "layer" in config.modes:
            lsrc, ldst = aligned_positions(clean, corrupted_input, config.layer_positions)
            patches = layer_wise(n_layers, lsrc, ldst, window=config.window, kind=config.kind)
            result.p_layer = engine.evaluate(model, patches, clean_cache, corrupted, metric).numpy()
            if audited:
                cells += exactness.recompute(model, "layer-wise", patches, result.p_layer,
                                             exactness.layer_cells(n_layers), clean_cache, corrupted_input, metric,
                                             lambda i: dict(layer=i))  # fmt: skip
            if not result.excluded:
                result.layer_rr = (result.p_layer - p_corrupted) / denom
        if "token" in config.modes:
            result.p_token = grids.evaluate(
                "token-wise", token_wise(n_layers, src, dst, window=config.window, kind=config.kind), len(src),
                lambda j: dict(position=src[j], token=clean.str_tokens[0][src[j]]),
                first_live_layer=1 if config.kind == "resid_pre" else 0, key="token",
            )  # fmt: skip
            if not result.excluded:
                result.token_rr = (result.p_token - p_corrupted) / denom
                result.segment_rr = segment_means(result.token_rr, src, result.segments)
        present = {spec: pair for spec, pair in spans.items() if pair[0]}  # a segment the prompt lacks: left out
        if present:
            _trace_spans(grids, result, config, present)
        if windows:
            _trace_time(grids, result, config, windows, envelope(wave, model.port.sampling_rate, heard))
        for spec, (hsrc, hdst) in heads.items():
            p_head = grids.evaluate("head-wise", head_wise(n_layers, model.cfg.n_heads, hsrc, hdst), model.cfg.n_heads,
                                    lambda h, spec=spec: dict(span=spec, head=h), key=f"head:{spec}")  # fmt: skip
            result.p_head[spec] = p_head.tolist()
            if not result.excluded:
                result.head_rr[spec] = ((p_head - p_corrupted) / denom).tolist()

    # 6. beyond the maps: attention to the audio, the AtP* triage of the asked grids
    extra = beyond_the_maps(model, config, clean, corrupted_input, heard, metric, result, engine=engine,
                            clean_cache=clean_cache, corrupted_run=corrupted, evaluated=evaluated)  # fmt: skip
    result.attention, result.atp = extra.get("attention"), extra.get("atp")
    if audited:
        result.audit = exactness.verdict(cells, model)
    return result


@dataclass
class _Grids:
    """Step 5's evaluation of a layer-major grid of patches: the engine's values, a few cells audited (when
    `cells` is a list, the audit's record so far); `evaluated` keeps a keyed grid's patches, values and seconds
    for step 6."""

    model: HookedLALM
    engine: Engine
    clean_cache: ActivationCache
    corrupted: CorruptedRun
    metric: Metric
    seed: int
    cells: list[dict[str, Any]] | None = None
    evaluated: dict[str, tuple[PatchSet, np.ndarray, float]] = field(default_factory=dict)

    def evaluate(
        self, mode: str, patches: PatchSet, n_cols: int, describe: Callable[[int], dict[str, Any]],
        first_live_layer: int = 0, key: str | None = None,
    ) -> np.ndarray:  # fmt: skip
        """P with each patch applied, `[n_layers, n_cols]`; `describe(column)` names an audited cell's column.
        With `key`, the grid is kept in `evaluated` (patches, values, seconds of the engine's evaluation)."""
        start = time.perf_counter()
        values = self.engine.evaluate(self.model, patches, self.clean_cache, self.corrupted, self.metric).numpy()
        if key is not None:
            self.evaluated[key] = (patches, values, time.perf_counter() - start)
        n_layers = len(values) // n_cols
        if self.cells is not None:
            picks = exactness.token_cells(n_layers, n_cols, self.seed, first_live_layer=first_live_layer)
            self.cells += exactness.recompute(
                self.model, mode, patches, values, picks, self.clean_cache, self.corrupted.input, self.metric,
                lambda i: dict(layer=i // n_cols, **describe(i % n_cols)),
            )  # fmt: skip
        return values.reshape(n_layers, n_cols)


def _trace_spans(
    grids: _Grids, result: TraceResult, config: TraceConfig, spans: dict[str, tuple[list[int], list[int]]]
) -> None:
    """Group-wise tracing: each span's positions restored jointly at each layer (`result.span_rr`)."""
    names = list(spans)
    patches = group_wise(grids.model.cfg.n_layers, list(spans.values()), window=config.window, kind=config.kind)
    p_span = grids.evaluate("group-wise", patches, len(names), lambda g: dict(span=names[g]))
    result.span_positions = {spec: src for spec, (src, _) in spans.items()}
    result.p_span = {spec: p_span[:, g].tolist() for g, spec in enumerate(names)}
    if not result.excluded:
        denom = result.p_clean - result.p_corrupted
        result.span_rr = {spec: ((p_span[:, g] - result.p_corrupted) / denom).tolist() for g, spec in enumerate(names)}


def _trace_time(
    grids: _Grids, result: TraceResult, config: TraceConfig, windows: list[TimeWindow], loudness: dict[str, Any]
) -> None:
    """Time-wise tracing: each window of audio rows restored jointly at each layer (`result.time_rr`)."""
    patches = group_wise(grids.model.cfg.n_layers, [(w.src, w.dst) for w in windows], window=config.window,
                         kind=config.kind)  # fmt: skip
    result.p_time = grids.evaluate("time-wise", patches, len(windows),
                                   lambda t: dict(seconds=[windows[t].start, windows[t].end]), key="time")  # fmt: skip
    result.time_windows = [[w.start, w.end] for w in windows]
    result.audio_envelope = loudness
    if not result.excluded:
        result.time_rr = (result.p_time - result.p_corrupted) / (result.p_clean - result.p_corrupted)


def segment_means(
    token_rr: np.ndarray, positions: list[int], segments: dict[str, list[int]]
) -> dict[str, list[float]]:
    """Mean RR over each segment's positions, per layer: `{segment: [n_layers]}` (empty segments left out)."""
    column = {p: j for j, p in enumerate(positions)}
    out = {}
    for name in SEGMENT_NAMES:
        cols = [column[p] for p in segments.get(name, []) if p in column]
        if cols:
            out[name] = token_rr[:, cols].mean(axis=1).tolist()
    return out


def _meta(model: HookedLALM, config: TraceConfig, clean: LALMInput, corrupted: LALMInput) -> dict[str, Any]:
    """What a result records about how it was made: model, settings, the two inputs, library versions."""
    port = model.port
    twin = corrupted if len(corrupted) == 1 else clean  # noise copies share the clean prompt
    return dict(
        model=model.model_name, port=port.name, **config.settings(port.reads_transcript),
        **{f"clean_{k}": v for k, v in port.input_record(clean.extras).items()},
        **{f"corrupted_{k}": v for k, v in port.input_record(twin.extras).items()},
        clean_length=clean.shape[1], corrupted_length=corrupted.shape[1], versions=versions(),
    )  # fmt: skip
