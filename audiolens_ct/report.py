"""One self-contained HTML report per output directory: figures, counts, excluded clips, errors and the run manifest.

Every number is explained once, next to its table or figure: the samples table has a legend of its columns, the
figures an introduction (RR, band, n) and a caption each.

plotly.js is inlined once in the page head, so `report.html` opens offline and can be mailed as one file.
"""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

from plotly.offline import get_plotlyjs

from audiolens_ct.aggregate import INTERVAL, Run, load_aggregate
from audiolens_ct.observations import LENS, STEERING, load_view
from audiolens_ct.plots import (
    NO_INTERVAL,
    atp_error_figure,
    attention_figure,
    head_rr_heatmap,
    layer_rr_figure,
    lens_correct_figure,
    lens_options_figure,
    segment_rr_figure,
    span_rr_figure,
    steering_figure,
    time_rr_figure,
    token_rr_heatmap,
)
from audiolens_ct.store import RunStore, atomic_write_text

REPORT = "report.html"
REASONS = {
    "clean_wrong": "the clean run predicts a wrong option",
    "corrupted_right": "the corrupted run still predicts the right option",
    "no_drop": "P clean ≤ P corrupted: taking the audio away did not lower P",
    "non_finite": "P clean or P corrupted is not a finite number",
}
COLUMNS = {
    "attribute": "the question asked of the clip (its track)",
    "samples": "clips of this attribute: kept + excluded + errors",
    "kept": "clips that pass the exclusion rules; the figures average these only",
    **{f"excluded: {reason}": rule for reason, rule in REASONS.items()},
    "errors": "clips that could not be traced (listed under Errors)",
    "mean P clean (kept)": "mean P of the correct answer token in the clean run, over kept samples only",
    "mean P corrupted (kept)": "mean P of the correct answer token in the corrupted run, over kept samples only",
    "audited max |diff|": "the largest |fast − reference| probability difference found by the fast engine's runtime "
    "exactness audit (in brackets: how many samples it checked); – where nothing was audited",
}
EXCLUDED_COLUMNS = ("attribute", "clip", "reason", "target", "clean prediction", "corrupted prediction", "P clean",
                    "P corrupted")  # fmt: skip
EXCLUDED_NOTE = ("A prediction is the option whose answer token is most probable; P is the probability of the target's "
                 "answer token; the reasons are those of the samples table.")  # fmt: skip

EXPLANATION = """
<p><b>Causal tracing.</b> Each clip is run three ways: <i>clean</i> (its own audio), <i>corrupted</i> (the audio
taken away, e.g. replaced by silence) and <i>patched</i> (the corrupted run with some hidden states restored from
the clean run). P is the probability of the correct option's answer token after the response prefix
("... is"), a softmax over the whole vocabulary.</p>
<p><b>Recovery rate</b> RR = (P<sub>patched</sub> − P<sub>corrupted</sub>) / (P<sub>clean</sub> −
P<sub>corrupted</sub>): 1 means the restored states carry all the audio information the answer needs, 0 means
none of it.</p>
<p><b>Layer-wise map</b>: RR(l) when every text position after the audio is restored at layer l. At layer 0
the text holds only its token embeddings, the same in both runs, so RR(0) = 0; RR(l) climbs towards 1 over the
layers in which the text tokens read the audio (audio-text fusion), and stays high once the answer no longer needs
the audio rows. <b>Token-wise map</b>: RR(l, i) when one position i is restored at
layer l, shown by position counted from the last token (0) and summarised over the segments early prompt /
object tokens (the option list) / late prompt / last token.</p>
<p><b>Samples.</b> A clip is excluded when the clean run predicts a wrong option, the corrupted run still predicts
the right one, or P<sub>clean</sub> ≤ P<sub>corrupted</sub> (a prediction is the highest-probability option
answer token). Errors are clips that could not be traced; each is listed with its reason.</p>
"""

