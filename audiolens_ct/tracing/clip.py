"""`trace`: the paper's causal tracing of one clip, as five named steps.

1. `prepare` the clean input (the model's prompt format, the clip's audio rows, the paper's text segments);
2. `corrupt` it into its twin (silence by default; `corruption.py`);
3. run both, unpatched: the clean run caches the activations to restore, the engine runs the corrupted one;
4. score both (`scoring.py`) and apply the paper's exclusion rules;
5. build the patch sets of the asked modes (`patches.py`), evaluate them with the engine, and turn the patched
   probabilities into Recovery Rates, RR = (P_patched - P_corrupted) / (P_clean - P_corrupted).

Every option lives in a `TraceConfig`; `trace(..., engine="transformer_lens")` is shorthand for replacing one.
"""

from __future__ import annotations

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
from audiolens_ct.tracing.engine import get_engine
from audiolens_ct.tracing.patches import layer_wise, token_wise
from audiolens_ct.tracing.result import TraceResult
from audiolens_ct.tracing.scoring import (
    answer_distribution,
    answer_probability,
    answer_tokens,
    exclusion_reason,
    predicted_option,
)

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

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
    src = [p for p in clean.text_positions if p + offset >= corrupted.first_text_after_audio]
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

    # 3. the clean run (caching the activations to restore) and the corrupted run
    engine = get_engine(config)
    names = {get_act_name(config.kind, layer) for layer in range(model.cfg.n_layers)}
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
    if not result.excluded or config.trace_excluded:
        n_layers = model.cfg.n_layers
        denom = p_clean - p_corrupted
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
            patches = token_wise(n_layers, src, dst, window=config.window, kind=config.kind)
            values = engine.evaluate(model, patches, clean_cache, corrupted, metric).numpy()
            if audited:
                first_live = 1 if config.kind == "resid_pre" else 0
                picks = exactness.token_cells(n_layers, len(src), config.seed, first_live_layer=first_live)
                cells += exactness.recompute(
                    model, "token-wise", patches, values, picks, clean_cache, corrupted_input, metric,
                    lambda i: dict(layer=i // len(src), position=src[i % len(src)],
                                   token=clean.str_tokens[0][src[i % len(src)]]),
                )  # fmt: skip
            result.p_token = values.reshape(n_layers, len(src))
            if not result.excluded:
                result.token_rr = (result.p_token - p_corrupted) / denom
                result.segment_rr = segment_means(result.token_rr, src, result.segments)
    if audited:
        result.audit = exactness.verdict(cells, model)
    return result


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
