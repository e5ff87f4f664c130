"""Figures and a report a reader understands at a glance: bands without markers, n on every panel, whole-layer
ticks, token columns with their position from the end, segment lines that stay apart, excluded clips listed with
their predictions, and every number explained next to its table or figure."""

import json
import os
import re
import time
from dataclasses import replace

from test_experiments import RECORDS, B, C, record, result, runs

from audiolens_ct.aggregate import Run, aggregate_records
from audiolens_ct.plots import layer_rr_figure, segment_rr_figure, token_rr_heatmap
from audiolens_ct.report import write_report
from audiolens_ct.store import RunStore

EXCLUDED = replace(C, clean_prediction="pig", corrupted_prediction="pig", p_clean=0.31, p_corrupted=0.12)


def draws_markers(trace):
    """Whether a scatter trace shows markers; plotly draws "lines+markers" by default under 20 points."""
    mode = trace.mode or ("lines+markers" if len(trace.x) < 20 else "lines")
    return "markers" in mode


def bands(fig):
    return [t for t in fig.data if t.name.endswith("95% CI")]


def curves(fig):
    return [t for t in fig.data if not t.name.endswith("95% CI")]


def panel_subtitles(fig):
    return {a.text.split("<br>")[0]: a.text for a in fig.layout.annotations}


def one_run(records, label="m1"):
    return Run(label, {"settings": {"model": label}, "attributes": aggregate_records(records)})


def report_page(tmp_path, records):
    """The report of an output directory holding `records`."""
    store = RunStore(tmp_path)
    store.open({"model": "/models/tiny", "port": "qwen2-audio", "corruption": "silence"}, {}, {"torch": "x"}, "cmd")
    for rec in records:
        store.write_record(rec)
    return write_report(tmp_path).read_text()


def test_confidence_bands_are_filled_areas_without_markers():
    for fig in (layer_rr_figure(runs()), segment_rr_figure(runs(), ["animal"])):
        assert bands(fig), "the fixture has curves with n = 2"
        for band in bands(fig):
            assert band.fill == "toself" and not draws_markers(band), band.name


def test_each_panel_gives_n_and_flags_curves_without_an_interval():
    overlaid = panel_subtitles(layer_rr_figure(runs()))["animal"]
    assert "m1: n = 2" in overlaid and "m2: n = 1 ⚠ no 95% CI" in overlaid
    assert "⚠" not in overlaid.split("m2:")[0]  # m1 has an interval
    m1, m2 = curves(layer_rr_figure(runs()))
    assert not any(s.endswith("-open") for s in m1.marker.symbol)
    assert all(s.endswith("-open") for s in m2.marker.symbol)  # one sample: the point is drawn open
    assert panel_subtitles(layer_rr_figure(runs()[:1]))["animal"].endswith("n = 2</span>")
    segments = panel_subtitles(segment_rr_figure(runs()[:1], ["animal"]))["animal"]
    assert "early prompt: n = 1 ⚠ no 95% CI" in segments and "object tokens: n = 2" in segments
    heat_title = token_rr_heatmap(runs()[0], "animal").layout.title.text
    assert "n = 1–2 per position" in heat_title  # B alone reaches the third token from the end


def test_layer_axes_tick_whole_layers_only():
    deep = result([0.5] * 45, [[0.5] * 4] * 45, [4, 5, 6, 7], 8, {"last": [7]})
    for run in (runs()[0], one_run([record("deep", deep)])):
        heat = token_rr_heatmap(run, "animal")
        ticks = list(heat.layout.yaxis.tickvals)
        n_layers = len(heat.data[0].z)
        assert ticks[0] == 0 and all(isinstance(t, int) for t in ticks) and max(ticks) < n_layers
        assert len(ticks) <= 25  # a deep model is not ticked at every layer
        assert list(layer_rr_figure([run]).layout.xaxis.tickvals) == ticks
    assert list(token_rr_heatmap(runs()[0], "animal").layout.yaxis.tickvals) == [0, 1]  # not 0, 0.5, 1


def test_heatmap_columns_show_the_token_and_its_position_from_the_end():
    run = one_run([record("b", replace(B, str_tokens=["a", "b", "c", "d", " cat", "-", " is", "\n"]))])
    xaxis = token_rr_heatmap(run, "animal").layout.xaxis
    assert list(xaxis.tickvals) == [-3, -2, -1, 0]
    assert list(xaxis.ticktext) == ['"cat" (−3)', '"-" (−2)', '"is" (−1)', '"⏎" (0)']


