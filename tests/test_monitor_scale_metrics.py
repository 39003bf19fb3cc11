"""``/metrics`` of the partitioned monitor (``monitor_mode=partitioned``), on the real
embedded stack: two monitor processes (one writing ClickHouse) share a joined stream with
a drift and a few undecodable records; each process's ``/metrics`` is scraped once every
stage caught up, and the counters summed over the processes must equal what that input
produces: records in, records republished per series key, dead letters, ClickHouse rows,
label delays, window closes and the alerts on the alerts topic, by detector.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from confluent_kafka import KafkaError

from shadowpipe.bench import synthetic
from shadowpipe.config import Settings
from shadowpipe.kafka import consumer, producer
from shadowpipe.processors.monitor.partitioned import rows_topic, series_topic
from shadowpipe.processors.monitor.series import series_keys
from shadowpipe.processors.read import ask_monitor, fetch, from_monitor, rows
from shadowpipe.schemas.codec import Codec
from shadowpipe.stack import free_port
from tests.conftest import assign_from_start, chdb_rows, spawn_cli
from tests.test_metrics import Samples, documented, exported, scrape, total, value
from tests.test_monitor_scale import (
    _done_partitioned,
    _finish,
    _flush_records,
    _kill,
    _produce,
    _run_settings,
    _spec,
    _wait,
)

BAD = 4  # undecodable joined records: dead-lettered by the repartition stage
STAGES = ("monitor-repartition", "monitor-series", "monitor-sink")
# Documented families the partitioned monitor cannot report: no Redis state marker in this
# mode; the others belong to the shadow worker and the joiner.
NOT_IN_MODE = {"shadowpipe_redis_state_lost_total"}
VERDICTS = {"PROMOTE", "REJECT", "HOLD", "INCONCLUSIVE"}
ARMS = {"since_ms": 0, "challenger": "", "by": ""}


def _send_bad(s: Settings) -> None:
    prod = producer(s)
    for i in range(BAD):
        prod.produce(s.topic("joined"), b"not avro", f"bad-{i}".encode())
    assert prod.flush(30) == 0


def _lags(samples: Samples, stage: str) -> dict[tuple[str, str], float]:
    return {(dict(ls)["topic"], dict(ls)["partition"]): v for (n, ls), v in samples.items()
            if n == "shadowpipe_consumer_lag_records" and dict(ls)["worker"] == stage}


def _alerts_on_topic(s: Settings) -> dict[str, int]:
    """Raised (not resolved) alerts on the alerts topic, by detector."""
    codec = Codec()
    c = consumer(s, f"{s.topic_prefix}alerts-probe", **{"enable.partition.eof": True})
    assign_from_start(c, s, s.topic("alerts"))
    counts: dict[str, int] = {}
    ended: set[int] = set()
    deadline = time.time() + 60
    try:
        while len(ended) < s.partitions:
            assert time.time() < deadline, "the alerts topic was never read to its end"
            msg = c.poll(0.5)
            if msg is None:
                continue
            if msg.error() is not None:
                assert msg.error().code() == KafkaError._PARTITION_EOF, msg.error()
                ended.add(msg.partition())
                continue
            alert = codec.decode(msg.value(), "Alert")
            if alert["status"] != "resolved":
                counts[alert["detector"]] = counts.get(alert["detector"], 0) + 1
    finally:
        c.close()
    return counts


def test_partitioned_monitors_export_the_monitor_metrics(settings: Settings,
                                                         tmp_path: Path) -> None:
    s = _run_settings(settings, tmp_path, "metrics", "partitioned")
    start = (int(time.time()) // 60 - 120) * 60_000
    records = synthetic.stream(_spec(start))
    _produce(s, records)
    _send_bad(s)
    ports = [free_port(), free_port()]
    procs = [spawn_cli(s.replace(web_port=port, monitor_sink="on" if i == 0 else "off",
                                 verdict_interval_s=1),
                       "worker", "monitor", log=tmp_path / f"metrics{i}.log")
             for i, port in enumerate(ports)]
    sent = records + _flush_records(start)
    try:
        _finish(s, start, lambda: _done_partitioned(s))

        def settled() -> list[Samples] | None:
            for proc in procs:
                assert proc.poll() is None, (tmp_path / "metrics0.log").read_text()[-3000:]
            scrapes = [scrape(port) for port in ports]
            if any(m is None for m in scrapes):
                return None
            # lag is refreshed from cached watermarks about once a second
            stages_zero = all(v == 0 for m in scrapes for st in STAGES
                              for v in _lags(m, st).values())
            events_in = sum(total(m, "shadowpipe_events_in_total") for m in scrapes)
            verdicts = {dict(ls)["challenger"] for (n, ls) in scrapes[0]
                        if n == "shadowpipe_verdict"}  # the verdict timer ran
            return (scrapes if stages_zero and events_in == len(sent) + BAD
                    and verdicts == {"c1", "c2"} else None)

        sink, other = _wait("both monitors' counters at the input sent", settled)
        alerts = _alerts_on_topic(s)
        live = _reads_while_running(s.replace(web_port=ports[0]))
    finally:
        _kill(procs)
    _check(s, tmp_path, sent, sink, other, alerts)
    _check_reads(s, tmp_path, live)


def _reads_while_running(s: Settings) -> dict[str, Any]:
    """What ``compare`` and ``verdict`` get from the process that runs the sink (the
    embedded engine's directory is that process's: nothing else may open it)."""
    live = from_monitor(s, "arm_counts", ARMS)
    assert live is not None, "the sink's process does not serve /shadowpipe/query/"
    assert fetch(s, "arm_counts", ARMS) == live  # how compare reads
    verdicts = ask_monitor(s, "/shadowpipe/verdict/", {})
    assert verdicts is not None
    assert {v["challenger"]: v["verdict"] in VERDICTS for v in verdicts["verdicts"]} == {
        "c1": True, "c2": True}
    return live


def _check_reads(s: Settings, tmp_path: Path, live: dict[str, Any]) -> None:
    """The live answer is the stored data's, read from the directory after the stop."""
    db = s.clickhouse_database
    stored = chdb_rows(tmp_path / "metrics", "SELECT challenger, count(), countIf(state = "
                       f"'labelled') FROM {db}.joined_records FINAL GROUP BY challenger "
                       "ORDER BY challenger")
    overall = [(r["challenger"], r["published"], r["labelled"]) for r in rows(live)
               if r["segment"] == ""]
    assert overall == [tuple(r) for r in stored] and len(overall) == 2


