"""The monitor's pure logic: windows against independent counts, dedup, drift detection."""

from __future__ import annotations

import random
from collections import Counter

from shadowpipe.bench import synthetic
from shadowpipe.config import Settings
from shadowpipe.processors.monitor.core import Monitor, pair_key
from shadowpipe.processors.monitor.stats import LogSketch, psi, wilson

WINDOW_MS = 60_000


def _settings(**changes: object) -> Settings:
    return Settings.load(env={}).replace(segments=("region",), drift_features=("amount",),
                                         **changes)


def _run(monitor: Monitor, records: list[dict]) -> tuple[list[dict], list[dict]]:
    bits: dict[str, int] = {}
    for rec in records:
        key = pair_key(rec)
        bits[key] = monitor.add(rec, bits.get(key, 0))
    return monitor.advance(2**62)


def _redelivered(records: list[dict], seed: int) -> list[dict]:
    """Every record once, plus a quarter of them again a little later (at-least-once)."""
    rng = random.Random(seed)
    out = []
    for i, rec in enumerate(records):
        out.append(rec)
        if rng.random() < 0.25 and i + 5 < len(records):
            out.append(dict(records[i - rng.randrange(min(i, 5) + 1)]))
    return out


def test_window_rows_equal_independent_counts() -> None:
    spec = synthetic.Spec(requests=3000, challengers=("c1", "c2"), seed=7, interval_ms=50,
                          labelled_fraction=0.6, error_rate=0.03, timeout_rate=0.02)
    records = synthetic.stream(spec)
    rows, _ = _run(Monitor(_settings()), _redelivered(records, 1))
    by_key = {(r["challenger"], r["segment"], r["window_start"]): r for r in rows}

    expected: Counter = Counter()
    for rec in records:  # each (pair, state) appears once in the clean stream
        for seg in ("", f"region={rec['context']['region']}"):
            if rec["state"] == "predicted":
                w = rec["event_time"] - rec["event_time"] % WINDOW_MS
                key = (rec["challenger"], seg, w)
                expected[key + ("published",)] += 1
                kind = rec["shadow_error_kind"]
                expected[key + ({"timeout": "timeouts", "exception": "errors"}.get(
                    kind, "joined"),)] += 1
                agree = kind is None and (rec["primary_output"]["label"]
                                          == rec["shadow_output"]["label"])
                expected[key + ("agreed",)] += agree
            else:
                w = rec["label_time"] - rec["label_time"] % WINDOW_MS
                expected[(rec["challenger"], seg, w, "labelled")] += 1
                expected[(rec["challenger"], seg, w, "primary_correct")] += (
                    rec["primary_output"]["label"] == rec["label"])
    keys = {k[:3] for k in expected}
    assert keys == set(by_key)
    for key in keys:
        row = by_key[key]
        for name in ("published", "joined", "errors", "timeouts", "labelled"):
            assert row[name] == expected[key + (name,)], (key, name)
        if row["joined"]:
            assert abs(row["agreement"] * row["joined"] - expected[key + ("agreed",)]) < 1e-6
        if row["labelled"]:
            correct = row["primary_accuracy"] * row["labelled"]
            assert abs(correct - expected[key + ("primary_correct",)]) < 1e-6
        assert row["late_dropped"] == 0


def test_labelled_after_predicted_counts_each_fact_once() -> None:
    monitor = Monitor(_settings())
    rec = synthetic.stream(synthetic.Spec(requests=1, seed=2))
    predicted, labelled = rec
    bits = monitor.add(predicted, 0)
    bits = monitor.add(labelled, bits)
    assert monitor.add(labelled, bits) == bits
    assert monitor.add(predicted, bits) == bits
    rows, _ = monitor.advance(2**62)
    overall = [r for r in rows if r["segment"] == ""]
    assert sum(r["published"] for r in overall) == 1
    assert sum(r["labelled"] for r in overall) == 1


