"""One self-contained HTML report per output directory: figures, counts, errors and the run manifest.

plotly.js is inlined once in the page head, so `report.html` opens offline and can be mailed as one file.
"""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

from plotly.offline import get_plotlyjs

from audiolens_ct.aggregate import INTERVAL, aggregate_run
from audiolens_ct.plots import Run, layer_rr_figure, segment_rr_figure, token_rr_heatmap
from audiolens_ct.store import RunStore, atomic_write_text

REPORT = "report.html"
REASONS = ("clean_wrong", "corrupted_right", "no_drop", "non_finite")

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
pre { background: #f5f5f5; padding: 1em; overflow-x: auto; font-size: 85%; }
"""


def _counts_table(attributes: dict[str, Any]) -> str:
    head = ["attribute", "samples", "kept", *(f"excluded: {r}" for r in REASONS), "errors", "mean P clean",
            "mean P corrupted", "audited max |diff|"]  # fmt: skip
    rows = []
    for attribute, agg in attributes.items():
        counts = agg["counts"]

        def mean(key: str, agg: dict[str, Any] = agg) -> str:
            return "–" if agg[key] is None else f"{agg[key]['mean']:.4g}"

        cells = [attribute, counts["samples"], counts["kept"], *(counts["excluded"].get(r, 0) for r in REASONS),
                 counts["errors"], mean("p_clean"), mean("p_corrupted"), _audited(agg.get("audit"))]  # fmt: skip
        rows.append("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in cells) + "</tr>")
    header = "<tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in head) + "</tr>"
    return f'<table id="counts">{header}{"".join(rows)}</table>'


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


def render_report(run: Run, manifest: dict[str, Any] | None) -> str:
    """The report page of one run as an HTML string."""
    settings = run.aggregate["settings"]
    attributes = run.aggregate["attributes"]
    figures = [("Layer-wise tracing", layer_rr_figure([run]))]
    for attribute in attributes:
        figures.append((f"Token-wise tracing: {attribute}", token_rr_heatmap(run, attribute)))
        figures.append((f"Token-wise tracing by segment: {attribute}", segment_rr_figure([run], [attribute])))
    plots = "".join(
        f"<h3>{html.escape(title)}</h3>" + fig.to_html(full_html=False, include_plotlyjs=False, div_id=f"figure-{i}",
                                                default_height="500px")
        for i, (title, fig) in enumerate(figures)
    )
    shown = {k: settings.get(k) for k in ("port", "corruption", "engine", "kind", "window", "modes")}
    shown["modes"] = " + ".join(shown["modes"] or [])
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
<h3>Errors</h3>{_errors(attributes)}
<h2>Figures</h2><p>Bands: {html.escape(INTERVAL)}.</p>{plots}
<h2>Run manifest</h2><pre id="manifest">{html.escape(json.dumps(manifest, indent=2))}</pre>
</body></html>
"""


def write_report(out_dir: str | Path) -> Path:
    """Aggregate `out_dir`'s records (rewriting `aggregate.json`) and write `out_dir/report.html`."""
    out_dir = Path(out_dir)
    aggregate = aggregate_run(out_dir)
    label = Path(str(aggregate["settings"].get("model", out_dir.name))).name
    page = render_report(Run(label, aggregate, out_dir), RunStore(out_dir).manifest())
    return atomic_write_text(out_dir / REPORT, page)