STYLE = """
body { font-family: system-ui, sans-serif; max-width: 1200px; margin: 2em auto; padding: 0 1em; color: #222; }
table { border-collapse: collapse; margin: 1em 0; }
th, td { border: 1px solid #bbb; padding: 0.3em 0.7em; text-align: right; }
th:first-child, td:first-child { text-align: left; }
.legend, .caption { font-size: 90%; color: #444; max-width: 60em; }
summary { cursor: pointer; font-weight: bold; }
pre { background: #f5f5f5; padding: 1em; overflow-x: auto; font-size: 85%; }
"""


def _row(cells: list[Any], tag: str = "td") -> str:
    """One table row of escaped cells (`th` for a header)."""
    return "<tr>" + "".join(f"<{tag}>{html.escape(str(c))}</{tag}>" for c in cells) + "</tr>"


def _counts_table(attributes: dict[str, Any]) -> str:
    """Counts per attribute, with a legend that explains every column (`COLUMNS`)."""
    rows = []
    for attribute, agg in attributes.items():
        counts = agg["counts"]

        def mean(key: str, agg: dict[str, Any] = agg) -> str:
            return "–" if agg[key] is None else f"{agg[key]['mean']:.4g}"

        cells = [attribute, counts["samples"], counts["kept"], *(counts["excluded"].get(r, 0) for r in REASONS),
                 counts["errors"], mean("p_clean"), mean("p_corrupted"), _audited(agg.get("audit"))]  # fmt: skip
        rows.append(_row(cells))
    legend = "".join(f"<li><b>{html.escape(c)}</b>: {html.escape(note)}</li>" for c, note in COLUMNS.items())
    return (f'<table id="counts">{_row(list(COLUMNS), "th")}{"".join(rows)}</table>'
            f'<ul class="legend" id="counts-legend">{legend}</ul>')  # fmt: skip


def _probability(p: float | None) -> str:
    """A probability to four significant digits, or a dash where there is none."""
    return "–" if p is None else f"{p:.4g}"


def _excluded(attributes: dict[str, Any]) -> str:
    """A collapsible table of the excluded clips with their predictions, so a reader can check each exclusion."""
    rows = [
        _row([attribute, e["sample_id"], e["reason"], e["target"], e["clean_prediction"], e["corrupted_prediction"],
              _probability(e["p_clean"]), _probability(e["p_corrupted"])])  # fmt: skip
        for attribute, agg in attributes.items()
        for e in agg.get("excluded", [])
    ]
    if not rows:
        return "<p>No clip was excluded.</p>"
    return (f'<details id="excluded"><summary>{len(rows)} excluded clip(s) and their predictions</summary>'
            f'<p class="legend">{html.escape(EXCLUDED_NOTE)}</p>'
            f'<table>{_row(list(EXCLUDED_COLUMNS), "th")}{"".join(rows)}</table></details>')  # fmt: skip


def _audited(audit: dict[str, Any] | None) -> str:
    """The exactness audit's largest difference over an attribute's samples, or a dash where none was audited."""
    if not audit or audit["max_abs_diff"] is None:
        return "–"
    return f"{audit['max_abs_diff']:.1e} ({audit['samples']} samples)"


def _errors(attributes: dict[str, Any]) -> str:
    items = [
        f"<li><code>{html.escape(attribute)}</code> / <code>{html.escape(e['sample_id'])}</code>: {html.escape(str(e['error']))}</li>"
        for attribute, agg in attributes.items()
        for e in agg["errors"]
    ]
    return f'<ul id="errors">{"".join(items)}</ul>' if items else "<p>No sample failed.</p>"


