"""Figures of aggregated sweeps (plotly): the paper's Figure 2 and Figure 3, for one run or several overlaid.

- `layer_rr_figure`: layer-wise RR(l) curves, one panel per attribute, one line per run, 95% CI bands (Figure 2);
- `token_rr_heatmap`: RR(l, i) over layer × position counted from the last token, segment boundaries marked
  (Figure 3);
- `segment_rr_figure`: token-wise RR averaged within each segment (early prompt, object tokens, late prompt,
  last token), per layer, with CI bands;
- beyond the paper: `span_rr_figure` (RR(l) per span restored jointly, with CI bands), `time_rr_figure` (RR(l, t)
  over seconds of the clip under its loudness; `trace_time_figure` for one traced clip) and `head_rr_heatmap`
  (RR over layer x attention head);
- the observational views beside tracing (`view_figures`, from `lens.json` / `steering.json`): `lens_correct_figure`
  (the logit lens's P(correct option) per layer, panels as in the layer-wise RR figure), `lens_options_figure`
  (the lens per option) and `steering_figure` (accuracy against β);
- attention to the audio and the AtP* triage (`TraceConfig.attention`, `atp`): `attention_figure` (mass onto the
  audio rows over layer x head, clip vs silence, and each head's r with answering right) and `atp_error_figure`
  (where the linear estimate fails: |estimated RR − exact RR| per layer and grid).

Every function returns a `plotly.graph_objects.Figure`. A CI band is a filled area without markers, a trace named
"<line> 95% CI"; it is absent where there is no interval (n = 1). Each panel's subtitle gives n, the number of kept
samples behind its curves; points with n < 2 have open markers and the subtitle flags them. Layer axes tick whole
layers only. `write_figures` writes interactive HTML, and PNG/SVG only where a static exporter (kaleido) is
installed. The runs to draw come from `audiolens_ct.aggregate.load_runs`; this module only draws.
"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import plotly.graph_objects as go
from plotly.colors import DEFAULT_PLOTLY_COLORS, unlabel_rgb
from plotly.subplots import make_subplots

from audiolens_ct.aggregate import Run
from audiolens_ct.aggregate import load_runs as load_runs  # re-exported, to call beside write_figures
from audiolens_ct.observations import LENS, STEERING, load_view
from audiolens_ct.store import safe_name

SEGMENT_TITLES = {"early_prompt": "early prompt", "object": "object tokens", "late_prompt": "late prompt",
                  "last": "last token"}  # fmt: skip
NO_INTERVAL = "⚠ no 95% CI"
LEGEND_KEY = "shaded: 95% CI · open marker: n = 1, no CI"


class Style(NamedTuple):
    """How a curve is drawn besides its colour: line dash, marker symbol and marker size."""

    dash: str
    symbol: str
    size: int


LAYER_STYLE = Style("solid", "circle", 7)
SEGMENT_STYLES = {  # each segment its own dash and marker; markers shrink in drawing order, so coincident points nest
    "early_prompt": Style("solid", "circle", 13),
    "object": Style("dash", "square", 10),
    "late_prompt": Style("dashdot", "diamond", 8),
    "last": Style("dot", "triangle-up", 6),
}


def _attributes(runs: Sequence[Run]) -> list[str]:
    return list(dict.fromkeys(a for run in runs for a in run.attributes))


def _rgba(color: str, alpha: float) -> str:
    r, g, b = unlabel_rgb(color)
    return f"rgba({r:g}, {g:g}, {b:g}, {alpha})"


def _add_curve(fig: go.Figure, stat: dict[str, Any], name: str, color: str, style: Style, col: int, legend: bool,
               group: str, quantity: str = "RR") -> int:  # fmt: skip
    """A mean line over layers, with its CI band (a filled area, no markers) where the interval exists; points
    with n < 2 get open markers. Returns the curve's n, the number of kept samples behind it. `quantity` names the
    y value on hover."""
    layers = list(range(len(stat["mean"])))
    bounded = [i for i in layers if stat["low"][i] is not None]
    if bounded:
        fig.add_trace(
            go.Scatter(
                x=bounded + bounded[::-1], y=[stat["high"][i] for i in bounded] + [stat["low"][i] for i in bounded[::-1]],
                mode="lines", fill="toself", fillcolor=_rgba(color, 0.18), line=dict(width=0), name=f"{name} 95% CI",
                legendgroup=group, showlegend=False, hoverinfo="skip",
            ),  # fmt: skip
            row=1, col=col,
        )  # fmt: skip
    symbols = [style.symbol if n >= 2 else f"{style.symbol}-open" for n in stat["n"]]
    fig.add_trace(
        go.Scatter(
            x=layers, y=stat["mean"], mode="lines+markers", name=name, legendgroup=group, showlegend=legend,
            line=dict(color=color, dash=style.dash), marker=dict(symbol=symbols, size=style.size),
            customdata=stat["n"],
            hovertemplate=f"{name}<br>layer %{{x}}<br>{quantity} %{{y:.3f}} (n=%{{customdata}})<extra></extra>",
        ),  # fmt: skip
        row=1, col=col,
    )  # fmt: skip
    return max(stat["n"], default=0)


def _n_text(n: int) -> str:
    """`n = 5`, flagged where one sample allows no interval."""
    return f"n = {n}" if n >= 2 else f"n = {n} {NO_INTERVAL}"


def _n_subtitle(counts: dict[str, int]) -> str:
    """What a panel's subtitle says about n: one n when all its curves share it, else n per curve; n < 2 flagged."""
    if not counts:
        return "no kept samples"
    if len(set(counts.values())) == 1:
        return _n_text(next(iter(counts.values())))
    return " · ".join(f"{name}: {_n_text(n)}" for name, n in counts.items())


