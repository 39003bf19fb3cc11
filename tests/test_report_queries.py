"""The report's named queries (processors/read.py) on the real embedded ClickHouse, against
counts computed directly from the records that were stored."""

from __future__ import annotations

import math
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from shadowpipe.config import Settings
from shadowpipe.processors import read
from shadowpipe.processors.report.data import delay_curves, histograms
from tests import report_data

NOW_MS = (int(time.time()) // 60) * 60_000


@pytest.fixture(scope="module")
def stored(stack_settings: Settings) -> tuple[Settings, list[dict[str, Any]]]:
    s = stack_settings.replace(clickhouse_database=f"r{uuid.uuid4().hex[:10]}")
    report_data.insert(s.clickhouse, s.clickhouse_database, NOW_MS)
    return s, report_data.records(NOW_MS)


def _rows(s: Settings, name: str, **params: Any) -> list[dict[str, Any]]:
    return read.rows(read.fetch(s, name, {"since_ms": 0, "challenger": "", "by": "", **params}))


def _labelled(r: dict[str, Any]) -> bool:
    return r.get("label") is not None


def test_funnel_counts_each_stage_within_the_previous(stored: tuple) -> None:
    s, records = stored
    cutoff = NOW_MS - 2 * report_data.DAY
    for name in ("c-bad", "c-eq"):
        mine = [r for r in records if r["challenger"] == name]
        scored = [r for r in mine if r["shadow_output"] is not None and not r["shadow_error"]]
        labelled = [r for r in scored if _labelled(r)]
        (row,) = _rows(s, "funnel", challenger=name, mature_ms=cutoff)
        assert (row["published"], row["scored"], row["joined"], row["labelled"]) == (
            len(mine), len(scored), len(scored), len(labelled))
        assert row["mature"] == sum(1 for r in labelled if r["event_time"] <= cutoff) > 0
        assert row["timeouts"] == sum(1 for r in mine if r["shadow_error_kind"] == "timeout")
        assert row["labels"] == sum(1 for r in mine if _labelled(r))
        assert row["human_labels"] == sum(1 for r in mine
                                          if r.get("feedback_source") == "human") > 0


def test_latency_histograms_hold_every_stored_time(stored: tuple) -> None:
    s, records = stored
    got = histograms(_rows(s, "latency"))
    for name in ("c-bad", "c-eq"):
        for arm, key in (("primary", "primary_latency_ms"), ("challenger", "model_time_ms")):
            times = [r[key] for r in records if r["challenger"] == name]
            expected = Counter(math.floor(4 * math.log2(t)) for t in times)
            bins = got[name][arm]
            assert sum(b[2] for b in bins) == len(times)
            assert {round(4 * math.log2(lo)): n for lo, _, n in bins if n} == dict(expected)


def test_label_delay_curve_is_the_share_of_labels_within_each_delay(stored: tuple) -> None:
    s, records = stored
    curve = delay_curves(_rows(s, "label_delays", challenger="c-bad"))["c-bad"]
    delays = [r["label_delay_ms"] for r in records if r["challenger"] == "c-bad" and _labelled(r)]
    assert curve["labels"] == len(delays)
    for edge, share in zip(curve["edges_ms"], curve["share"], strict=True):
        # the edges are rounded to whole ms; every delay here is a whole minute
        assert share == sum(1 for d in delays if d < edge) / len(delays)
    assert curve["share"][-1] == 1.0


def test_over_time_buckets_add_up_to_the_records(stored: tuple) -> None:
    s, records = stored
    rows = _rows(s, "over_time", challenger="c-bad")
    mine = [r for r in records if r["challenger"] == "c-bad"]
    assert 30 <= len(rows) <= 41
    assert sum(r["published"] for r in rows) == len(mine)
    assert sum(r["challenger_correct"] for r in rows) == sum(
        1 for r in mine if _labelled(r) and r["shadow_output"]["label"] == r["label"])
    width = rows[0]["width_ms"]
    assert width % 60_000 == 0 and all(r["bucket_ms"] % width == 0 for r in rows)


def test_disagreements_put_labelled_ones_first_with_their_features(stored: tuple) -> None:
    s, records = stored
    rows = _rows(s, "disagreements")
    assert {r["challenger"] for r in rows} == {"c-bad"}  # c-eq always agrees
    assert len(rows) == 20
    assert all(r["label"] is not None for r in rows)
    assert all(r["right_arm"] == "primary" and r["context"]["clinic"] == "east" for r in rows)
    by_id = {r["request_id"]: r for r in records if r["challenger"] == "c-bad"}
    first = rows[0]
    assert first["num_features"] == by_id[first["request_id"]]["num_features"]
    assert first["primary_top_p"] == 0.8 and first["distance"] == pytest.approx(0.5)


def test_challengers_and_alert_timeline(stored: tuple) -> None:
    s, records = stored
    found = {r["challenger"]: r for r in _rows(s, "challengers")}
    assert set(found) == {"c-bad", "c-eq"}
    assert found["c-bad"]["first_ms"] == min(r["event_time"] for r in records)
    alerts = _rows(s, "alert_timeline", challenger="c-bad")
    assert [(a["alert_id"], a["status"]) for a in alerts] == [("a1", "firing"), ("a2", "resolved")]
    assert _rows(s, "alert_timeline", challenger="c-eq") == []


def test_a_replay_run_is_read_from_its_own_database(stack_settings: Settings) -> None:
    """With ``--run`` every read goes to the run's database (tables.database), never the
    live one: here only the run's database holds records."""
    live = stack_settings.replace(clickhouse_database=f"l{uuid.uuid4().hex[:10]}")
    replay = live.replace(run="june")
    report_data.insert(live.clickhouse, f"{live.clickhouse_database}_replay_june", NOW_MS)
    assert {r["challenger"] for r in _rows(replay, "challengers")} == {"c-bad", "c-eq"}
    (row,) = _rows(replay, "funnel", challenger="c-bad")
    assert row["published"] == report_data.REQUESTS


def test_the_report_of_a_replay_run_judges_the_run(settings: Settings, tmp_path: Path
                                                   ) -> None:
    from shadowpipe.processors.report.data import gather

    policy = tmp_path / "policy.toml"
    policy.write_text("[defaults.limits]\nlatency_slo_ms = 120\n")
    live = settings.replace(clickhouse_database=f"l{uuid.uuid4().hex[:10]}",
                            segments=("clinic",), policy=str(policy))
    replay = live.replace(run="july")
    report_data.insert(live.clickhouse, f"{live.clickhouse_database}_replay_july", NOW_MS)
    data = gather(replay, "c-bad")
    assert data["database"] == f"{live.clickhouse_database}_replay_july"
    (verdict,) = data["verdicts"]
    assert verdict["challenger"] == "c-bad" and verdict["verdict"] == "REJECT"
    assert data["funnel"]["c-bad"]["published"] == report_data.REQUESTS
    assert data["slo_ms"] == {"c-bad": 120.0}  # the SLO line comes from the verdict policy


def test_arm_counts_are_the_arms_without_the_auc(stored: tuple) -> None:
    s, _ = stored
    for by in ("", "clinic"):
        arms = _rows(s, "arms", by=by)
        counts = _rows(s, "arm_counts", by=by)
        assert len(arms) == len(counts) > 0
        for full, lite in zip(arms, counts, strict=True):
            assert {k: v for k, v in full.items() if not k.endswith("_auc")} == lite
