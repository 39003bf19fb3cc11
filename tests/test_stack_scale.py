"""``shadowpipe stack up --workers shadow=2,join=2,monitor=2 --redis-cluster 3``: scale-out
on one machine, with its own embedded stack (the session's cannot be shared: ``up`` starts
the broker and Redis it is configured for).

Both shadow workers get partitions of the inference topic, the joiners merge on a real
3-master Redis Cluster, and every request ends up joined exactly once per challenger in
ClickHouse; after a SIGKILL of one shadow worker its partitions move to the other and the
counts stay exact. The second monitor is a standby (one process may open the embedded
ClickHouse) that serves once the first is killed; in ``monitor_mode=partitioned`` both
monitors work, the first alone writes, and the second takes the writes over once the
first is killed.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from shadowpipe.config import Settings
from shadowpipe.fleet import Fleet, Worker, get_json
from shadowpipe.stack import free_port
from tests.conftest import chdb_rows, wait_for

REPO = Path(__file__).resolve().parents[1]
CHALLENGERS = """
[[challengers]]
name = "thr"
version = "1"
kind = "callable"
location = "tests.scale_challengers:threshold"
"""


def _cli(env: dict[str, str], *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "shadowpipe.cli", *args], env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def scale_env(tmp_path: Path) -> Iterator[dict[str, str]]:
    """An own stack home and ports; ``stack down`` afterwards, whatever happened."""
    (tmp_path / "challengers.toml").write_text(CHALLENGERS)
    env = {**os.environ, "PYTHONPATH": str(REPO), "SHADOWPIPE_HOME": str(tmp_path / "home"),
           "SHADOWPIPE_KAFKA_BOOTSTRAP": f"127.0.0.1:{free_port()}",
           "SHADOWPIPE_REDIS_URL": f"redis://127.0.0.1:{free_port()}/0",
           "SHADOWPIPE_CHALLENGERS": str(tmp_path / "challengers.toml"),
           "SHADOWPIPE_FEEDBACK_HORIZON_S": "3600", "SHADOWPIPE_LOG_LEVEL": "INFO"}
    yield env
    _cli(env, "stack", "down", timeout=120)


def test_bad_worker_specs_are_one_line_exit_2(tmp_path: Path) -> None:
    env = {**os.environ, "SHADOWPIPE_HOME": str(tmp_path)}
    for spec, word in (("shadow=x", "whole number"), ("gpu=2", "KIND=N"), ("shadow", "KIND=N")):
        out = _cli(env, "stack", "up", "--workers", spec, timeout=60)
        assert out.returncode == 2 and out.stderr.count("\n") == 1, out.stderr
        assert "--workers" in out.stderr and word in out.stderr
    out = _cli(env, "stack", "up", "--redis-cluster", "2", timeout=60)
    assert out.returncode == 2 and "--redis-cluster" in out.stderr
    assert not (tmp_path / "stack.json").exists()  # nothing was started


def test_two_of_each_split_partitions_and_join_exactly_once(scale_env: dict[str, str]) -> None:
    up = _cli(scale_env, "stack", "up", "--workers", "shadow=2,join=2,monitor=2",
              "--redis-cluster", "3")
    assert up.returncode == 0, up.stderr[-2000:]
    assert "redis cluster: 3 masters at redis+cluster://" in up.stdout
    settings = Settings.load(env=scale_env)
    workers, cluster = Fleet(settings).recorded()
    shadow = [w for w in workers if w.kind == "shadow"]
    assert len(shadow) == 2 and len({w.port for w in workers}) == len(workers) == 6
    for w in workers:
        assert f"{w.name}: pid {w.pid}" in up.stdout and str(w.port) in up.stdout
    assert [w.standby for w in workers if w.kind == "monitor"] == [False, True]

    both = wait_for("both shadow workers own partitions",
                 lambda: _partitions(shadow) if all(_partitions(shadow)) else None)
    assert sorted(p for parts in both for p in parts) == list(range(settings.partitions))

    first = _emit(settings, "a", 1500)
    wait_for("the first requests consumed by both shadow workers",
          lambda: all(_stats(w)["consumed"] > 0 for w in shadow)
          and sum(_stats(w)["consumed"] for w in shadow) >= len(first))

    victim, survivor = shadow
    os.kill(victim.pid, signal.SIGKILL)
    wait_for("the killed worker's partitions moved to the survivor",
          lambda: _stats(survivor)["assigned_partitions"] == list(range(settings.partitions)))
    second = _emit(settings, "b", 1500)
    wait_for("the second requests consumed by the survivor",
          lambda: _stats(survivor)["consumed"] >= len(second))

    monitor, standby = (w for w in workers if w.kind == "monitor")
    expected = len(first) + len(second)
    wait_for("every request joined and labelled in ClickHouse",
          lambda: _arm_counts(monitor) == (expected, expected // 2), timeout_s=180)
    # The embedded ClickHouse has one writer: the standby monitor takes the directory over.
    os.kill(monitor.pid, signal.SIGKILL)
    wait_for("the standby monitor serving", lambda: _arm_counts(standby) == (expected,
                                                                         expected // 2))
    assert cluster["url"].startswith("redis+cluster://")

    down = _cli(scale_env, "stack", "down", timeout=120)
    assert down.returncode == 0 and f"{victim.name}: was not running" in down.stdout
    assert f"{standby.name}: stopped in " in down.stdout, down.stdout
    rows = chdb_rows(settings.home_path / "clickhouse",
                     "SELECT request_id, count() FROM shadowpipe.joined_records FINAL "
                     "GROUP BY request_id")
    assert {r[0] for r in rows} == set(first) | set(second)
    assert {r[1] for r in rows} == {1}  # one challenger: one row per request


def test_partitioned_monitors_share_the_series_and_the_sink_fails_over(
    scale_env: dict[str, str]
) -> None:
    """``monitor_mode=partitioned``: ``monitor=2`` starts two active monitors (no standby)
    that split the series partitions; the first one alone writes the embedded ClickHouse.
    Killed with SIGKILL, its sink moves to the second (restarted with the sink on), which
    stores the traffic sent afterwards and serves the queries."""
    env = {**scale_env, "SHADOWPIPE_MONITOR_MODE": "partitioned", "SHADOWPIPE_SEGMENTS": "site"}
    up = _cli(env, "stack", "up", "--workers", "shadow=1,join=1,monitor=2")
    assert up.returncode == 0, up.stderr[-2000:]
    settings = Settings.load(env=env)
    monitors = [w for w in Fleet(settings).recorded()[0] if w.kind == "monitor"]
    assert [w.standby for w in monitors] == [False, False]
    assert "sink on" in up.stdout and "sink off" in up.stdout, up.stdout
    split = wait_for("both monitors own series partitions",
                     lambda: [_stats(w)["partitions"] for w in monitors]
                     if all(_stats(w)["partitions"] for w in monitors) else None)
    assert sorted(p for parts in split for p in parts) == list(range(settings.partitions))
    assert [_stats(w)["rows_written"] is not None for w in monitors] == [True, False]

    ids = _emit(settings, "p", 1000, sites=8)  # 18 series: some on each monitor
    wait_for("every request joined and labelled in ClickHouse",
             lambda: _arm_counts(monitors[0]) == (len(ids), len(ids) // 2), timeout_s=180)
    wait_for("both monitors counting their series",
             lambda: all(_stats(w)["counted"] > 0 for w in monitors))

    os.killpg(monitors[0].pid, signal.SIGKILL)
    wait_for("the second monitor running the sink",
             lambda: (get_json(monitors[1].stats_url) or {}).get("rows_written") is not None,
             timeout_s=180)
    more = _emit(settings, "q", 500, sites=8)
    total = len(ids) + len(more)
    wait_for("the traffic after the kill stored by the second monitor",
             lambda: _arm_counts(monitors[1]) == (total, total // 2), timeout_s=180)
    assert "restarting this monitor with the sink on" in Path(monitors[1].log).read_text()

    down = _cli(env, "stack", "down", timeout=120)
    assert down.returncode == 0
    assert f"{monitors[0].name}: was not running" in down.stdout, down.stdout
    assert f"{monitors[1].name}: stopped in " in down.stdout, down.stdout


def _emit(settings: Settings, prefix: str, n: int, sites: int = 0) -> list[str]:
    """``n`` requests through the producer library, feedback for every second one; with
    ``sites``, a ``site`` context attribute taking that many values."""
    from shadowpipe.producers import Emitter

    emitter = Emitter(settings, name=f"scale-{prefix}")
    rng = random.Random(prefix)
    ids = [f"{prefix}-{i}" for i in range(n)]
    for i, rid in enumerate(ids):
        context = {"site": f"s{i % sites}"} if sites else None
        assert emitter.emit_inference(rid, {f"x{j}": rng.random() for j in range(4)}, "hi",
                                      model="primary", version="1", latency_ms=1.0,
                                      context=context)
        if i % 2 == 0:
            assert emitter.emit_feedback(rid, "hi" if rng.random() > 0.5 else "lo")
    assert emitter.close(30) == 0
    return ids


def _stats(w: Worker) -> dict[str, Any]:
    body = get_json(w.stats_url)
    assert body is not None, f"{w.name} does not answer on port {w.port}"
    return body


def _partitions(shadow: list[Worker]) -> list[list[int]]:
    return [_stats(w)["assigned_partitions"] for w in shadow]


def _arm_counts(monitor: Worker) -> tuple[int, int] | None:
    body = get_json(f"http://127.0.0.1:{monitor.port}/shadowpipe/query/?name=arm_counts"
                    "&since_ms=0&challenger=&by=")
    if not body or "rows" not in body:
        return None
    rows = [dict(zip(body["columns"], r, strict=True)) for r in body["rows"]]
    mine = [r for r in rows if r["challenger"] == "thr" and r["segment"] == ""]
    return (mine[0]["published"], mine[0]["labelled"]) if mine else None