def _layer_ticks(n_layers: int) -> dict[str, Any]:
    """Axis settings that tick whole layers only (about 20 ticks at most), never a fraction of a layer."""
    step = max(1, math.ceil(n_layers / 20))
    return dict(tickmode="array", tickvals=list(range(0, n_layers, step)))


def _panels(attributes: Sequence[str], title: str) -> go.Figure:
    fig = make_subplots(rows=1, cols=max(1, len(attributes)), subplot_titles=list(attributes), shared_yaxes=True)
    fig.update_layout(title=title, template="plotly_white", hovermode="closest", legend_title_text=LEGEND_KEY,
                      margin=dict(t=110))  # fmt: skip
    fig.update_xaxes(title_text="layer")
    fig.update_yaxes(title_text="recovery rate", row=1, col=1)
    return fig


def _finish_panels(fig: go.Figure, attributes: Sequence[str], counts: dict[str, dict[str, int]],
                   n_layers: int) -> go.Figure:  # fmt: skip
    """Subtitle each panel with its n (see `_n_subtitle`) and tick whole layers."""
    for annotation, attribute in zip(fig.layout.annotations, attributes, strict=True):
        annotation.text = f"{attribute}<br><span style='font-size:12px'>{_n_subtitle(counts[attribute])}</span>"
    fig.update_xaxes(**_layer_ticks(n_layers))
    return fig


def layer_rr_figure(runs: Sequence[Run]) -> go.Figure:
    """Figure 2: layer-wise RR(l) per attribute (one panel each), one line per run, 95% CI bands."""
    attributes = _attributes(runs)
    fig = _panels(attributes, "Layer-wise tracing: RR(l) when the text after the audio is restored at layer l")
    counts: dict[str, dict[str, int]] = {attribute: {} for attribute in attributes}
    n_layers = 0
    for i, run in enumerate(runs):
        color = DEFAULT_PLOTLY_COLORS[i % len(DEFAULT_PLOTLY_COLORS)]
        shown = False
        for col, attribute in enumerate(attributes, start=1):
            stat = run.aggregate["attributes"].get(attribute, {}).get("layer_rr")
            if stat is not None:
                counts[attribute][run.label] = _add_curve(fig, stat, run.label, color, LAYER_STYLE, col, not shown,
                                                          run.label)  # fmt: skip
                n_layers = max(n_layers, len(stat["mean"]))
                shown = True
    return _finish_panels(fig, attributes, counts, n_layers)


