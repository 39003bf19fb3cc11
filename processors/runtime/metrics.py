"""``GET /metrics`` on every worker's web port: the workers' counters in the Prometheus text
format (prometheus-client), names and labels in ``docs/operations.md``.

Nothing is counted twice: at each scrape one collector reads the counters every worker
already keeps for its ``/shadowpipe/<worker>/stats`` page and translates them, so the hot
paths pay nothing for the metrics. Each app gets its own registry (never the global one):
``worker all`` serves the families of the three workers on one page, and several workers
in one process (tests) do not collide.

>>> from prometheus_client import generate_latest
>>> collector = WorkerCollector()
>>> collector.add("join", lambda: {"pending": 2, "in_feedback": 5, "orphan_feedback_late": 1},
...               lambda: ("ready", ""))
>>> text = generate_latest(collector.registry()).decode()
>>> 'shadowpipe_join_pending_requests 2.0' in text
True
>>> 'shadowpipe_events_in_total{worker="join"} 5.0' in text
True
>>> 'shadowpipe_join_orphans_total{kind="feedback_late"} 1.0' in text
True
"""

from __future__ import annotations

import asyncio
import threading
from bisect import bisect_left
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

PATH = "/metrics"
SCRAPE_TIMEOUT_S = 8.0  # below Prometheus' default scrape timeout
# Seconds; model calls and ClickHouse inserts run from ~1 ms to tens of seconds.
SECONDS_BOUNDS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                  10.0, 30.0, 60.0)
# Label delays run from seconds to the feedback horizon (days).
DELAY_BOUNDS = (1.0, 10.0, 60.0, 300.0, 900.0, 3600.0, 4 * 3600.0, 86400.0, 7 * 86400.0)
# The joiner's orphan counters (processors/join/core.py), reported before they first move.
ORPHAN_KINDS = ("feedback_late", "prediction_late", "feedback_unknown", "prediction_no_primary")
# The monitor's detectors (processors/monitor/core.py), reported before they first fire.
DETECTORS = ("ADWIN", "PSI", "threshold")
VERDICTS = ("PROMOTE", "HOLD", "INCONCLUSIVE", "REJECT")
Lag = Callable[[], dict[tuple[str, int], int]]
Stats = Callable[[], dict[str, Any]]
Readiness = Callable[[], tuple[str, str]]


class Buckets:
    """A histogram kept as plain counts (no prometheus-client on the hot path), snapshot
    into the stats JSON and turned into a Prometheus histogram at scrape time.

    >>> b = Buckets((0.1, 1.0))
    >>> b.observe(0.05); b.observe(0.5); b.observe(3.0)
    >>> b.snapshot()
    {'buckets': [[0.1, 1], [1.0, 2], ['+Inf', 3]], 'sum': 3.55, 'count': 3}
    """

    def __init__(self, bounds: Sequence[float] = SECONDS_BOUNDS) -> None:
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)
        self.sum = 0.0
        self._lock = threading.Lock()

    def observe(self, value: float) -> None:
        """Count one value (the bucket whose bound is the first >= value)."""
        with self._lock:
            self.counts[bisect_left(self.bounds, value)] += 1
            self.sum += value

    def snapshot(self) -> dict[str, Any]:
        """Cumulative counts per upper bound, JSON-serialisable."""
        with self._lock:
            counts, total = list(self.counts), self.sum
        cumulative, running = [], 0
        for bound, n in zip((*self.bounds, "+Inf"), counts, strict=True):
            running += n
            cumulative.append([bound, running])
        return {"buckets": cumulative, "sum": round(total, 6), "count": running}


def consumer_lag(highwater: dict[tuple[str, int], int], positions: dict[tuple[str, int], int]
                 ) -> dict[tuple[str, int], int]:
    """Records behind the high watermark per (topic, partition), from plain dicts the
    consuming thread keeps (``KafkaSource.highwater``, ``BatchLoop.positions``): a scrape
    never calls the consumer, which would wait for the loop's ``consume()``. Partitions
    without both figures are unknown and left out, never reported as zero.

    >>> consumer_lag({("in", 0): 50, ("in", 1): 9}, {("in", 0): 42})
    {('in', 0): 8}
    """
    lag = {}
    for tp, high in highwater.items():
        position = positions.get(tp)
        if position is not None:
            lag[tp] = max(0, high - position)
    return lag


