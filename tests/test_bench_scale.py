"""``shadowpipe bench join --redis-cluster 3`` and ``shadowpipe bench pipeline`` on short runs:
the JSON keys, and that what was fed in is accounted for. Timings are not judged here."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from shadowpipe.config import Settings
from tests.test_bench_runs import _bench


def test_bench_join_on_a_local_cluster_joins_every_pair(
    settings: Settings, tmp_path: Path
) -> None:
    out = _bench(settings, tmp_path, "join", "--requests", "1000", "--worker-requests", "300",
                 "--redis-cluster", "3")
    cluster = out["cluster"]
    assert cluster["masters"] == 3
    assert cluster["requests"] == out["requests"] == 1000
    # Same seed, same workload: the cluster joins exactly what the single Redis joined.
    assert cluster["joined_records"] == out["joined_records"] > 0
    assert cluster["pending_requests"] == 1000
    assert cluster["worker"]["complete"] is True
    assert cluster["worker"]["joined_pairs"] == 300 * out["challengers"]
    assert out["cluster_vs_single"] > 0


PIPELINE_KEYS = {"requests_per_s", "predictions_per_s", "e2e_p50_ms", "e2e_p99_ms", "lag_max",
                 "drift_to_alert_s", "sustainable", "trials", "requests_emitted"}
SHORT = ("--lag-window-s", "5", "--probe-requests", "1000", "--max-trials", "1",
         "--alert-timeout-s", "30")


def test_bench_pipeline_accounts_for_every_request(settings: Settings, tmp_path: Path) -> None:
    out = _bench(settings, tmp_path, "pipeline", *SHORT)
    assert set(out) >= PIPELINE_KEYS
    assert out["challengers"] == 2 and out["processes_per_worker"] == 1
    # Probe and trial requests all stored once per challenger in ClickHouse.
    assert out["requests_emitted"] > 1000
    assert out["stored_per_challenger"] == {"logreg": out["requests_emitted"],
                                            "control": out["requests_emitted"]}
    assert out["requests_accounted"] is True
    assert out["emitter"]["dropped"] == 0 and out["e2e_samples"] > 0
    assert out["predictions_total"] >= 2 * out["emitter"]["requests"]  # at least once
    # Every process of the pipeline used CPU for the trial's requests, and the parts add up.
    cpu = out["cpu_us_per_request"]
    roles = {"shadow", "join", "monitor", "kafka", "redis", "emitter"}
    assert set(cpu) == roles | {"total"} and all(cpu[r] > 0 for r in roles)
    assert abs(sum(cpu[r] for r in roles) - cpu["total"]) <= 0.1 * len(roles)
    assert 0 < out["cores_busy"] <= os.cpu_count() + 0.5  # tick rounding
    assert out["cpu_bound_requests_per_s"] == pytest.approx(
        os.cpu_count() * 1e6 / cpu["total"], rel=0.01)
    # Which stage's lag grows: a least-squares slope is linear, so the stages' add up.
    slopes = out["lag_slope_by_stage"]
    assert set(slopes) == set(out["lag_max_by_stage"]) == {"shadow", "join", "monitor"}
    assert sum(slopes.values()) == pytest.approx(out["lag_slope_per_s"], abs=0.1 * len(slopes))
    assert out["trials"][0]["lag_slope_by_stage"] == slopes


def test_bench_pipeline_scale_2_reports_both_runs(settings: Settings, tmp_path: Path) -> None:
    """With partitioned monitors (the single mode's second monitor would be a standby)."""
    out = _bench(settings, tmp_path, "pipeline", "--scale", "2", "--monitor-mode",
                 "partitioned", *SHORT)
    assert set(out) >= PIPELINE_KEYS and "scale_ratio" in out
    assert out["processes_per_worker"] == 2 and out["with_1"]["processes_per_worker"] == 1
    assert out["challengers"] == out["with_1"]["challengers"] == 3
    assert out["monitor_mode"] == "partitioned"
    assert out["monitor_processes_active"] == 2 and out["with_1"]["monitor_processes_active"] == 1
    stages = {"shadow", "join", "monitor-repartition", "monitor-series", "monitor"}
    assert set(out["lag_max_by_stage"]) == set(out["lag_slope_by_stage"]) == stages
    # Queryable = committed by the sink: the end-to-end latency is resolved in this mode too.
    assert out["e2e_samples"] > 0 and out["with_1"]["e2e_samples"] > 0
    assert out["requests_accounted"] is True and out["with_1"]["requests_accounted"] is True
    assert out["scale_ratio"] == round(out["requests_per_s"] / out["with_1"]["requests_per_s"], 3)