def segment_rr_figure(runs: Sequence[Run], attributes: Sequence[str] | None = None) -> go.Figure:
    """Token-wise RR averaged per segment, per layer: one panel per attribute, one line per (run, segment).

    Each segment has its own dash and marker (`SEGMENT_STYLES`), so overlapping lines stay apart; the colour is the
    segment's when there is one run, else the run's."""
    return _curves_figure(runs, attributes, "Token-wise tracing by segment: mean RR(l, i) over each segment's positions",
                          "segment_rr", SEGMENT_TITLES, SEGMENT_STYLES)  # fmt: skip


def span_rr_figure(runs: Sequence[Run], attributes: Sequence[str] | None = None) -> go.Figure:
    """Group-wise tracing: RR(l) with each span's positions restored jointly at layer l; one panel per attribute,
    one line per (run, span), styled as `segment_rr_figure`'s lines."""
    specs = list(dict.fromkeys(spec for run in runs for agg in run.aggregate["attributes"].values()
                               for spec in agg.get("span_rr") or {}))  # fmt: skip
    styles = list(SEGMENT_STYLES.values())
    return _curves_figure(runs, attributes, "Group-wise tracing: RR(l) when each span is restored jointly at layer l",
                          "span_rr", {spec: spec for spec in specs},
                          {spec: styles[i % len(styles)] for i, spec in enumerate(specs)})  # fmt: skip


def _curves_figure(runs: Sequence[Run], attributes: Sequence[str] | None, title: str, key: str,
                   titles: dict[str, str], styles: dict[str, Style]) -> go.Figure:  # fmt: skip
    """Curves over layers of the aggregate's `{name: stat}` under `key`, one panel per attribute, one line per
    (run, name): the name's colour when there is one run, else the run's."""
    attributes = list(attributes) if attributes is not None else _attributes(runs)
    fig = _panels(attributes, title)
    counts: dict[str, dict[str, int]] = {attribute: {} for attribute in attributes}
    n_layers = 0
    for r, run in enumerate(runs):
        for s, (part, part_title) in enumerate(titles.items()):
            name = part_title if len(runs) == 1 else f"{run.label} · {part_title}"
            color = DEFAULT_PLOTLY_COLORS[(s if len(runs) == 1 else r) % len(DEFAULT_PLOTLY_COLORS)]
            shown = False
            for col, attribute in enumerate(attributes, start=1):
                stat = (run.aggregate["attributes"].get(attribute, {}).get(key) or {}).get(part)
                if stat is not None:
                    counts[attribute][name] = _add_curve(fig, stat, name, color, styles[part], col, not shown, name)
                    n_layers = max(n_layers, len(stat["mean"]))
                    shown = True
    return _finish_panels(fig, attributes, counts, n_layers)


def _tick(token: str) -> str:
    return token.replace("\n", "⏎").strip() or "␣"


def _position_tick(token: str, from_end: int) -> str:
    """A heatmap column's label: the token in quotes and its position from the last token, e.g. `"is" (−1)`."""
    return f'"{_tick(token)}" ({"−" if from_end < 0 else ""}{abs(from_end)})'


def _heatmap_n(n: Sequence[Sequence[int]]) -> str:
    """The title's n: kept samples behind the map; a range where shorter prompts leave far columns with fewer."""
    low, high = min(min(row) for row in n), max(max(row) for row in n)
    return f"n = {high}" if low == high else f"n = {low}–{high} per position (hover shows each cell's n)"


