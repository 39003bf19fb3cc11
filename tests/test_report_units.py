"""The report's pure parts: shaping helpers, figures and the page, without ClickHouse."""

from __future__ import annotations

import pytest

from shadowpipe.config import ConfigError
from shadowpipe.processors.report import figures, page
from shadowpipe.processors.report.commands import since_seconds
from shadowpipe.processors.report.data import (
    delay_curves,
    harm,
    histograms,
    over_time,
    worst_first,
)


def _empty() -> dict:
    return {"generated_ms": 0, "database": "db", "since_ms": 0, "challengers": [],
            "verdicts": [], "overall": [], "over_time": {}, "segments": {"clinic": []},
            "by": ["clinic"], "funnel": {}, "label_delays": {}, "maturity_ms": {},
            "latency": {}, "slo_ms": {}, "alerts": [], "disagreements": {}, "marks": []}


def test_an_empty_report_says_so_in_every_view_and_draws_nothing() -> None:
    text = page.render(_empty())
    assert "<svg" not in text
    for sid in ("summary", "over-time", "segments", "funnel", "label-delay", "alerts",
                "latency", "disagreements"):
        section = text[text.index(f'id="{sid}"'):]
        assert 'class="missing"' in section[:section.index("</section>")], sid
    assert text.index('class="verdict"') < text.index('id="summary"')


def test_a_segment_attribute_no_record_carries_is_named() -> None:
    data = {**_empty(), "segments": {"region": [
        {"challenger": "c", "segment": "(none)", "difference": None}]}}
    assert "no record carries the context attribute &#x27;region&#x27;" in page.render(data)


def test_regression_buckets_get_mae_with_a_normal_interval() -> None:
    row = {"challenger": "c", "bucket_ms": 60_000, "width_ms": 60_000, "compared": 0,
           "agreed": 0, "primary_labelled": 0, "primary_correct": 0,
           "challenger_labelled": 0, "challenger_correct": 0, "primary_regressed": 100,
           "primary_mae": 2.0, "primary_mae_sd": 1.0, "challenger_regressed": 1,
           "challenger_mae": 3.0, "challenger_mae_sd": None}
    (point,) = over_time([row])["c"]
    assert point["metric"] == "mae" and point["agreement"] is None
    assert point["primary"]["lo"] == pytest.approx(2.0 - 1.96 / 10, abs=1e-3)
    assert point["challenger"] is None  # one value gives no interval: not drawn as one
    svg = figures.over_time({"c": [point]}, [], [])
    assert svg is not None and "<svg" in svg


def test_worst_first_orients_accuracy_and_mae_the_same_way() -> None:
    rows = [{"challenger": "c", "segment": "a",
             "difference": {"metric": "mae", "estimate": 0.5, "interval": [0.1, 0.9],
                            "pairs": 50}},
            {"challenger": "c", "segment": "b",
             "difference": {"metric": "accuracy", "estimate": -0.7, "interval": [-0.9, -0.5],
                            "pairs": 50}},
            {"challenger": "c", "segment": "c", "difference": None}]
    assert [r["segment"] for r in worst_first(rows)] == ["b", "a", "c"]
    assert harm(rows[1]) == pytest.approx(0.7)
    assert figures.segments(rows, "clinic") is not None
    assert figures.segments([rows[2]], "clinic") is None


def test_figures_without_data_return_none() -> None:
    assert figures.over_time({}, [], []) is None
    assert figures.label_delays({}, {}) is None
    assert figures.alerts([], []) is None
    assert figures.latency({}, {}) is None
    assert figures.funnel({"c": {"published": 0}}) is None


def test_latency_and_delay_figures_draw_their_reference_lines() -> None:
    hist = histograms([{"challenger": "c", "arm": arm, "bin": b, "records": 5}
                       for arm in ("primary", "challenger") for b in (10, 14)])
    assert figures.latency(hist, {"c": 250.0}) is not None
    curves = delay_curves([{"challenger": "c", "bin": 60, "labels": 3}])
    assert figures.label_delays(curves, {"c": 90_000.0}) is not None


def test_a_zero_difference_prints_without_a_sign_flip() -> None:
    d = {"metric": "accuracy", "estimate": -0.0, "interval": [-0.0, -0.0], "reliable": True}
    assert page.fmt_diff(d) == "accuracy +0.0000 [+0.0000, +0.0000]"


def test_since_must_be_a_positive_duration() -> None:
    assert since_seconds("2w") == 14 * 86400
    for bad in ("0", "-1h", "soon", ""):
        with pytest.raises(ConfigError, match="^--since"):
            since_seconds(bad)


def test_records_without_labels_draw_only_the_agreement_and_say_why() -> None:
    row = {"challenger": "c", "bucket_ms": 0, "width_ms": 60_000, "compared": 50,
           "agreed": 45, "primary_labelled": 0, "primary_correct": 0,
           "challenger_labelled": 0, "challenger_correct": 0, "primary_regressed": 0,
           "challenger_regressed": 0}
    segment = {"challenger": "c", "segment": "east", "difference": None}
    data = {**_empty(), "challengers": ["c"], "over_time": over_time([row]),
            "segments": {"clinic": [segment]}}
    text = page.render(data)
    over = text[text.index('id="over-time"'):text.index('id="segments"')]
    assert "<svg" in over and "no labelled pairs yet: only the agreement is drawn" in over
    segs = text[text.index('id="segments"'):text.index('id="funnel"')]
    assert "<svg" not in segs and "no labelled pairs yet in any clinic segment" in segs
