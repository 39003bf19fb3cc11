"""The partitioned monitor (``monitor_mode=partitioned``): the same joined input through one
single-mode monitor, one partitioned monitor, two, and two with one SIGKILLed mid-stream and
restarted gives the same window rows and alerts.

All on the real embedded stack: each run has its own topic prefix (topics, consumer groups,
Redis keys) and its own chdb directory, read back once its processes are gone.
"""

from __future__ import annotations

import json
import math
import random
import time
import urllib.request
from functools import partial
from pathlib import Path
from typing import Any

from confluent_kafka import OFFSET_BEGINNING, KafkaError, TopicPartition

from shadowpipe.bench import synthetic
from shadowpipe.config import Settings
from shadowpipe.kafka import consumer, ensure_topics, producer
from shadowpipe.processors.monitor.core import Monitor, pair_key
from shadowpipe.processors.monitor.partitioned import rows_topic, series_topic
from shadowpipe.processors.monitor.series import SeriesMonitor, decode_key, dedup_pair, series_keys
from shadowpipe.schemas.codec import Codec
from shadowpipe.stack import free_port
from tests.conftest import chdb_rows, spawn_cli, wait_for

REQUESTS = 1500
INTERVAL_MS = 400  # the stream spans 10 minutes of event time
FLUSH_AFTER_MS = 3 * 3600_000  # flush records this far after the start close every window
TIMEOUT_S = 300.0


def _spec(start: int) -> synthetic.Spec:
    # c1's accuracy collapses in region eu halfway: ADWIN error-rate alerts and rule alerts
    drift = synthetic.Drift(at_ms=start + REQUESTS * INTERVAL_MS // 2, challenger="c1",
                            attribute="region", value="eu", drop=0.6)
    return synthetic.Spec(requests=REQUESTS, challengers=("c1", "c2"), seed=18,
                          interval_ms=INTERVAL_MS, start_ms=start, error_rate=0.05,
                          label_delay_ms=5000, drift=drift)


def _flush_records(start: int) -> list[dict[str, Any]]:
    """One labelled record per challenger and region, far in event time: every series'
    watermark passes every window of the input (they reach every series key)."""
    t = start + FLUSH_AFTER_MS
    out = []
    for challenger in ("c1", "c2"):
        for region in ("eu", "us", "apac"):
            out.append({"request_id": f"flush-{challenger}-{region}", "challenger": challenger,
                        "version": 2, "state": "labelled", "event_time": t, "joined_at": t,
                        "label_time": t, "model": "m", "context": {"region": region},
                        "label": "a", "primary_output": {"label": "a", "probabilities": {},
                                                         "value": None},
                        "shadow_output": {"label": "a", "probabilities": {}, "value": None}})
    return out


def _base(settings: Settings) -> Settings:
    return settings.replace(segments=("region",), window_s=60, allowed_lateness_s=1800,
                            monitor_idle_s=3600, monitor_batch_ms=100, log_level="WARNING")


# -- the series split, in memory ---------------------------------------------------------------