def _check(s: Settings, tmp_path: Path, sent: list[dict[str, Any]], sink: Samples,
           other: Samples, alerts: dict[str, int]) -> None:
    both = (sink, other)

    def summed(name: str, **labels: str) -> float:
        return sum(total(m, name, **labels) for m in both)

    assert summed("shadowpipe_events_in_total", worker="monitor") == len(sent) + BAD
    assert summed("shadowpipe_events_dead_lettered_total", worker="monitor",
                  reason="any") == BAD
    published = sum(len(series_keys(r, s.segments)) for r in sent)
    assert summed("shadowpipe_events_out_total", worker="monitor") == published
    for m in both:
        assert value(m, "shadowpipe_worker_ready", worker="monitor") == 1
        assert {dict(ls)["worker"] for (n, ls) in m if n == "shadowpipe_worker_ready"} >= {
            "monitor", "monitor-repartition", "monitor-series"}

    # One consumer per stage: the joined topic's lag per group, every partition owned once.
    owned = [p for m in both for (t, p) in _lags(m, "monitor-repartition")
             if t == s.topic("joined")]
    assert sorted(owned) == [str(p) for p in range(s.partitions)]
    assert {t for m in both for (t, _p) in _lags(m, "monitor-series")} == {series_topic(s)}
    assert {t for (t, _p) in _lags(sink, "monitor-sink")} == {s.topic("joined"),
                                                                rows_topic(s)}
    assert not _lags(other, "monitor-sink")

    # ClickHouse figures only where the sink runs.
    assert value(sink, "shadowpipe_clickhouse_insert_failures_total") == 0
    assert value(sink, "shadowpipe_clickhouse_insert_seconds_count") > 0
    assert value(sink, "shadowpipe_clickhouse_insert_rows_total") >= len(sent)
    labelled = sum(1 for r in sent
                   if r.get("label_time") is not None and r.get("event_time") is not None)
    assert labelled and value(sink, "shadowpipe_label_delay_seconds_count") == labelled
    assert not {n for (n, _ls) in other if n.startswith(("shadowpipe_clickhouse_",
                                                         "shadowpipe_label_delay_"))}

    # Alerts by detector: what the series stages put on the alerts topic.
    assert alerts.get("ADWIN"), "the injected drift raised no ADWIN alert"
    for detector in ("ADWIN", "PSI", "threshold"):
        assert summed("shadowpipe_alerts_total", detector=detector) == alerts.get(detector, 0)

    names = exported(sink) | exported(other)
    assert names <= documented(), names - documented()
    monitor_only = documented() - {n for n in documented() if n.startswith(
        ("shadowpipe_challenger_", "shadowpipe_join_", "shadowpipe_shadow_"))}
    assert monitor_only - NOT_IN_MODE <= names, monitor_only - NOT_IN_MODE - names

    # Every window row written was closed by exactly one series stage.
    db = s.clickhouse_database
    rows = chdb_rows(tmp_path / "metrics", f"SELECT count() FROM {db}.windows FINAL")[0][0]
    assert rows > 40
    assert summed("shadowpipe_monitor_windows_closed_total") == rows
