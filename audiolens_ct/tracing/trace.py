"""`trace`: the paper's causal tracing of one audio sample.

Scoring: P is the softmax over the full vocabulary at the last position (the token after the response prefix,
e.g. "... gender is"), read at the target option's answer token, the first token of `" " + option`
(`audiolens_ct.data.answers`). A run "predicts" the option whose answer token has the highest probability among
the options' answer tokens.

Exclusion (the paper's rules, checked in this order; the first that holds is recorded as the reason):
`clean_wrong` (the clean run does not predict the target), `corrupted_right` (the corrupted run still predicts
it), `no_drop` (P_clean <= P_corrupted). An excluded result keeps P_clean and P_corrupted but no RR maps, so RR is
never NaN or infinite.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import Any

import numpy as np
import torch
from transformer_lens.utilities import get_act_name

from audiolens_ct.audio import as_waveform
from audiolens_ct.choices import CORRUPTIONS, ENGINES, KINDS, MODES, TRANSCRIPT_POLICIES
from audiolens_ct.corruption import corrupt
from audiolens_ct.data.answers import answer_tokens
from audiolens_ct.errors import InputError
from audiolens_ct.inputs import SEGMENT_NAMES, LALMInput
from audiolens_ct.tracing import audit as exactness
from audiolens_ct.tracing.audit import versions
from audiolens_ct.tracing.engine_fast import evaluate_fast, run_corrupted
from audiolens_ct.tracing.engine_reference import evaluate_reference
from audiolens_ct.tracing.result import TraceResult
from audiolens_ct.tracing.sweep import Sweep, layer_wise, token_wise


def check_options(
    corruption: str, modes: Sequence[str], engine: str, kind: str, window: int, transcript_policy: str,
    noise_scale: float, noise_copies: int,
) -> None:
    """Reject unknown tracing options with a message naming the value and the valid choices."""
    for name, value, allowed in (
        ("corruption", corruption, CORRUPTIONS), ("engine", engine, ENGINES), ("activation kind", kind, KINDS),
        ("transcript policy", transcript_policy, TRANSCRIPT_POLICIES),
    ):
        if value not in allowed:
            raise InputError(f"unknown {name} {value!r}; use one of {', '.join(allowed)}")
    unknown = [m for m in modes if m not in MODES]
    if unknown or not modes:
        raise InputError(f"unknown tracing modes {unknown or list(modes)}; use any of {', '.join(MODES)}")
    if window < 1:
        raise InputError(f"window must be >= 1, got {window}")
    if corruption == "noise" and (noise_copies < 1 or noise_scale <= 0):
        raise InputError(f"noise needs noise_copies >= 1 and noise_scale > 0, got {noise_copies} and {noise_scale}")


def _last_probs(logits: torch.Tensor) -> torch.Tensor:
    """Softmax over the vocabulary at the last position, averaged over the batch (noise copies)."""
    return logits[:, -1].float().softmax(-1).double().mean(0)


def aligned_positions(clean: LALMInput, corrupted: LALMInput, layer_positions: str = "after_audio") -> tuple[list[int], list[int]]:
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
    if layer_positions != "after_audio":
        raise InputError(f"unknown layer_positions {layer_positions!r}; use 'after_audio' or 'all_text'")
    src = [p for p in clean.text_positions if p + offset >= corrupted.first_text_after_audio]
    return src, [p + offset for p in src]


def _evaluate(model: Any, engine: str, sweep: Sweep, clean_cache: Any, corrupted: LALMInput, run: Any, target: int,
              max_batch: int) -> np.ndarray:
    if engine == "fast":
        return evaluate_fast(model, sweep, clean_cache, run, target, max_batch=max_batch).numpy()
    return evaluate_reference(model, sweep, clean_cache, corrupted, partial(_target_probability, target=target)).numpy()


def _target_probability(logits: torch.Tensor, target: int) -> torch.Tensor:
    return _last_probs(logits)[target]


def trace(
    model: Any,
    audio: Any,
    prompt: str,
    response_prefix: str,
    target: str,
    options: Sequence[str],
    corruption: str = "silence",
    modes: Sequence[str] = MODES,
    engine: str = "fast",
    kind: str = "resid_pre",
    window: int = 1,
    sampling_rate: int | None = None,
    layer_positions: str = "after_audio",
    transcript_policy: str = "clean",
    swap_audio: Any = None,
    noise_scale: float = 3.0,
    noise_copies: int = 10,
    seed: int = 0,
    max_batch: int = 64,
    trace_excluded: bool = False,
    audit: bool = True,
    **prepare_kwargs: Any,
) -> TraceResult:
    """Causal tracing of one clip: clean, corrupted and patched runs, RR maps, exclusion.

    Args:
        model: a `HookedLALM`.
        audio: the clip (waveform at `sampling_rate`, or a path).
        prompt, response_prefix: the question and the start of the answer (ends in "... is").
        target: the correct option; options: every option (their answer tokens must differ).
        corruption: "silence" (paper), "noise" (ROME, `noise_scale` x std, `noise_copies` averaged, `seed`),
            or "swap" (`swap_audio`, same number of audio rows).
        modes: "layer" (RR(l), patching all text positions after the audio) and/or "token" (RR(l, i)).
        engine: "fast" or "transformer_lens" (the reference; both give the same numbers).
        kind: the activation restored: resid_pre (the paper's hidden state), resid_post, attn_out, mlp_out.
        window: restore `window` consecutive layers centred on each layer (ROME's option for attn/mlp).
        layer_positions: "after_audio" (paper) or "all_text" for layer-wise tracing.
        transcript_policy: for ports that read an ASR transcript (DeSTA): which one the corrupted run reads, the
            clean clip's ("clean") or the corrupted audio's own ("corrupted"; lengths may then differ).
        max_batch: the fast engine's memory bound (rows per pass).
        trace_excluded: also compute RR maps for excluded samples (as raw patched probabilities only).
        audit: with the fast engine, recompute a few cells (and the corrupted run) with full TransformerLens
            forwards and raise `ExactnessError` if they differ beyond the dtype's tolerance (`tracing/audit.py`);
            the cells and the largest difference are kept in `result.audit`.
        prepare_kwargs: passed to `model.prepare` (e.g. `transcript="..."` to give DeSTA the clean transcript).
    """
    options = list(options)
    if target not in options:
        raise InputError(f"the target {target!r} is not among the options {options}")
    check_options(corruption, modes, engine, kind, window, transcript_policy, noise_scale, noise_copies)
    wave = as_waveform(audio, sampling_rate, model.port.sampling_rate, model.port.name)
    option_ids = answer_tokens(model.tokenizer, options)
    target_id = option_ids[target]

    clean = model.prepare(wave, prompt, response_prefix, options=options, **prepare_kwargs)
    corrupted = corrupt(
        model, clean, wave, corruption, swap_audio=None if swap_audio is None else as_waveform(
            swap_audio, sampling_rate, model.port.sampling_rate, model.port.name),
        noise_scale=noise_scale, noise_copies=noise_copies, seed=seed, transcript_policy=transcript_policy,
    )
    names = {get_act_name(kind, layer) for layer in range(model.cfg.n_layers)}
    with torch.no_grad():
        clean_logits, clean_cache = model.run_with_cache(clean, names_filter=lambda n: n in names)
        run = run_corrupted(model, corrupted) if engine == "fast" else None
        corrupted_logits = model(corrupted) if engine == "transformer_lens" or audit else None
    p_clean_all = _last_probs(clean_logits)
    p_corr_all = (
        _last_probs(corrupted_logits) if engine == "transformer_lens"
        else run.last_logits.float().softmax(-1).double().mean(0)
    )
    p_clean, p_corrupted = float(p_clean_all[target_id]), float(p_corr_all[target_id])

    def predicted(probs: torch.Tensor) -> str:
        return max(options, key=lambda o: float(probs[option_ids[o]]))

    clean_pred, corr_pred = predicted(p_clean_all), predicted(p_corr_all)
    reason = None
    if not (np.isfinite(p_clean) and np.isfinite(p_corrupted)):
        reason = "non_finite"
    elif clean_pred != target:
        reason = "clean_wrong"
    elif corr_pred == target:
        reason = "corrupted_right"
    elif p_clean <= p_corrupted:
        reason = "no_drop"

    src, dst = aligned_positions(clean, corrupted)
    result = TraceResult(
        p_clean=p_clean, p_corrupted=p_corrupted, excluded=reason is not None, exclusion_reason=reason,
        target=target, options=options, target_token=target_id, option_tokens=[option_ids[o] for o in options],
        clean_prediction=clean_pred, corrupted_prediction=corr_pred, positions=src,
        str_tokens=clean.str_tokens[0], segments=clean.segments or {},
        meta=dict(
            model=model.model_name, port=model.port.name, corruption=corruption, kind=kind, window=window,
            engine=engine, modes=list(modes), layer_positions=layer_positions, seed=seed,
            noise_scale=noise_scale if corruption == "noise" else None,
            noise_copies=noise_copies if corruption == "noise" else None,
            transcript_policy=transcript_policy if "transcript" in clean.extras else None,
            clean_transcript=clean.extras.get("transcript"), corrupted_transcript=corrupted.extras.get("transcript")
            if not isinstance(corrupted.extras.get("transcript"), list) else corrupted.extras["transcript"][0],
            clean_length=clean.shape[1], corrupted_length=corrupted.shape[1], versions=versions(),
        ),
    )
    audited = engine == "fast" and audit
    cells = []
    if audited:
        cells.append(dict(mode="corrupted", fast=p_corrupted, reference=float(_last_probs(corrupted_logits)[target_id])))
    if result.excluded and not trace_excluded:
        if audited:
            result.audit = exactness.verdict(cells, model)
        return result

    n_layers = model.cfg.n_layers
    denom = p_clean - p_corrupted
    metric = partial(_target_probability, target=target_id)
    if "layer" in modes:
        lsrc, ldst = aligned_positions(clean, corrupted, layer_positions)
        sweep = layer_wise(n_layers, lsrc, ldst, window=window, kind=kind)
        result.p_layer = _evaluate(model, engine, sweep, clean_cache, corrupted, run, target_id, max_batch)
        if audited:
            cells += exactness.recompute(model, "layer-wise", sweep, result.p_layer, exactness.layer_cells(n_layers),
                                         clean_cache, corrupted, metric, lambda i: dict(layer=i))
        if not result.excluded:
            result.layer_rr = (result.p_layer - p_corrupted) / denom
    if "token" in modes:
        sweep = token_wise(n_layers, src, dst, window=window, kind=kind)
        values = _evaluate(model, engine, sweep, clean_cache, corrupted, run, target_id, max_batch)
        if audited:
            picks = exactness.token_cells(n_layers, len(src), seed, first_live_layer=1 if kind == "resid_pre" else 0)
            cells += exactness.recompute(
                model, "token-wise", sweep, values, picks, clean_cache, corrupted, metric,
                lambda i: dict(layer=i // len(src), position=src[i % len(src)],
                               token=clean.str_tokens[0][src[i % len(src)]]),
            )
        result.p_token = values.reshape(n_layers, len(src))
        if not result.excluded:
            result.token_rr = (result.p_token - p_corrupted) / denom
            column = {p: j for j, p in enumerate(src)}
            for name in SEGMENT_NAMES:
                cols = [column[p] for p in result.segments.get(name, []) if p in column]
                if cols:
                    result.segment_rr[name] = result.token_rr[:, cols].mean(axis=1).tolist()
    if audited:
        result.audit = exactness.verdict(cells, model)
    return result