FIGURES = f"""
<p class="legend"><b>RR</b> is the recovery rate defined above. <b>Lines</b> are means over kept samples;
<b>n</b>, the number of kept samples averaged, is in each panel's subtitle (or the heatmap's title), and hovering
a point shows its own n. <b>Shaded bands</b> are 95% confidence intervals: {html.escape(INTERVAL)}.
<b>Open markers</b> and "{html.escape(NO_INTERVAL)}" mark points averaged over fewer than two samples, where no
interval exists.</p>
"""
CAPTIONS = {
    "layer": "One panel per attribute: RR(l) against the layer l at which the text after the audio is restored.",
    "token": "Colour: mean RR(l, i) when position i alone is restored at layer l (red: the position carries the audio "
    "information the answer needs). Columns: the token in quotes and its position from the last token (0 = last, −1 "
    "the one before); dashed lines separate the segments.",
    "segment": "Mean RR(l, i) over each segment's positions, per layer. Each segment has its own colour, dash and "
    "marker, so lines that coincide stay visible.",
    "span": "Group-wise tracing: RR(l) when every position of a span is restored at once at layer l (a span of one "
    "position is a token-wise cell; after_audio is the layer-wise curve; before_audio is a control, always 0).",
    "time": "Time-wise tracing: colour is the mean RR(l, t) when the audio rows of one window of the clip (x: its "
    "centre, in seconds from the clip's start) are restored at layer l; above, the clips' mean loudness (RMS) on the "
    "same time axis. Red windows hold what the answer needs from the audio, at that depth.",
    "head": "Head-wise tracing: colour is the mean RR(l, h) when the output of attention head h of layer l (before "
    "the output projection; a query head, also under grouped-query attention) is restored at the span's positions.",
    "attention": "Attention to the audio: colour is the mean share of head h's attention at layer l that goes onto the "
    "audio rows, from the last position (top) and from the object tokens (bottom), with the clip and with silence, "
    "over every traced clip (kept or excluded). Right: per head, Pearson's r between that share (clip, last position) "
    "and answering right, over the clips (arXiv 2603.06854's ranking of audio heads; the top heads are listed "
    "below). A head that keeps its share under silence looks at where the audio is, not at what it holds.",
    "atp": "AtP* triage: per layer, the mean |estimated RR − exact RR| over the cells of each grid (0: the linear "
    "estimate is exact). Large values mark where silence is too large a perturbation for a first-order estimate.",
}


def _figure(i: int, title: str, fig: Any, caption: str) -> str:
    """A figure's heading, its plot (plotly.js is in the page head) and its caption."""
    plot = fig.to_html(full_html=False, include_plotlyjs=False, div_id=f"figure-{i}", default_height="500px")
    return f'<h3>{html.escape(title)}</h3>{plot}<p class="caption">{html.escape(caption)}</p>'


VIEW_CAPTIONS = {
    "lens": "Logit lens (AudioLens): P(the correct option's answer token) when the residual stream after layer l is "
    "passed through the model's final norm and unembedding, as if the later layers were skipped; at the last position "
    "(with the clip / with silence) and at the attribute-mentioning position of AudioLens's reversed prefix (e.g. "
    "'gender' in \"The gender of the speaker\"). Beside the layer-wise RR: RR says from which layer the text needs "
    "no more audio, the lens from which layer the answer is readable. Scored as tracing scores (the first token of "
    "\" option\"; AudioLens read the option without its space). Critical layer, the first layer at which the correct "
    "option leads (mean over the clips that reach one; in brackets the share that does): {critical}.",
    "options": "P(each option's answer token) per layer over the clips whose answer it is: solid with the clip (95% "
    "CI band), dotted with silence.",
    "steering": "Audio–silence steering (arXiv 2603.06854): β·s added to the residual stream after layer(s) {layers} "
    "at the {positions} position, s the mean (clip − silence) residual at the last position ({direction}); option "
    "accuracy and the share of answers that differ from β = 0, on held-out clips.",
}


def _critical(lens: dict[str, Any]) -> str:
    """The critical layer per attribute, at the last position, with the clip and with silence."""
    parts = []
    for attribute, agg in lens["attributes"].items():
        views = agg["positions"].get("last", {})
        cells = [f"{audio} {views[audio]['critical_layer']['mean']:.1f} ({views[audio]['resolved']:.0%})"
                 if views[audio]["critical_layer"] else f"{audio} none" for audio in ("clean", "silent") if audio in views]
        parts.append(f"{attribute}: {', '.join(cells)}")
    return "; ".join(parts)