def token_rr_heatmap(run: Run, attribute: str) -> go.Figure:
    """Figure 3: mean RR(l, i) over layer × position from the last token, with segment boundaries marked.

    Columns are labelled by token and position from the end; layers are ticked at whole numbers."""
    token = run.aggregate["attributes"].get(attribute, {}).get("token_rr")
    title = f"Token-wise tracing, {attribute} ({run.label}): mean RR(l, i)"
    fig = go.Figure()
    fig.update_layout(title=title if token is None else f"{title} · {_heatmap_n(token['n'])}", template="plotly_white",
                      xaxis_title="token (position from the last token, 0 = last)", yaxis_title="layer")  # fmt: skip
    if token is None:
        fig.add_annotation(text="no kept samples with token-wise tracing", showarrow=False, x=0.5, y=0.5,
                           xref="paper", yref="paper")  # fmt: skip
        return fig
    x = token["from_end"]
    layers = list(range(len(token["mean"])))
    text = [[f"{_tick(t)} · {s or '-'} · n={n}" for t, s, n in zip(token["tokens"], token["segments"], row, strict=True)]
            for row in token["n"]]  # fmt: skip
    fig.add_trace(
        go.Heatmap(
            z=token["mean"], x=x, y=layers, text=text, colorscale="RdBu_r", zmid=0, name=f"{run.label} RR",
            colorbar=dict(title="RR"), hovertemplate="layer %{y}, position %{x}<br>%{text}<br>RR %{z:.3f}<extra></extra>",
        )  # fmt: skip
    )
    fig.update_xaxes(tickmode="array", tickvals=x, tickangle=-60,
                     ticktext=[_position_tick(t, i) for t, i in zip(token["tokens"], x, strict=True)])  # fmt: skip
    fig.update_yaxes(**_layer_ticks(len(layers)))
    spans: list[tuple[str | None, int, int]] = []
    for j, segment in enumerate(token["segments"]):
        if spans and spans[-1][0] == segment:
            spans[-1] = (segment, spans[-1][1], j)
        else:
            spans.append((segment, j, j))
    for k, (segment, first, last) in enumerate(spans):
        if k > 0:
            fig.add_vline(x=x[first] - 0.5, line=dict(color="black", width=2, dash="dash"))
        if segment is not None:
            fig.add_annotation(x=(x[first] + x[last]) / 2, y=1.02, xref="x", yref="paper", showarrow=False,
                               text=SEGMENT_TITLES.get(segment, segment), yanchor="bottom")  # fmt: skip
    return fig


def time_rr_figure(run: Run, attribute: str) -> go.Figure:
    """RR(l, t): mean RR when a window of audio rows is restored at layer l, against seconds of the clip, under
    the clips' mean loudness on the same time axis (with its 95% CI band)."""
    agg = run.aggregate["attributes"].get(attribute, {})
    title = f"Time-wise tracing, {attribute} ({run.label}): mean RR(l, t)"
    if agg.get("time_rr") is None:
        fig = go.Figure()
        fig.update_layout(title=title, template="plotly_white")
        fig.add_annotation(text="no kept samples with time-wise tracing", showarrow=False, x=0.5, y=0.5, xref="paper",
                           yref="paper")  # fmt: skip
        return fig
    return _time_figure(f"{title} · {_heatmap_n(agg['time_rr']['n'])}", agg["time_rr"], agg["envelope"])


def trace_time_figure(result: Any) -> go.Figure:
    """RR(l, t) of one traced clip (a `TraceResult` with `time_rr`) under the clip's loudness, in seconds."""
    if result.time_rr is None:
        raise ValueError("this result has no RR(l, t): trace with time_window= (and a sample the rules keep)")
    grid = result.time_rr.tolist()
    windows = {"start": [w[0] for w in result.time_windows], "end": [w[1] for w in result.time_windows],
               "mean": grid, "low": None, "n": [[1] * len(row) for row in grid]}  # fmt: skip
    loudness = {"rate": result.audio_envelope["rate"], "mean": result.audio_envelope["rms"], "low": None}
    return _time_figure(f"Time-wise tracing of one clip: RR(l, t) (target {result.target!r})", windows, loudness)