class Families:
    """Metric families of one scrape by name: workers add samples to shared families (in
    ``worker all`` the shadow worker and the joiner both report consumer lag)."""

    def __init__(self) -> None:
        self.by_name: dict[str, Any] = {}

    def _family(self, kind: str, name: str, doc: str, labels: Sequence[str]) -> Any:
        from prometheus_client.core import (
            CounterMetricFamily,
            GaugeMetricFamily,
            HistogramMetricFamily,
        )

        if name not in self.by_name:
            make = {"counter": CounterMetricFamily, "gauge": GaugeMetricFamily,
                    "histogram": HistogramMetricFamily}[kind]
            self.by_name[name] = make(name, doc, labels=list(labels))
        return self.by_name[name]

    def counter(self, name: str, doc: str, value: float | None, **labels: str) -> None:
        """``name`` without ``_total`` (prometheus-client appends it)."""
        if value is not None:
            self._family("counter", name, doc, labels).add_metric(list(labels.values()), value)

    def gauge(self, name: str, doc: str, value: float | None, **labels: str) -> None:
        if value is not None:
            self._family("gauge", name, doc, labels).add_metric(list(labels.values()), value)

    def histogram(self, name: str, doc: str, snap: dict[str, Any] | None, **labels: str
                  ) -> None:
        if snap:
            buckets = [(str(float(b)) if b != "+Inf" else b, n) for b, n in snap["buckets"]]
            self._family("histogram", name, doc, labels).add_metric(
                list(labels.values()), buckets, snap["sum"])


def _common(f: Families, worker: str, state: str, lag: dict[tuple[str, int], int]) -> None:
    f.gauge("shadowpipe_worker_ready", "1 when the worker's readiness is ready, else 0",
            int(state == "ready"), worker=worker)
    for (topic, partition), behind in sorted(lag.items()):
        f.gauge("shadowpipe_consumer_lag_records", "records behind the partition's end",
                behind, worker=worker, topic=topic, partition=str(partition))


def _events(f: Families, worker: str, events_in: float | None, events_out: float | None,
            dead: dict[str, int]) -> None:
    f.counter("shadowpipe_events_in", "records consumed", events_in, worker=worker)
    f.counter("shadowpipe_events_out", "records published", events_out, worker=worker)
    for reason, n in sorted(dead.items()):
        f.counter("shadowpipe_events_dead_lettered", "records sent to the dead-letter topic",
                  n, worker=worker, reason=reason)


def shadow_metrics(f: Families, stats: dict[str, Any]) -> None:
    """The shadow worker's stats (``processors/shadow/stats.py``) as families."""
    dead = {k: v for k, v in stats.get("dead_letters", {}).items() if k != "total"}
    _events(f, "shadow", stats.get("consumed"), stats.get("outputs"), dead)
    for name, c in stats.get("challengers", {}).items():
        for what in ("scored", "errors", "timeouts", "skipped"):
            f.counter(f"shadowpipe_challenger_{what}", f"records {what} by the challenger",
                      c[what], challenger=name)
    for name, snap in stats.get("model_seconds", {}).items():
        f.histogram("shadowpipe_challenger_model_seconds",
                    "wall time of one challenger call on a micro-batch", snap, challenger=name)
    p99 = stats.get("queue_lag_ms", {}).get("p99")
    f.gauge("shadowpipe_shadow_queue_lag_p99_seconds",
            "p99 of event time to consumption over recent records",
            p99 / 1000 if p99 is not None else None)


def join_metrics(f: Families, stats: dict[str, Any]) -> None:
    """The joiner's counters (``JoinCore.counters`` plus ``pending``) as families."""
    events_in = sum(v for k, v in stats.items() if k.startswith("in_"))
    events_out = sum(v for k, v in stats.items() if k.startswith(("emitted_", "reemitted_")))
    dead = {k.removeprefix("deadletter_"): v for k, v in stats.items()
            if k.startswith("deadletter_")}
    _events(f, "join", events_in, events_out, dead)
    f.gauge("shadowpipe_join_pending_requests", "requests waiting in Redis for their parts",
            stats.get("pending"))
    # Every kind from the start (0 until one occurs): a rate() needs the series to exist.
    orphans = dict.fromkeys(ORPHAN_KINDS, 0) | {k.removeprefix("orphan_"): v for k, v in
                                               stats.items() if k.startswith("orphan_")}
    for kind, n in sorted(orphans.items()):
        f.counter("shadowpipe_join_orphans", "orphans by kind", n, kind=kind)
    f.counter("shadowpipe_join_redis_errors", "failed Redis calls", stats.get("redis_errors", 0))
    f.counter("shadowpipe_redis_state_lost", "Redis came back without the pending state",
              stats.get("redis_state_lost", 0), worker="join")