def test_late_records_are_dropped_and_counted() -> None:
    monitor = Monitor(_settings(window_s=60, allowed_lateness_s=10))
    base = synthetic.stream(synthetic.Spec(requests=1, seed=3, labelled_fraction=0))[0]
    t0 = 1_700_000_040_000  # window [1_700_000_040_000, +60 s)
    monitor.add({**base, "request_id": "a", "event_time": t0}, 0)
    monitor.add({**base, "request_id": "b", "event_time": t0 + 75_000}, 0)  # closes it
    monitor.add({**base, "request_id": "late", "event_time": t0 + 1}, 0)
    rows, _ = monitor.advance()
    assert [(r["window_start"], r["published"]) for r in rows if not r["segment"]] == [(t0, 1)]
    rows, _ = monitor.advance(2**62)
    assert sum(r["late_dropped"] for r in rows) == 1


def _accuracy_alerts(alerts: list[dict]) -> list[dict]:
    return [a for a in alerts if a["metric"] == "error_rate" and a["arm"] == "challenger"]


def test_accuracy_drop_in_one_segment_is_detected_without_false_alarms() -> None:
    change = 1_700_000_000_000 + 150_000
    drift = synthetic.Drift(at_ms=change, challenger="c1", attribute="region", value="eu")
    spec = synthetic.Spec(requests=12_000, challengers=("c1",), seed=11, interval_ms=25)
    for seed in (11, 12, 13):
        spec = synthetic.Spec(**{**spec.__dict__, "seed": seed})
        _, alerts = _run(Monitor(_settings()), synthetic.stream(spec))
        assert _accuracy_alerts(alerts) == [], seed
        records = synthetic.stream(synthetic.Spec(**{**spec.__dict__, "drift": drift}))
        _, alerts = _run(Monitor(_settings()), records)
        seg = [a for a in _accuracy_alerts(alerts) if a["segment"] == "region=eu"]
        assert seg and seg[0]["challenger"] == "c1" and seg[0]["detector"] == "ADWIN"
        fired = int(seg[0]["details"]["event_time"])
        assert fired >= change
        labelled_since = sum(1 for r in records if r["state"] == "labelled"
                             and change <= r["label_time"] <= fired)
        assert labelled_since <= 2000, labelled_since
        assert not any(a["segment"] in ("region=us", "region=apac")
                       for a in _accuracy_alerts(alerts))


def test_rules_and_cooldown() -> None:
    settings = _settings(monitor_agreement_min_pct=90, alert_cooldown_s=3600)
    records = synthetic.stream(synthetic.Spec(requests=6000, seed=5, interval_ms=50))
    _, alerts = _run(Monitor(settings), records)
    rules = [a for a in alerts if a["kind"] == "rule" and a["segment"] is None]
    # agreement is ~0.75 in every window, but one alert per hour of event time
    assert len(rules) == 1 and rules[0]["metric"] == "agreement" and rules[0]["value"] < 0.9
    assert len({a["alert_id"] for a in alerts}) == len(alerts)


def test_psi_flags_a_shifted_feature() -> None:
    records = synthetic.stream(synthetic.Spec(requests=6000, seed=6, interval_ms=50))
    for rec in records[len(records) // 2:]:
        rec["num_features"] = {"amount": rec["num_features"]["amount"] + 30}
    _, alerts = _run(Monitor(_settings()), records)
    assert any(a["detector"] == "PSI" and a["metric"] == "feature:amount" for a in alerts)


def test_stats_helpers() -> None:
    sketch = LogSketch()
    for v in range(1000):
        sketch.add(float(v))
    assert abs(sketch.quantile(0.95) - 949) / 949 < 0.02
    low, high = wilson(50, 100)
    assert low < 0.5 < high
    assert psi([50, 50], [90, 10]) > 0.25


def test_docs_show_the_queries_compare_runs() -> None:
    from pathlib import Path

    from shadowpipe.processors.read import QUERIES, render

    text = (Path(__file__).parents[1] / "docs" / "monitor.md").read_text()
    for name in QUERIES:
        assert render(name, "shadowpipe").strip() in text, name