def _time_figure(title: str, windows: dict[str, Any], loudness: dict[str, Any]) -> go.Figure:
    """The loudness curve (top) and the RR heatmap over layer x window centre (bottom), on one axis of seconds."""
    fig = make_subplots(rows=2, cols=1, shared_xaxes=True, row_heights=[0.25, 0.75], vertical_spacing=0.04)
    seconds = [(i + 0.5) / loudness["rate"] for i in range(len(loudness["mean"]))]
    if loudness.get("low") is not None:
        bounded = [i for i, low in enumerate(loudness["low"]) if low is not None]
        fig.add_trace(go.Scatter(
            x=[seconds[i] for i in bounded + bounded[::-1]],
            y=[loudness["high"][i] for i in bounded] + [loudness["low"][i] for i in bounded[::-1]],
            mode="lines", fill="toself", fillcolor=_rgba(DEFAULT_PLOTLY_COLORS[0], 0.18), line=dict(width=0),
            name="loudness 95% CI", showlegend=False, hoverinfo="skip"), row=1, col=1)  # fmt: skip
    fig.add_trace(go.Scatter(x=seconds, y=loudness["mean"], mode="lines", name="loudness (RMS)",
                             line=dict(color=DEFAULT_PLOTLY_COLORS[0]), showlegend=False,
                             hovertemplate="%{x:.2f} s<br>RMS %{y:.3g}<extra></extra>"), row=1, col=1)  # fmt: skip
    centres = [(a + b) / 2 for a, b in zip(windows["start"], windows["end"], strict=True)]
    layers = list(range(len(windows["mean"])))
    text = [[f"{a:.2f}–{b:.2f} s · n={n}" for a, b, n in zip(windows["start"], windows["end"], row, strict=True)]
            for row in windows["n"]]  # fmt: skip
    fig.add_trace(go.Heatmap(z=windows["mean"], x=centres, y=layers, text=text, colorscale="RdBu_r", zmid=0,
                             colorbar=dict(title="RR", y=0.38, len=0.75), name="RR(l, t)",
                             hovertemplate="layer %{y}, window %{text}<br>RR %{z:.3f}<extra></extra>"),
                  row=2, col=1)  # fmt: skip
    fig.update_layout(title=title, template="plotly_white", margin=dict(t=90))
    fig.update_yaxes(title_text="loudness", row=1, col=1)
    fig.update_yaxes(title_text="layer", row=2, col=1, **_layer_ticks(len(layers)))
    fig.update_xaxes(title_text="time in the clip (s)", row=2, col=1)
    return fig


def head_rr_heatmap(run: Run, attribute: str, span: str) -> go.Figure:
    """Mean RR(l, head) when one attention head's output is restored at the span's positions, layer x head."""
    stat = (run.aggregate["attributes"].get(attribute, {}).get("head_rr") or {}).get(span)
    title = f"Head-wise tracing at {span!r}, {attribute} ({run.label}): mean RR(l, head)"
    fig = go.Figure()
    fig.update_layout(title=title, template="plotly_white", xaxis_title="head (query head)", yaxis_title="layer")
    if stat is None:
        fig.add_annotation(text="no kept samples with head-wise tracing", showarrow=False, x=0.5, y=0.5,
                           xref="paper", yref="paper")  # fmt: skip
        return fig
    fig.update_layout(title=f"{title} · {_heatmap_n(stat['n'])}")
    fig.add_trace(go.Heatmap(z=stat["mean"], colorscale="RdBu_r", zmid=0, colorbar=dict(title="RR"), customdata=stat["n"],
                             hovertemplate="layer %{y}, head %{x}<br>RR %{z:.3f} (n=%{customdata})<extra></extra>"))  # fmt: skip
    fig.update_yaxes(**_layer_ticks(len(stat["mean"])))
    return fig


