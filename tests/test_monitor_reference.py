"""Reference profiles and drift statistics on the real embedded stack: a profile set from a
CSV or Parquet file (feature names with spaces and non-ASCII characters), PSI measured
against it, every window's statistic stored, and ``reference set`` through a running
monitor."""

from __future__ import annotations

import csv
import json
import os
import random
import subprocess
import sys
import time
import urllib.parse
import urllib.request
import uuid
from functools import partial
from pathlib import Path
from typing import Any

import pytest

from shadowpipe.bench import synthetic
from shadowpipe.config import ConfigError, Settings
from shadowpipe.kafka import producer
from shadowpipe.processors.monitor import reference
from shadowpipe.processors.monitor.pipeline import Message, Pipeline
from shadowpipe.schemas.codec import Codec
from tests.conftest import spawn_cli, wait_for

CODEC = Codec()
AMOUNT, REGION = "amount due", "région"
RECENT_MS = (int(time.time()) // 3600 - 2) * 3_600_000  # older rows fall to the TTL


def _write_csv(path: Path, rows: int = 3000, seed: int = 1) -> Path:
    rng = random.Random(seed)
    with path.open("w", newline="", encoding="utf-8") as f:
        out = csv.writer(f)
        out.writerow([AMOUNT, REGION, "note"])
        for _ in range(rows):
            out.writerow([f"{rng.gauss(100.0, 15.0):.3f}", rng.choice(("eu", "us", "apac")),
                          ""])
    return path


def _records(requests: int, shift_from: int) -> list[dict]:
    """c1's stream: ``amount due`` +30 from request ``shift_from`` on; ``région`` as the
    context and as a categorical feature."""
    spec = synthetic.Spec(requests=requests, seed=4, interval_ms=100, start_ms=RECENT_MS,
                          features=(AMOUNT,), segments={REGION: ("eu", "us", "apac")},
                          labelled_fraction=0.0)
    records = synthetic.stream(spec)
    first_shifted = spec.start_ms + shift_from * 100
    for rec in records:
        shift = 30.0 if rec["event_time"] >= first_shifted else 0.0
        rec["num_features"] = {AMOUNT: rec["num_features"][AMOUNT] + shift}
        rec["cat_features"] = {REGION: rec["context"][REGION]}
    return records


def _rows(client: Any, sql: str) -> list[dict]:
    result = client.query(sql)
    return [dict(zip(result.column_names, row, strict=True)) for row in result.result_rows]


def test_psi_against_a_stored_profile_and_every_window_stored(settings: Settings,
                                                              tmp_path: Path) -> None:
    s = settings.replace(clickhouse_database=f"r{uuid.uuid4().hex[:10]}",
                         drift_features=(AMOUNT,), alert_cooldown_s=0)
    done = reference.set_reference(s, _write_csv(tmp_path / "train data.csv"), model="m")
    assert done["via"] == "clickhouse"  # no monitor runs: the engine is opened directly
    assert done["features"] == {AMOUNT: "numeric", REGION: "categorical"}  # "note" is empty

    pipeline = Pipeline(s)
    pipeline.migrate()
    client = pipeline.sink.connect()
    pipeline.monitor.set_profiles(reference.load(client, s.clickhouse_database))
    records = _records(6000, shift_from=3000)  # 10 minutes, shifted after 5
    for i in range(0, len(records), 1000):
        batch = records[i:i + 1000]
        pipeline.process([Message(CODEC.encode("JoinedRecord", r), None, "joined", 0, i + j)
                          for j, r in enumerate(batch)])
        pipeline.checkpoint()
    pipeline.close_all()

    db = s.clickhouse_database
    stats = _rows(client, f"SELECT * FROM {db}.drift_stats FINAL ORDER BY metric, window_start")
    by_metric: dict[str, list[dict]] = {}
    for row in stats:
        by_metric.setdefault(row["metric"], []).append(row)
    assert set(by_metric) == {f"feature:{AMOUNT}", f"feature:{REGION}", "score:primary",
                              "score:challenger"}
    amount = by_metric[f"feature:{AMOUNT}"]
    windows = {r["event_time"] // 60_000 for r in records}
    assert len(amount) == len(windows)  # every window, alerting or not
    assert {r["reference"] for r in amount} == {"profile"}
    assert all(r["model"] == "m" and r["challenger"] == "" for r in amount)
    full = [r for r in amount if r["compared"] >= 200]
    calm = [r for r in full if r["window_end"].timestamp() * 1000 <= RECENT_MS + 300_000]
    shifted = [r for r in full if r["window_start"].timestamp() * 1000 >= RECENT_MS + 300_000]
    assert calm and shifted
    assert all(r["value"] < r["threshold"] and not r["firing"] for r in calm)
    assert all(r["value"] > r["threshold"] and r["firing"] for r in shifted)
    assert all(r["value"] < 0.25 for r in by_metric[f"feature:{REGION}"] if r["compared"])
    assert by_metric["score:primary"][0]["reference"] == "stream (building)"
    assert by_metric["score:challenger"][0]["challenger"] == "c1"

    alerts = _rows(client, f"SELECT * FROM {db}.alerts FINAL WHERE detector = 'PSI'")
    amount_alerts = [a for a in alerts if a["metric"] == f"feature:{AMOUNT}"]
    assert [a["status"] for a in amount_alerts] == ["firing"]  # once, not once per window
    assert amount_alerts[0]["challenger"] == "" and amount_alerts[0]["details"]["model"] == "m"
    assert amount_alerts[0]["details"]["reference"] == "profile"


def test_parquet_and_bad_files(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "ref.parquet"
    pq.write_table(pa.table({AMOUNT: [float(v) for v in range(100)],
                             "größe": ["s", "m", "l", None] * 25}), path)
    profile = reference.build_profile(reference.read_columns(path))
    assert profile[AMOUNT].kind == "numeric" and sum(profile[AMOUNT].counts) == 100
    assert profile["größe"].categories == ("l", "m", "s") and profile["größe"].counts[:3] == (
        25, 25, 25)
    with pytest.raises(ConfigError, match="--features"):
        reference.read_columns(path, ["missing"])
    (tmp_path / "x.json").write_text("{}")
    with pytest.raises(ConfigError, match="csv or .parquet"):
        reference.read_columns(tmp_path / "x.json")


def _monitor_up(s: Settings) -> bool:
    url = f"http://{s.web_host}:{s.web_port}{reference.REFERENCE_PATH}"
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return "profiles" in json.loads(resp.read())
    except OSError:
        return False


_wait = partial(wait_for, timeout_s=180.0)


def _windows(s: Settings) -> bool:
    url = (f"http://{s.web_host}:{s.web_port}/shadowpipe/query/?"
           + urllib.parse.urlencode({"name": "windows", "since_ms": 0}))
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            return bool(json.loads(resp.read())["rows"])
    except OSError:
        return False


def _set_through(monitor: Settings, tmp_path: Path) -> None:
    """``shadowpipe reference set`` of a training CSV as model m's, which the monitor on
    ``monitor``'s port stores."""
    out = tmp_path / "set.txt"
    cli = spawn_cli(monitor, "reference", "set", "--from", str(_write_csv(tmp_path / "t.csv")),
                    "--model", "m", log=out)
    assert cli.wait(120) == 0, out.read_text()
    assert "stored via monitor" in out.read_text()


def _feed_until_a_window(s: Settings, monitor: Settings) -> None:
    prod = producer(s)
    for rec in _records(1500, shift_from=10**9):
        prod.produce(s.topic("joined"), CODEC.encode("JoinedRecord", rec),
                     rec["request_id"].encode())
    prod.flush(30)
    _wait("a closed window", lambda: _windows(monitor))


def test_reference_set_through_a_running_monitor(settings: Settings, tmp_path: Path) -> None:
    s = settings.replace(clickhouse_url=f"chdb://{tmp_path / 'ch'}", clickhouse_database="ref",
                         log_level="WARNING", monitor_batch_ms=100)
    worker = spawn_cli(s, "worker", "monitor", log=tmp_path / "worker.log")
    try:
        _wait("the monitor's web endpoint", lambda: _monitor_up(s))
        _set_through(s, tmp_path)
        url = f"http://{s.web_host}:{s.web_port}{reference.REFERENCE_PATH}"
        with urllib.request.urlopen(url, timeout=10) as resp:
            assert list(json.loads(resp.read())["profiles"]) == ["m"]

        _feed_until_a_window(s, s)
    finally:
        worker.terminate()
        worker.wait(60)
    # chdb opens one data directory per process: read the worker's from a child process
    script = (
        "import json, sys\n"
        "from shadowpipe.config import Settings\n"
        "from shadowpipe.stores import clickhouse_client\n"
        "from shadowpipe.processors.monitor import reference\n"
        "c = clickhouse_client(Settings.load())\n"
        "p = reference.load(c, 'ref')\n"
        f"r = c.query({FEATURE_REFERENCES_SQL!r}).result_rows\n"
        "print(json.dumps({'features': sorted(p['m'].features), 'refs': [x[0] for x in r]}))\n")
    env = {**os.environ, **s.to_env()}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    found = json.loads(done.stdout.strip().splitlines()[-1])
    assert found == {"features": sorted([AMOUNT, REGION]), "refs": ["profile"]}


# The references the stored feature PSI rows were measured against (database "ref").
FEATURE_REFERENCES_SQL = ("SELECT DISTINCT reference FROM ref.drift_stats FINAL "
                          f"WHERE metric = 'feature:{AMOUNT}'")


def _feature_references(s: Settings) -> list[str] | None:
    """:data:`FEATURE_REFERENCES_SQL` through the sink's SQL endpoint."""
    import clickhouse_connect

    try:
        client = clickhouse_connect.get_client(host="127.0.0.1", port=s.sql_port)
        rows = client.query(FEATURE_REFERENCES_SQL).result_rows
    except Exception:  # noqa: BLE001 - not serving yet: asked again
        return None
    return [r[0] for r in rows]


def _series_profiles(s: Settings) -> dict[str, int] | None:
    url = f"http://{s.web_host}:{s.web_port}/shadowpipe/monitor/stats"
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return json.loads(resp.read())["profiles"]
    except OSError:
        return None


def test_reference_set_reaches_every_partitioned_monitor(settings: Settings,
                                                         tmp_path: Path) -> None:
    """``monitor_mode=partitioned``: the profile set through the process that runs the sink
    is used by the series stage of every process (the other one cannot open the embedded
    ClickHouse), so the feature's PSI is measured against it whoever owns that series."""
    from shadowpipe.stack import free_port

    s = settings.replace(clickhouse_url=f"chdb://{tmp_path / 'ch'}", clickhouse_database="ref",
                         log_level="WARNING", monitor_batch_ms=100, monitor_mode="partitioned",
                         topic_prefix=f"{settings.topic_prefix}p{uuid.uuid4().hex[:6]}.",
                         drift_features=(AMOUNT,))
    sink, other = (s.replace(monitor_sink="on", sql_port=free_port()),
                   s.replace(monitor_sink="off", web_port=free_port()))
    procs = [spawn_cli(sink, "worker", "monitor", log=tmp_path / "sink.log"),
             spawn_cli(other, "worker", "monitor", log=tmp_path / "other.log")]
    try:
        _wait("the sink's web endpoint", lambda: _monitor_up(sink))
        _set_through(sink, tmp_path)
        version = _wait("the profile in the sink's process",
                        lambda: (_series_profiles(sink) or {}).get("m"))
        _wait("the profile in the other process",
              lambda: _series_profiles(other) == {"m": version})

        _feed_until_a_window(s, sink)
        # the model's series may close its window in the other process: its rows reach the
        # sink through the rows topic, after the first window row seen
        _wait("the feature's PSI against the profile stored",
              lambda: _feature_references(sink) == ["profile"])
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(60)
    script = (
        "import json\n"
        "from shadowpipe.config import Settings\n"
        "from shadowpipe.stores import clickhouse_client\n"
        "c = clickhouse_client(Settings.load())\n"
        f"r = c.query({FEATURE_REFERENCES_SQL!r}).result_rows\n"
        "print(json.dumps([x[0] for x in r]))\n")
    done = subprocess.run([sys.executable, "-c", script], env={**os.environ, **s.to_env()},
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1]) == ["profile"]