def _view_figures(run: Run) -> list[tuple[str, Any, str]]:
    """The logit lens and steering figures of the run's directory (`observations.py`), with their captions."""
    out = []
    lens, steering = load_view(run.path, LENS), load_view(run.path, STEERING)
    if lens is not None:
        out.append(("Logit lens", lens_correct_figure(lens), VIEW_CAPTIONS["lens"].format(critical=_critical(lens))))
        out += [(f"Logit lens per option: {attribute}", lens_options_figure(lens, attribute), VIEW_CAPTIONS["options"])
                for attribute in lens["attributes"]]  # fmt: skip
    if steering is not None:
        settings = steering["settings"]
        caption = VIEW_CAPTIONS["steering"].format(layers=", ".join(map(str, settings["layers"])),
                                                   positions=settings["positions"], direction=settings["direction"])
        out.append(("Steering", steering_figure(steering), caption))
    return out


ATP_NOTE = (
    "AtP* estimates every cell of a grid from one clean forward, one corrupted forward and one backward pass (with "
    "the QK fix for the attention softmax), then recomputes the top-scored cells exactly with the fast engine, within "
    "a budget of the exact grid's cost. rho: Spearman's rank correlation of the estimates with the exact grid (AtP*; "
    "plain AtP in brackets). Worst missed: the largest |RR| among the cells the triage did not verify (mean over "
    "samples; the largest in brackets). |RR error|: the largest |estimated RR − exact RR| (mean). Verified: the "
    "largest |verified − exact| (the verified cells are the grid's own values). Speed-up: exact grid time over "
    "estimate + verification (mean). Where the exact grid was not computed, only the triage's cost is shown. "
    "Silence is a large perturbation: where a window of voice switches the answer on, the first-order estimate can "
    "miss it entirely; read the estimates as a ranking to verify, not as RR."
)


def _mean(stat: dict[str, Any] | None, digits: int = 3) -> str:
    """A stat's mean with its 95% interval, or a dash."""
    if not stat or stat["mean"] is None:
        return "–"
    if stat["low"] is None:
        return f"{stat['mean']:.{digits}f}"
    return f"{stat['mean']:.{digits}f} [{stat['low']:.{digits}f}, {stat['high']:.{digits}f}]"


def _beyond_tables(attributes: dict[str, Any]) -> str:
    """The top audio heads per attribute and the AtP* triage per attribute and grid, as tables (empty when the run
    has neither)."""
    heads = [
        _row([attribute, t["layer"], t["head"], f"{t['r']:.3f}", f"{t['p']:.2g}",
              f"{agg['attention']['last']['clean']['mean'][t['layer']][t['head']]:.3f}",
              f"{agg['attention']['last']['corrupted']['mean'][t['layer']][t['head']]:.3f}"])  # fmt: skip
        for attribute, agg in attributes.items() if agg.get("attention") for t in agg["attention"]["head_ranking"]["top"][:5]
    ]
    triage = []
    for attribute, agg in attributes.items():
        for grid, t in (agg.get("atp") or {}).items():
            seconds = f"{t['seconds']['estimate'] + t['seconds']['verify']:.2f} s"
            compared = "rank_correlation" in t
            triage.append(_row([
                attribute, grid, t["n"], f"{t['verified']:.1f} / {t['cells']:.0f}",
                f"{_mean(t['rank_correlation'])} ({_mean(t['rank_correlation_atp'])})" if compared else "–",
                f"{_mean(t['worst_missed_rr'])} ({t['worst_missed_max']:.3f})"
                if compared and t["worst_missed_max"] is not None else "–",
                _mean(t["max_error_rr"]) if compared else "–",
                f"{t['verified_max_abs_diff']:.1e}" if compared else "–",
                f"{_mean(t['speedup'], 2)} ({t['exact_seconds']:.2f} s vs {seconds})" if compared else seconds,
            ]))  # fmt: skip
    out = ""
    if heads:
        columns = ["attribute", "layer", "head", "r", "p", "mass (clip)", "mass (silence)"]
        out += (f'<h3>Audio heads: the top 5 by r</h3><table id="audio-heads">{_row(columns, "th")}{"".join(heads)}'
                "</table>")  # fmt: skip
    if triage:
        columns = ["attribute", "grid", "n", "verified / cells", "rho AtP* (AtP)", "worst missed |RR| (max)",
                   "max |RR error|", "max |verified − exact|", "speed-up (exact vs triage)"]  # fmt: skip
        out += (f'<h3>AtP* triage</h3><p class="legend">{html.escape(ATP_NOTE)}</p><table id="atp">'
                f'{_row(columns, "th")}{"".join(triage)}</table>')  # fmt: skip
    return out