LENS_VIEWS = {  # (position, audio) -> how its curve is named and drawn
    ("last", "clean"): ("last position, clip", Style("solid", "circle", 9)),
    ("last", "silent"): ("last position, silence", Style("dot", "circle", 6)),
    ("attribute", "clean"): ("attribute position, clip", Style("dash", "square", 8)),
    ("attribute", "silent"): ("attribute position, silence", Style("dashdot", "diamond", 5)),
}
LENS_Y = "P(answer token)"


def lens_correct_figure(lens: dict[str, Any]) -> go.Figure:
    """Logit lens (AudioLens): P(the correct option's answer token) read from each layer's residual stream, at the
    last position and at the attribute-mentioning position of the reversed prefix, with the clip and with silence;
    one panel per attribute, laid out like the layer-wise RR figure."""
    attributes = list(lens["attributes"])
    fig = _panels(attributes, "Logit lens: P(correct option) if the model stopped after layer l")
    fig.update_yaxes(title_text=LENS_Y, row=1, col=1)
    counts: dict[str, dict[str, int]] = {attribute: {} for attribute in attributes}
    for v, ((position, audio), (name, style)) in enumerate(LENS_VIEWS.items()):
        shown = False
        for col, attribute in enumerate(attributes, start=1):
            summary = lens["attributes"][attribute]["positions"].get(position, {}).get(audio)
            if summary is not None:
                color = DEFAULT_PLOTLY_COLORS[v % len(DEFAULT_PLOTLY_COLORS)]
                counts[attribute][name] = _add_curve(fig, summary["correct"], name, color, style, col, not shown, name,
                                                     LENS_Y)  # fmt: skip
                shown = True
    return _finish_panels(fig, attributes, counts, lens["n_layers"])


def lens_options_figure(lens: dict[str, Any], attribute: str) -> go.Figure:
    """Logit lens per option: P(option) over the clips whose answer it is, at the last position (left) and the
    attribute position (right); solid with the clip (95% CI band), dotted with silence."""
    agg = lens["attributes"][attribute]
    positions = [p for p in ("last", "attribute") if p in agg["positions"]]
    fig = _panels([f"{p} position" for p in positions], f"Logit lens per option, {attribute}: P(option) on its clips")
    fig.update_yaxes(title_text=LENS_Y, row=1, col=1)
    counts: dict[str, dict[str, int]] = {f"{p} position": {} for p in positions}
    for col, position in enumerate(positions, start=1):
        for o, option in enumerate(agg["options"]):
            color = DEFAULT_PLOTLY_COLORS[o % len(DEFAULT_PLOTLY_COLORS)]
            for audio, style in (("clean", LAYER_STYLE), ("silent", Style("dot", "circle", 4))):
                stat = agg["positions"][position][audio]["per_option"].get(option)
                if stat is not None:
                    name = option if audio == "clean" else f"{option} (silence)"
                    n = _add_curve(fig, stat, name, color, style, col, col == 1, name, LENS_Y)
                    counts[f"{position} position"][option] = n
    return _finish_panels(fig, list(counts), counts, lens["n_layers"])


def steering_figure(steering: dict[str, Any]) -> go.Figure:
    """Audio–silence steering: option accuracy (solid) and the fraction of answers that changed from β = 0 (dashed)
    on the held-out clips, against β; one panel per attribute."""
    attributes = [a for a, agg in steering["attributes"].items() if agg["accuracy"] is not None]
    fig = _panels(attributes, "Steering along the audio–silence direction: held-out clips against β")
    fig.update_xaxes(title_text="β")
    fig.update_yaxes(title_text="fraction of held-out clips", row=1, col=1, range=[-0.02, 1.02])
    for col, attribute in enumerate(attributes, start=1):
        agg = steering["attributes"][attribute]
        for k, (key, name, dash) in enumerate((("accuracy", "option accuracy", "solid"),
                                               ("changed", "answer changed", "dash"))):  # fmt: skip
            fig.add_trace(go.Scatter(
                x=agg["betas"], y=agg[key], mode="lines+markers", name=name, legendgroup=name, showlegend=col == 1,
                line=dict(color=DEFAULT_PLOTLY_COLORS[k], dash=dash),
                hovertemplate=f"{name}<br>β %{{x}}<br>%{{y:.2f}}<extra></extra>"), row=1, col=col)  # fmt: skip
    for annotation, attribute in zip(fig.layout.annotations, attributes, strict=True):
        n = steering["attributes"][attribute]["counts"]["evaluated"]
        annotation.text = f"{attribute}<br><span style='font-size:12px'>{n} held-out clips</span>"
    fig.update_layout(legend_title_text=None)
    return fig