def test_series_monitors_equal_one_monitor() -> None:
    """Every record fed to the series monitors of its keys, in a shuffled order per key
    group, gives the single monitor's window rows; drift alerts are the same ids."""
    s = _base(Settings.load(env={}))
    start = 1_700_000_000_000
    records = synthetic.stream(_spec(start)) + _flush_records(start)
    single = Monitor(s)
    bits: dict[str, int] = {}
    for rec in records:
        bits[pair_key(rec)] = single.add(rec, bits.get(pair_key(rec), 0))
    rows, alerts = single.advance()
    # Two "partitions" read in a different interleaving than the input order.
    rng = random.Random(1)
    shuffled = sorted(records, key=lambda r: (r["event_time"] // 120_000, rng.random()))
    series = _fed_series(s, shuffled)
    split_rows, split_alerts = [], []
    for mon in series.values():
        r, a = mon.advance()
        split_rows += r
        split_alerts += a
    assert _rows_by_key(split_rows) == _rows_by_key(rows)
    assert len(rows) > 40
    drift = {a["alert_id"] for a in alerts if a["detector"] == "ADWIN"}
    assert drift, "the injected accuracy drop raised no ADWIN alert"
    assert {a["alert_id"] for a in split_alerts} == {a["alert_id"] for a in alerts}


def _fed_series(s: Settings, records: list[dict[str, Any]]) -> dict[bytes, SeriesMonitor]:
    """Each record added, in this order, to the series monitor of every key it feeds."""
    series: dict[bytes, SeriesMonitor] = {}
    seen: dict[str, int] = {}
    for rec in records:
        for key in series_keys(rec, s.segments):
            mon = series.setdefault(key, SeriesMonitor(s, decode_key(key)))
            pair = dedup_pair(mon.key, rec)
            seen[pair] = mon.add(rec, seen.get(pair, 0))
    return series


def _rows_by_key(rows: list[dict[str, Any]]) -> dict[tuple, dict[str, Any]]:
    out = {}
    for r in rows:
        key = (r["challenger"], r["segment"], r["window_start"])
        assert key not in out, f"window {key} twice"
        out[key] = {k: (round(v, 9) if isinstance(v, float) else v) for k, v in r.items()}
    return out


# -- processes on the embedded stack -------------------------------------------------------------


def _run_settings(settings: Settings, tmp_path: Path, name: str, mode: str) -> Settings:
    s = _base(settings).replace(topic_prefix=f"{settings.topic_prefix}{name}.",
                                clickhouse_url=f"chdb://{tmp_path / name}",
                                clickhouse_database="scale", monitor_mode=mode)
    ensure_topics(s)
    return s


def _produce(s: Settings, records: list[dict[str, Any]]) -> None:
    codec = Codec()
    prod = producer(s)
    for rec in records:
        prod.produce(s.topic("joined"), codec.encode("JoinedRecord", rec),
                     rec["request_id"].encode())
    assert prod.flush(30) == 0


_wait = partial(wait_for, timeout_s=TIMEOUT_S)


def _caught_up(s: Settings, group: str, topic: str) -> bool:
    """The group committed the end of every partition of ``topic``: reading on from its
    commits meets the end of each partition before any message (librdkafka's end-of-
    partition event: the embedded broker reports high watermarks below its last offsets)."""
    c = consumer(s, f"{group}-probe", **{"enable.partition.eof": True})
    try:
        tps = [TopicPartition(topic, p) for p in range(s.partitions)]
        member = consumer(s, group)  # asks for the group's commits without joining it
        committed = member.committed(tps, timeout=10)
        member.close()
        c.assign([TopicPartition(topic, tp.partition, tp.offset if tp.offset >= 0
                                 else OFFSET_BEGINNING) for tp in committed])
        ended: set[int] = set()
        deadline = time.time() + 30
        while len(ended) < len(tps) and time.time() < deadline:
            msg = c.poll(0.5)
            if msg is None:
                continue
            if msg.error() is None:
                return False  # a message after the commit: not processed yet
            if msg.error().code() == KafkaError._PARTITION_EOF:
                ended.add(msg.partition())
        return len(ended) == len(tps)
    finally:
        c.close()


def _stats(s: Settings) -> dict[str, Any] | None:
    url = f"http://{s.web_host}:{s.web_port}/shadowpipe/monitor/stats"
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return json.loads(resp.read())
    except OSError:
        return None


def _done_partitioned(s: Settings) -> bool:
    p = s.topic_prefix
    return (_caught_up(s, f"{p}monitor-repartition", s.topic("joined"))
            and _caught_up(s, f"{p}monitor-series", series_topic(s))
            and _caught_up(s, f"{p}monitor-sink", rows_topic(s))
            and _caught_up(s, f"{p}monitor-sink", s.topic("joined")))


def _finish(s: Settings, start: int, done: Any) -> None:
    """Once the input is processed, the flush records close every window; wait for them."""
    _wait("the input processed", done)
    _produce(s, _flush_records(start))
    _wait("the closed windows stored", done)


def _read(s: Settings, tmp_path: Path, name: str, start: int) -> tuple[dict, list, int]:
    """(window rows by key, alerts, raw window row count) of a run, read after its end."""
    db = s.clickhouse_database
    end = start + FLUSH_AFTER_MS
    cols = ", ".join(["challenger", "segment", "toUnixTimestamp64Milli(window_start)",
                      *_METRICS])
    raw = chdb_rows(tmp_path / name, f"SELECT {cols} FROM {db}.windows FINAL "
                    f"WHERE toUnixTimestamp64Milli(window_start) < {end}")
    rows: dict[tuple, list] = {}
    for r in raw:
        key = tuple(r[:3])
        assert key not in rows, f"{name}: window {key} twice after FINAL"
        rows[key] = r[3:]
    alerts = chdb_rows(tmp_path / name, (
        "SELECT alert_id, kind, detector, metric, challenger, arm, segment, status, "
        f"toUnixTimestamp64Milli(window_start) FROM {db}.alerts FINAL "
        f"WHERE toUnixTimestamp64Milli(window_start) < {end} ORDER BY alert_id"))
    total = chdb_rows(tmp_path / name, f"SELECT count() FROM {db}.windows")[0][0]
    return rows, alerts, total


def _stored(tmp_path: Path, name: str) -> list[list[Any]]:
    """Count and an order-free digest of every column of joined_records and orphans."""
    return [chdb_rows(tmp_path / name, f"SELECT count(), groupBitXor(sipHash64(toString("
                      f"tuple(*)))) FROM scale.{table} FINAL")[0]
            for table in ("joined_records", "orphans")]


_METRICS = ["published", "scored", "joined", "labelled", "orphaned", "errors", "timeouts",
            "late_dropped", "agreement", "kappa", "mean_abs_delta_probability", "error_rate",
            "timeout_rate", "primary_accuracy", "challenger_accuracy", "challenger_f1",
            "primary_latency_p50", "model_time_p95", "queue_lag_p99"]


def _assert_same(name: str, got: tuple[dict, list, int], want: tuple[dict, list, int],
                 drift: list[list[Any]]) -> None:
    """Window rows and rule alerts as the single monitor's; drift (ADWIN) alerts as a
    single monitor's fed in event-time order (``drift``): the single worker feeds them in
    arrival order, which interleaves the joined partitions differently from run to run."""
    rows, alerts, _ = got
    assert set(rows) == set(want[0]), f"{name}: other windows"
    for key, values in rows.items():
        for col, a, b in zip(_METRICS, values, want[0][key], strict=True):
            same = a == b or (isinstance(a, float) and isinstance(b, float)
                              and math.isclose(a, b, rel_tol=0, abs_tol=1e-9))
            assert same, f"{name}: {key} {col} {a} != {b}"
    assert [a for a in alerts if a[1] == "rule"] == [a for a in want[1] if a[1] == "rule"], (
        f"{name}: other rule alerts")
    assert [a for a in alerts if a[1] != "rule"] == drift, f"{name}: other drift alerts"


def _event_order_alerts(s: Settings, records: list[dict[str, Any]],
                        start: int) -> list[list[Any]]:
    """The drift alerts of one in-process :class:`Monitor` fed the input in event-time
    order, as :func:`_read` returns them."""
    monitor = Monitor(s)
    bits: dict[str, int] = {}
    for rec in records + _flush_records(start):
        bits[pair_key(rec)] = monitor.add(rec, bits.get(pair_key(rec), 0))
    _rows, alerts = monitor.advance()
    keep = [a for a in alerts if a["kind"] != "rule"
            and a["window_start"] < start + FLUSH_AFTER_MS]
    return sorted([a["alert_id"], a["kind"], a["detector"], a["metric"], a["challenger"],
                   a["arm"], a["segment"], a["status"], a["window_start"]] for a in keep)


def _kill(procs: list[Any]) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait(30)


def test_two_monitors_and_a_kill_equal_one(settings: Settings, tmp_path: Path) -> None:
    start = (int(time.time()) // 60 - 120) * 60_000
    records = synthetic.stream(_spec(start))
    half = len(records) // 2
    results = {}

    # 1. the single monitor of today (monitor_mode=single)
    s = _run_settings(settings, tmp_path, "single", "single")
    _produce(s, records)
    s = s.replace(web_port=free_port())
    procs = [spawn_cli(s, "worker", "monitor", log=tmp_path / "single.log")]
    try:
        # Its records counter moves once a batch's rows are in ClickHouse.
        _wait("the input processed",
              lambda: (_stats(s) or {}).get("records", 0) >= len(records))
        _produce(s, _flush_records(start))
        _wait("the closed windows stored",
              lambda: (_stats(s) or {}).get("records", 0) >= len(records) + 6)
    finally:
        _kill(procs)
    results["single"] = _read(s, tmp_path, "single", start)
    assert len(results["single"][0]) > 40
    assert any(a[2] == "ADWIN" for a in results["single"][1]), "no drift alert to compare"
    assert any(a[1] == "rule" for a in results["single"][1])
    drift = _event_order_alerts(_base(settings), records, start)
    assert drift, "the injected accuracy drop raised no drift alert in event-time order"

    # 2. one partitioned monitor, 3. two
    for name, n in (("one", 1), ("two", 2)):
        s = _run_settings(settings, tmp_path, name, "partitioned")
        _produce(s, records)
        procs = [spawn_cli(s.replace(web_port=free_port(),
                                     monitor_sink="on" if i == 0 else "off"),
                           "worker", "monitor", log=tmp_path / f"{name}{i}.log")
                 for i in range(n)]
        try:
            _finish(s, start, lambda s=s: _done_partitioned(s))
        finally:
            _kill(procs)
        results[name] = _read(s, tmp_path, name, start)
        _assert_same(name, results[name], results["single"], drift)
        # The sink (bulk-decoded, inserted by the engine from its file) stores what the
        # single monitor stores, every column.
        assert _stored(tmp_path, name) == _stored(tmp_path, "single"), name

    # 4. two, the one not writing ClickHouse SIGKILLed mid-stream and restarted
    s = _run_settings(settings, tmp_path, "kill", "partitioned")
    sink = s.replace(web_port=free_port(), monitor_sink="on")
    other = s.replace(web_port=free_port(), monitor_sink="off")
    _produce(s, records[:half])
    procs = [spawn_cli(sink, "worker", "monitor", log=tmp_path / "kill0.log"),
             spawn_cli(other, "worker", "monitor", log=tmp_path / "kill1.log")]
    try:
        _wait("the second monitor counting", lambda: (_stats(other) or {}).get("counted"))
        procs[1].kill()
        procs[1].wait(30)
        _produce(s, records[half:])
        procs.append(spawn_cli(other, "worker", "monitor", log=tmp_path / "kill2.log"))
        _finish(s, start, lambda: _done_partitioned(s))
    finally:
        _kill(procs)
    results["kill"] = _read(s, tmp_path, "kill", start)
    _assert_same("kill", results["kill"], results["single"], drift)


# -- a stop: the open windows as provisional rows ------------------------------------------------


def _single_open_rows(s: Settings, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The provisional rows a single monitor stores at a stop, for ``records``."""
    single = Monitor(s)
    bits: dict[str, int] = {}
    for rec in records:
        bits[pair_key(rec)] = single.add(rec, bits.get(pair_key(rec), 0))
    return single.open_rows()


def test_open_series_rows_equal_the_single_monitors_provisional_rows() -> None:
    s = _base(Settings.load(env={}))
    records = synthetic.stream(_spec(1_700_000_000_000))
    series = _fed_series(s, records)
    split = [row for mon in series.values() if mon.role == "c" for row in mon.open_rows()]
    want = _rows_by_key(_single_open_rows(s, records))
    assert len(want) > 40 and _rows_by_key(split) == want


def test_a_stop_stores_the_open_windows_as_provisional_rows(
    settings: Settings, tmp_path: Path
) -> None:
    """Windows still open at a SIGTERM (recent event times, 30 min allowed lateness) reach
    ClickHouse as the single monitor's provisional rows: put on the rows topic at the stop,
    written by the sink (here after the restart: it stopped with the series stage)."""
    import signal

    start = (int(time.time()) // 60 - 10) * 60_000
    records = synthetic.stream(_spec(start))[:600]
    s = _run_settings(settings, tmp_path, "stop", "partitioned")
    _produce(s, records)
    p = s.topic_prefix
    for run in ("stop0", "stop1"):
        proc = spawn_cli(s, "worker", "monitor", log=tmp_path / f"{run}.log")
        try:
            _wait("the input counted", lambda: _caught_up(s, f"{p}monitor-series",
                                                          series_topic(s))
                  and _caught_up(s, f"{p}monitor-repartition", s.topic("joined"))
                  and _caught_up(s, f"{p}monitor-sink", rows_topic(s)))
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(60) == 0
        finally:
            _kill([proc])
    got, alerts, _ = _read(s, tmp_path, "stop", start)
    want = {(r["challenger"], r["segment"], r["window_start"]):
            [r[m] for m in _METRICS] for r in _single_open_rows(_base(settings), records)}
    assert len(want) > 10 and set(got) == set(want)
    for key, values in got.items():
        assert [round(v, 9) if isinstance(v, float) else v for v in values] == [
            round(v, 9) if isinstance(v, float) else v for v in want[key]], key