def render_report(run: Run, manifest: dict[str, Any] | None) -> str:
    """The report page of one run as an HTML string."""
    settings = run.aggregate["settings"]
    attributes = run.aggregate["attributes"]
    figures = [("Layer-wise tracing", layer_rr_figure([run]), CAPTIONS["layer"]), *_view_figures(run)]
    for attribute in attributes:
        figures.append((f"Token-wise tracing: {attribute}", token_rr_heatmap(run, attribute), CAPTIONS["token"]))
        figures.append((f"Token-wise tracing by segment: {attribute}", segment_rr_figure([run], [attribute]),
                        CAPTIONS["segment"]))  # fmt: skip
        agg = attributes[attribute]
        if agg.get("span_rr"):
            figures.append((f"Group-wise tracing: {attribute}", span_rr_figure([run], [attribute]), CAPTIONS["span"]))
        if agg.get("time_rr") is not None:
            figures.append((f"Time-wise tracing: {attribute}", time_rr_figure(run, attribute), CAPTIONS["time"]))
        for span in agg.get("head_rr") or {}:
            figures.append((f"Head-wise tracing at {span}: {attribute}", head_rr_heatmap(run, attribute, span),
                            CAPTIONS["head"]))  # fmt: skip
        if agg.get("attention") is not None:
            figures.append((f"Attention to the audio: {attribute}", attention_figure(run, attribute),
                            CAPTIONS["attention"]))  # fmt: skip
    if any((grid or {}).get("error_by_layer") for agg in attributes.values() for grid in (agg.get("atp") or {}).values()):
        figures.append(("AtP* triage: where the linear estimate fails", atp_error_figure([run]), CAPTIONS["atp"]))
    plots = "".join(_figure(i, *figure) for i, figure in enumerate(figures)) + _beyond_tables(attributes)
    shown = {k: settings.get(k) for k in ("port", "corruption", "engine", "kind", "window", "modes")}
    shown["modes"] = " + ".join(shown["modes"] or [])
    shown.update({k: settings[k] for k in ("spans", "time_window", "time_hop", "heads") if settings.get(k)})
    shown.update({k: settings[k] for k in ("attention", "atp", "atp_budget") if settings.get(k)})
    summary = ", ".join(f"{k}: {v}" for k, v in shown.items())
    title = f"audiolens-ct report: {run.label}"
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>{STYLE}</style>
<script type="text/javascript">{get_plotlyjs()}</script>
</head><body>
<h1>{html.escape(title)}</h1>
<p>Model <code>{html.escape(str(settings.get("model")))}</code>; {html.escape(summary)}.</p>
<h2>What the numbers mean</h2>{EXPLANATION}
<h2>Samples</h2>{_counts_table(attributes)}
<h3>Excluded clips</h3>{_excluded(attributes)}
<h3>Errors</h3>{_errors(attributes)}
<h2>Figures</h2>{FIGURES}{plots}
<h2>Run manifest</h2><pre id="manifest">{html.escape(json.dumps(manifest, indent=2))}</pre>
</body></html>
"""


def write_report(out_dir: str | Path) -> Path:
    """Write `out_dir/report.html` from the run's aggregate (`aggregate.json`, rewritten first if it is missing or
    older than the records)."""
    out_dir = Path(out_dir)
    aggregate = load_aggregate(out_dir)
    label = Path(str(aggregate["settings"].get("model", out_dir.name))).name
    page = render_report(Run(label, aggregate, out_dir), RunStore(out_dir).manifest())
    return atomic_write_text(out_dir / REPORT, page)