ATTENTION_ROWS = {"last": "from the last position", "object": "from the object tokens"}


def attention_figure(run: Run, attribute: str) -> go.Figure:
    """Attention to the audio over layer x head: the mean mass onto the audio rows from the last position (top) and
    the object tokens (bottom), with the clip and with silence, and, for the last position, each head's r with
    answering right (the head ranking of 2603.06854)."""
    agg = run.aggregate["attributes"].get(attribute, {}).get("attention")
    title = f"Attention to the audio, {attribute} ({run.label})"
    if agg is None:
        fig = go.Figure()
        fig.update_layout(title=title, template="plotly_white")
        fig.add_annotation(text="no clips with attention to the audio", showarrow=False, x=0.5, y=0.5, xref="paper",
                           yref="paper")  # fmt: skip
        return fig
    ranking = agg["head_ranking"]
    groups = [g for g in ATTENTION_ROWS if g in agg]
    fig = make_subplots(rows=len(groups), cols=3, horizontal_spacing=0.06, vertical_spacing=0.12, subplot_titles=[
        f"{label} {ATTENTION_ROWS[g]}" for g in groups for label in ("clip,", "silence,", "r with right answers,")
    ])  # fmt: skip
    for row, group in enumerate(groups, start=1):
        for col, run_name in enumerate(("clean", "corrupted"), start=1):
            stat = agg[group][run_name]
            fig.add_trace(go.Heatmap(z=stat["mean"], coloraxis="coloraxis", customdata=stat["n"],
                                     hovertemplate=f"{run_name}<br>layer %{{y}}, head %{{x}}<br>mass %{{z:.3f}} "
                                     "(n=%{customdata})<extra></extra>"), row=row, col=col)  # fmt: skip
    fig.add_trace(go.Heatmap(z=ranking["r"], coloraxis="coloraxis2",
                             hovertemplate="layer %{y}, head %{x}<br>r %{z:.3f}<extra></extra>"), row=1, col=3)  # fmt: skip
    if len(groups) > 1:
        fig.layout.annotations[5].text = ""  # no ranking from the object tokens
    fig.update_layout(
        title=f"{title} · {agg['n']} clips ({ranking['correct']} answered right)", template="plotly_white",
        coloraxis=dict(colorscale="Viridis", cmin=0, cmax=1, colorbar=dict(title="mass", x=1.0)),
        coloraxis2=dict(colorscale="RdBu_r", cmid=0, colorbar=dict(title="r", x=1.08)), margin=dict(t=110),
    )  # fmt: skip
    fig.update_xaxes(title_text="head (query head)", row=len(groups))
    fig.update_yaxes(title_text="layer", col=1)
    return fig


