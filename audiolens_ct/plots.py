"""Figures of aggregated sweeps (plotly): the paper's Figure 2 and Figure 3, for one run or several overlaid.

- `layer_rr_figure`: layer-wise RR(l) curves, one panel per attribute, one line per run, 95% CI bands (Figure 2);
- `token_rr_heatmap`: RR(l, i) over layer × position counted from the last token, segment boundaries marked
  (Figure 3);
- `segment_rr_figure`: token-wise RR averaged within each segment (early prompt, object tokens, late prompt,
  last token), per layer, with CI bands.

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
from audiolens_ct.inputs import SEGMENT_NAMES
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
               group: str) -> int:  # fmt: skip
    """A mean line over layers, with its CI band (a filled area, no markers) where the interval exists; points
    with n < 2 get open markers. Returns the curve's n, the number of kept samples behind it."""
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
            hovertemplate=f"{name}<br>layer %{{x}}<br>RR %{{y:.3f}} (n=%{{customdata}})<extra></extra>",
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
    attributes = list(attributes) if attributes is not None else _attributes(runs)
    fig = _panels(attributes, "Token-wise tracing by segment: mean RR(l, i) over each segment's positions")
    counts: dict[str, dict[str, int]] = {attribute: {} for attribute in attributes}
    n_layers = 0
    for r, run in enumerate(runs):
        for s, segment in enumerate(SEGMENT_NAMES):
            name = SEGMENT_TITLES[segment] if len(runs) == 1 else f"{run.label} · {SEGMENT_TITLES[segment]}"
            color = DEFAULT_PLOTLY_COLORS[(s if len(runs) == 1 else r) % len(DEFAULT_PLOTLY_COLORS)]
            shown = False
            for col, attribute in enumerate(attributes, start=1):
                stat = run.aggregate["attributes"].get(attribute, {}).get("segment_rr", {}).get(segment)
                if stat is not None:
                    counts[attribute][name] = _add_curve(fig, stat, name, color, SEGMENT_STYLES[segment], col,
                                                         not shown, name)  # fmt: skip
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


def static_export_available() -> bool:
    """True when plotly can write PNG/SVG (the kaleido package is installed)."""
    return importlib.util.find_spec("kaleido") is not None


def figures(runs: Sequence[Run]) -> dict[str, go.Figure]:
    """Every figure for these runs, keyed by a file stem."""
    out = {"layer_rr": layer_rr_figure(runs), "segment_rr": segment_rr_figure(runs)}
    for run in runs:
        for attribute in run.attributes:
            out[f"token_rr_{safe_name(run.label)}_{safe_name(attribute)}"] = token_rr_heatmap(run, attribute)
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