def test_segment_lines_differ_in_dash_and_marker_so_overlaps_stay_visible():
    single = curves(segment_rr_figure(runs()[:1], ["animal"]))
    assert len(single) == 4
    assert len({t.line.dash for t in single}) == 4
    assert len({t.marker.symbol[-1].removesuffix("-open") for t in single}) == 4
    assert len({t.marker.size for t in single}) == 4  # coincident markers nest instead of hiding each other
    overlaid = curves(segment_rr_figure(runs(), ["animal"]))
    last = [t for t in overlaid if t.name.endswith("last token")]
    assert len({t.line.color for t in last}) == 2  # the same segment of two runs: told apart by colour


def test_aggregate_lists_excluded_samples_with_their_predictions():
    agg = aggregate_records([*RECORDS, record("e", EXCLUDED)])["animal"]
    assert agg["excluded"] == [
        {"sample_id": "c", "reason": "clean_wrong", "target": "hen", "clean_prediction": "hen",
         "corrupted_prediction": "pig", "p_clean": 0.8, "p_corrupted": 0.2},
        {"sample_id": "e", "reason": "clean_wrong", "target": "hen", "clean_prediction": "pig",
         "corrupted_prediction": "pig", "p_clean": 0.31, "p_corrupted": 0.12},
    ]  # fmt: skip
    assert agg["counts"]["excluded"] == {"clean_wrong": 2}  # the counts keep their shape


def test_report_lists_excluded_clips_with_their_predictions_in_a_collapsible_table(tmp_path):
    page = report_page(tmp_path, [*RECORDS, record("e", EXCLUDED)])
    details = re.search(r'<details id="excluded">.*?</details>', page, re.S).group(0)
    assert "<th>clean prediction</th><th>corrupted prediction</th><th>P clean</th><th>P corrupted</th>" in details
    assert "<td>animal</td><td>e</td><td>clean_wrong</td><td>hen</td><td>pig</td><td>pig</td><td>0.31</td>" \
           "<td>0.12</td>" in details  # fmt: skip
    assert "<td>c</td>" in details and "<td>d</td>" not in details  # d failed: it is an error, not an exclusion


def test_report_samples_table_says_which_columns_average_kept_samples_and_explains_every_column(tmp_path):
    page = report_page(tmp_path, RECORDS)
    table = re.search(r'<table id="counts">.*?</table>', page, re.S).group(0)
    headers = re.findall(r"<th>(.*?)</th>", table)
    assert [h for h in headers if h.startswith("mean P")] == ["mean P clean (kept)", "mean P corrupted (kept)"]
    legend = re.search(r'<ul class="legend" id="counts-legend">.*?</ul>', page, re.S).group(0)
    assert re.findall(r"<li><b>(.*?)</b>", legend) == headers
    assert "largest |fast − reference| probability difference" in legend
    assert "over kept samples only" in legend


def test_report_explains_rr_bands_and_n_once_and_captions_every_figure(tmp_path):
    page = report_page(tmp_path, RECORDS)
    figures = page.split("<h2>Figures</h2>")[1]
    for term in ("<b>RR</b>", "<b>n</b>", "<b>Shaded bands</b> are 95% confidence intervals", "<b>Open markers</b>"):
        assert figures.count(term) == 1, term
    assert figures.count('<p class="caption">') == page.count("Plotly.newPlot") == 3


def test_aggregates_do_not_depend_on_the_order_records_come_in():
    assert aggregate_records(RECORDS[::-1]) == aggregate_records(RECORDS)


def test_the_report_reads_a_current_aggregate_and_rewrites_one_older_than_the_records(tmp_path, monkeypatch):
    import audiolens_ct.aggregate as aggregate_module

    report_page(tmp_path, RECORDS)  # no aggregate.json yet: written
    written = tmp_path / "aggregate.json"
    now = time.time_ns()
    os.utime(written, ns=(now + 10**10, now + 10**10))  # newer than every record: current

    def must_not_aggregate(out_dir):
        raise AssertionError("a current aggregate.json was aggregated again")

    with monkeypatch.context() as patch:
        patch.setattr(aggregate_module, "aggregate_run", must_not_aggregate)
        write_report(tmp_path)
    path = RunStore(tmp_path).write_record(record("f", B))
    os.utime(path, ns=(now + 2 * 10**10, now + 2 * 10**10))  # a record newer than the aggregate: stale
    page = write_report(tmp_path).read_text()
    assert json.loads(written.read_text())["attributes"]["animal"]["counts"]["kept"] == 3
    assert "<td>animal</td><td>5</td><td>3</td>" in page
