"""``shadowpipe bench shadow|join|monitor`` on short runs against the session's stack: each
prints one JSON object with its keys (what the issue-16 targets are read from) and its
in-run baseline, and accounts for what it fed in. Figures are not judged here: timings
on a shared test machine say nothing. (``bench emit`` and ``bench verdict`` have their
own tests: test_producer_bench.py, test_verdict_interfaces.py.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from shadowpipe.config import Settings


def _bench(settings: Settings, tmp_path: Path, *args: str) -> dict[str, Any]:
    """The JSON object of ``shadowpipe bench ARGS --json`` run in a child process."""
    env = {**os.environ, **settings.to_env(), "TMPDIR": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-m", "shadowpipe.cli", "bench", *args, "--json"],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


def test_bench_shadow_scores_every_event_against_its_ceiling(
    settings: Settings, tmp_path: Path
) -> None:
    out = _bench(settings, tmp_path, "shadow", "--events", "2000", "--lag-events", "500",
                 "--lag-rate", "1000", "--passes", "1")
    assert {"worker_events_per_s", "ceiling_events_per_s", "efficiency", "p99_queue_lag_ms",
            "worker_runs_events_per_s", "ceiling_runs_events_per_s"} <= set(out)
    ratio = out["worker_events_per_s"] / out["ceiling_events_per_s"]
    assert out["efficiency"] == pytest.approx(ratio, abs=0.002)  # the baseline of the same run
    assert out["predictions"] == out["events"] + out["lag_phase_events"] == 2500
    assert out["worker_errors"] == 0


def test_bench_join_joins_every_pair_in_memory_and_through_the_worker(
    settings: Settings, tmp_path: Path
) -> None:
    out = _bench(settings, tmp_path, "join", "--requests", "1500", "--worker-requests", "500")
    assert {"joins_per_s", "redis_bytes_per_pending_request", "baseline_set_per_s",
            "merge_vs_set", "p99_join_latency_ms", "targets_met"} <= set(out)
    assert out["requests"] == 1500 and out["pending_requests"] > 0
    assert out["joined_records"] > 0 and out["labelled_records"] > 0
    worker = out["worker"]
    assert worker["complete"] is True
    assert worker["joined_pairs"] == 500 * out["challengers"]


def test_bench_monitor_drains_every_record(settings: Settings, tmp_path: Path) -> None:
    out = _bench(settings, tmp_path, "monitor", "--records", "3000", "--latency-seconds", "1")
    assert {"records_per_s", "clickhouse_rows_per_s", "p99_end_to_end_ms",
            "decode_only_records_per_s", "ratio_to_decode_only", "target_records_per_s"} <= set(out)
    assert out["records"] == 3000
    assert out["latency_phase_records"] > 0