def monitor_metrics(f: Families, stats: dict[str, Any]) -> None:
    """The monitor's stats (``Runtime.stats``) as families."""
    # events_out: only the partitioned monitor republishes its input (onto its repartition
    # topic); the single monitor publishes nothing but alerts, so the sample is absent.
    _events(f, "monitor", stats.get("records"), stats.get("events_out"),
            {"any": stats.get("dead_letters", 0)})
    f.counter("shadowpipe_monitor_duplicates", "records already counted (redelivered)",
              stats.get("duplicates"))
    f.counter("shadowpipe_monitor_windows_closed", "windows closed", stats.get("windows_closed"))
    f.gauge("shadowpipe_monitor_windows_open", "windows open", stats.get("windows_open"))
    f.counter("shadowpipe_monitor_late_dropped", "records too late for their window",
              stats.get("late_dropped"))
    ch = stats.get("clickhouse", {})
    f.counter("shadowpipe_clickhouse_insert_rows", "rows inserted into ClickHouse",
              ch.get("rows_written"))
    f.counter("shadowpipe_clickhouse_insert_failures", "failed ClickHouse inserts (retried)",
              ch.get("failures"))
    f.histogram("shadowpipe_clickhouse_insert_seconds", "time of one (successful) insert",
                ch.get("insert_seconds"))
    f.histogram("shadowpipe_label_delay_seconds", "label time minus event time of labelled "
                "joined records", stats.get("label_delay_seconds"))
    alerts = dict.fromkeys(DETECTORS, 0) | stats.get("alerts_by_detector", {})
    for detector, n in sorted(alerts.items()):
        f.counter("shadowpipe_alerts", "alerts raised", n, detector=detector)
    for challenger, verdict in sorted(stats.get("verdicts", {}).items()):
        for state in VERDICTS:
            f.gauge("shadowpipe_verdict", "1 for the challenger's current verdict, else 0",
                    int(verdict == state), challenger=challenger, verdict=state)
    f.counter("shadowpipe_redis_state_lost", "Redis came back without the pending state",
              stats.get("redis_state_lost", 0), worker="monitor")


TRANSLATE: dict[str, Callable[[Families, dict[str, Any]], None]] = {
    "shadow": shadow_metrics, "join": join_metrics, "monitor": monitor_metrics}


class WorkerCollector:
    """The one collector of an app: every worker's stats, translated at each scrape."""

    def __init__(self) -> None:
        self.sources: list[tuple[str, Stats, Readiness, Lag | None]] = []

    def add(self, worker: str, stats: Stats, readiness: Readiness, lag: Lag | None = None
            ) -> None:
        """Report ``worker`` (``shadow``, ``join``, ``monitor``; any other name, such as a
        stage of the partitioned monitor, reports only its readiness and consumer lag)."""
        self.sources.append((worker, stats, readiness, lag))

    def registry(self) -> Any:
        """A new registry holding only this collector."""
        from prometheus_client import CollectorRegistry

        registry = CollectorRegistry(auto_describe=False)
        registry.register(self)
        return registry

    def describe(self) -> list[Any]:
        return []  # families depend on the stats: nothing to check at registration

    def collect(self) -> Iterator[Any]:
        families = Families()
        for worker, stats, readiness, lag in self.sources:
            _common(families, worker, readiness()[0], lag() if lag else {})
            translate = TRANSLATE.get(worker)
            if translate is not None:
                translate(families, stats())
        yield from families.by_name.values()


def serve(app: Any, worker: str, stats: Stats, readiness: Readiness,
          lag: Lag | None = None) -> WorkerCollector:
    """Report ``worker`` on ``app``'s ``/metrics`` (registered with the app's first worker)."""
    collector = getattr(app, "_shadowpipe_metrics", None)
    if collector is None:
        collector = app._shadowpipe_metrics = WorkerCollector()
        registry = collector.registry()

        # The stats readers may wait (the joiner's pending count is a Redis call): they run
        # on one thread of their own, so a slow scrape never holds up the worker's event
        # loop (its other pages, timers, the monitor's agent) and scrapes never pile up.
        scraper = ThreadPoolExecutor(1, thread_name_prefix="metrics")

        async def metrics(web: Any, request: Any) -> Any:
            from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

            try:
                body = await asyncio.wait_for(asyncio.get_running_loop().run_in_executor(
                    scraper, generate_latest, registry), SCRAPE_TIMEOUT_S)
            except TimeoutError:
                return web.text(f"the worker's counters took over {SCRAPE_TIMEOUT_S:.0f} s "
                                "to read\n", status=503)
            return web.bytes(body, content_type=CONTENT_TYPE_LATEST.split(";")[0])

        app.page(PATH, name="metrics")(metrics)
    collector.add(worker, stats, readiness, lag)
    return collector
