"""Alert conditions: the primary's drift is one alert, and a persistent shift is one alert
(firing, then resolved), repeated only after the repeat interval."""

from __future__ import annotations

import pickle
import random

from shadowpipe.bench import synthetic
from shadowpipe.config import Settings
from shadowpipe.processors.monitor.core import Monitor, MonitorState, pair_key

START = 1_700_000_000_000
WINDOW_MS = 60_000
FIRST = START - START % WINDOW_MS  # start of the stream's first window


def _settings(**changes: object) -> Settings:
    return Settings.load(env={}).replace(segments=("region",), drift_features=("amount",),
                                         **changes)


def _run(monitor: Monitor, records: list[dict]) -> list[dict]:
    bits: dict[str, int] = {}
    alerts = []
    for i, rec in enumerate(records):
        key = pair_key(rec)
        bits[key] = monitor.add(rec, bits.get(key, 0))
        if i % 500 == 0:  # batches, as the pipeline runs them
            alerts += monitor.advance()[1]
    return alerts + monitor.advance(2**62)[1]


def _primary_drift(requests: int, change: int, until: int) -> list[dict]:
    """Three challengers (one the control, a copy of the primary) and a primary whose
    accuracy drops by 35 points between ``change`` and ``until`` (event time)."""
    spec = synthetic.Spec(requests=requests, challengers=("c1", "c2", "ctrl"), seed=21,
                          interval_ms=25)
    records = synthetic.stream(spec)
    outputs: dict[str, dict] = {}
    for rec in records:
        rid = rec["request_id"]
        out = outputs.get(rid)
        if out is None:
            out = outputs[rid] = dict(rec["primary_output"])
            if change <= rec["event_time"] < until and random.Random(rid).random() < 0.35:
                out["label"] = "wrong"  # never the truth
        rec["primary_output"] = out
        if rec["challenger"] == "ctrl":
            rec["is_control"] = True
            rec["shadow_output"] = dict(out)
            rec["shadow_error"] = rec["shadow_error_kind"] = None
    return records


def test_a_drift_of_the_primary_is_one_alert_and_resolves() -> None:
    change, until = START + 150_000, START + 300_000
    records = _primary_drift(18_000, change, until)
    monitor = Monitor(_settings())
    alerts = _run(monitor, records)
    errors = [a for a in alerts if a["metric"] == "error_rate" and a["segment"] is None]
    primary = [a for a in errors if a["arm"] == "primary"]
    firing = [a for a in primary if a["status"] == "firing"]
    assert len(firing) == 1, [(a["challenger"], a["status"]) for a in primary]
    assert firing[0]["challenger"] == "" and firing[0]["details"]["model"] == "m"
    assert int(firing[0]["details"]["event_time"]) >= change
    # the control is a copy of the primary: no second alert about the same drift
    assert not [a for a in errors if a["arm"] == "challenger"]
    resolved = [a for a in primary if a["status"] == "resolved"]
    assert len(resolved) == 1 and int(resolved[0]["details"]["event_time"]) >= until
    assert resolved[0]["details"]["resolves"] == firing[0]["alert_id"]
    # the primary's error series holds each labelled request once, not once per challenger
    labelled = {r["request_id"] for r in records if r["state"] == "labelled"}
    assert monitor.state.model_detectors[("m", "", "error_rate:primary")].seen == len(labelled)


def _shifted(windows: set[int], requests: int = 18_000) -> list[dict]:
    """One challenger, 20 requests/s; ``amount`` shifted by +30 in the given windows."""
    records = synthetic.stream(synthetic.Spec(requests=requests, seed=6, interval_ms=50,
                                              labelled_fraction=0.0))
    for rec in records:
        if (rec["event_time"] - FIRST) // WINDOW_MS in windows:
            rec["num_features"] = {"amount": rec["num_features"]["amount"] + 30}
    return records


def _psi(alerts: list[dict]) -> list[tuple[str, int]]:
    return [(a["status"], (a["window_start"] - FIRST) // WINDOW_MS) for a in alerts
            if a["detector"] == "PSI" and a["metric"] == "feature:amount"]


def test_a_persistent_shift_fires_once_then_resolves() -> None:
    alerts = _run(Monitor(_settings(alert_cooldown_s=0)), _shifted(set(range(5, 10))))
    assert _psi(alerts) == [("firing", 5), ("resolved", 10)]


def test_a_firing_condition_repeats_after_the_repeat_interval() -> None:
    records = _shifted(set(range(5, 10)))
    alerts = _run(Monitor(_settings(alert_cooldown_s=0, alert_repeat_s=120)), records)
    assert _psi(alerts) == [("firing", 5), ("firing", 7), ("firing", 9), ("resolved", 10)]
    again = _run(Monitor(_settings(alert_cooldown_s=0, alert_repeat_s=120)), records)
    assert [a["alert_id"] for a in again] == [a["alert_id"] for a in alerts]  # a replay
    assert len({a["alert_id"] for a in alerts}) == len(alerts)


def test_a_flapping_condition_resolves_after_the_cooldown() -> None:
    alerts = _run(Monitor(_settings(alert_cooldown_s=300)), _shifted({5, 7, 9}))
    # shifted, clear, shifted, clear...: firing from window 5, resolved at the first clear
    # window 300 s after it fired
    assert _psi(alerts) == [("firing", 5), ("resolved", 10)]


def test_conditions_survive_a_checkpoint() -> None:
    records = _shifted(set(range(5, 10)))
    cut = next(i for i, r in enumerate(records) if r["event_time"] >= FIRST + 7 * WINDOW_MS)
    monitor = Monitor(_settings(alert_cooldown_s=0))
    first = _run_until(monitor, records[:cut])
    restored = Monitor(monitor.settings, pickle.loads(pickle.dumps(monitor.state)))
    assert _psi(first + _run(restored, records[cut:])) == [("firing", 5), ("resolved", 10)]


def _run_until(monitor: Monitor, records: list[dict]) -> list[dict]:
    bits: dict[str, int] = {}
    for rec in records:
        bits[pair_key(rec)] = monitor.add(rec, bits.get(pair_key(rec), 0))
    return monitor.advance()[1]


def test_an_old_checkpoint_loads() -> None:
    state = MonitorState()
    saved = {k: v for k, v in state.__dict__.items() if k not in ("conditions", "drift")}
    saved["last_alert"] = {("drift",): 1}  # a field of the previous version
    old = MonitorState.__new__(MonitorState)
    old.__setstate__(saved)
    assert old.conditions == {} and not hasattr(old, "last_alert")