def atp_error_figure(runs: Sequence[Run]) -> go.Figure:
    """Where AtP*'s linear estimate fails: the mean |estimated RR − exact RR| per layer, one line per grid, one
    panel per attribute (from the runs that computed the exact grids beside the triage)."""
    attributes = _attributes(runs)
    fig = _panels(attributes, "AtP* triage: mean |estimated RR − exact RR| per layer (0: the estimate is exact)")
    fig.update_yaxes(title_text="|RR error|", row=1, col=1)
    counts: dict[str, dict[str, int]] = {attribute: {} for attribute in attributes}
    styles = list(SEGMENT_STYLES.values())
    n_layers = 0
    for r, run in enumerate(runs):
        grids = list(dict.fromkeys(g for agg in run.aggregate["attributes"].values() for g in agg.get("atp") or {}))
        for g, grid in enumerate(grids):
            name = grid if len(runs) == 1 else f"{run.label} · {grid}"
            color = DEFAULT_PLOTLY_COLORS[(g if len(runs) == 1 else r) % len(DEFAULT_PLOTLY_COLORS)]
            for col, attribute in enumerate(attributes, start=1):
                stat = ((run.aggregate["attributes"].get(attribute, {}).get("atp") or {}).get(grid) or {}).get(
                    "error_by_layer")
                if stat is not None:
                    counts[attribute][name] = _add_curve(fig, stat, name, color, styles[g % len(styles)], col,
                                                         col == 1, name, "|RR error|")  # fmt: skip
                    n_layers = max(n_layers, len(stat["mean"]))
    return _finish_panels(fig, attributes, counts, n_layers)


def static_export_available() -> bool:
    """True when plotly can write PNG/SVG (the kaleido package is installed)."""
    return importlib.util.find_spec("kaleido") is not None


def figures(runs: Sequence[Run]) -> dict[str, go.Figure]:
    """Every figure for these runs, keyed by a file stem."""
    out = {"layer_rr": layer_rr_figure(runs), "segment_rr": segment_rr_figure(runs)}
    if any(agg.get("span_rr") for run in runs for agg in run.aggregate["attributes"].values()):
        out["span_rr"] = span_rr_figure(runs)
    for run in runs:
        for attribute in run.attributes:
            stem = f"{safe_name(run.label)}_{safe_name(attribute)}"
            out[f"token_rr_{stem}"] = token_rr_heatmap(run, attribute)
            agg = run.aggregate["attributes"][attribute]
            if agg.get("time_rr") is not None:
                out[f"time_rr_{stem}"] = time_rr_figure(run, attribute)
            for span in agg.get("head_rr") or {}:
                out[f"head_rr_{stem}_{safe_name(span)}"] = head_rr_heatmap(run, attribute, span)
            if agg.get("attention") is not None:
                out[f"attention_{stem}"] = attention_figure(run, attribute)
        out.update(view_figures(run.path, safe_name(run.label)))
    if any(grid.get("error_by_layer") for run in runs for agg in run.aggregate["attributes"].values()
           for grid in (agg.get("atp") or {}).values()):  # fmt: skip
        out["atp_error"] = atp_error_figure(runs)
    return out


def view_figures(out_dir: str | Path | None, label: str) -> dict[str, go.Figure]:
    """The figures of the logit lens and steering views an output directory holds (`observations.py`), by stem."""
    out = {}
    lens, steering = load_view(out_dir, LENS), load_view(out_dir, STEERING)
    if lens is not None:
        out[f"lens_{label}"] = lens_correct_figure(lens)
        for attribute in lens["attributes"]:
            out[f"lens_options_{label}_{safe_name(attribute)}"] = lens_options_figure(lens, attribute)
    if steering is not None:
        out[f"steering_{label}"] = steering_figure(steering)
    return out


def write_figures(runs: Sequence[Run], out_dir: str | Path, static: Sequence[str] = ()) -> list[Path]:
    """Write each figure as interactive HTML (plotly.min.js once beside them, so they open offline), and as
    each format in `static` ("png", "svg") — which needs kaleido."""
    if static and not static_export_available():
        raise ImportError(f"writing {', '.join(static)} needs the kaleido package (pip install kaleido)")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for stem, fig in figures(runs).items():
        path = out_dir / f"{stem}.html"
        fig.write_html(path, include_plotlyjs="directory")
        written.append(path)
        for fmt in static:
            written.append(out_dir / f"{stem}.{fmt}")
            fig.write_image(written[-1])
    return written
