"""``monitor_mode=partitioned``: N monitor processes share the work through Kafka consumer
groups, with the same window rows and alerts as one process.

Three stages, each a :class:`~shadowpipe.processors.runtime.loop.BatchLoop` on its own
thread with its own consumer group, in every monitor process (the sink only where
``monitor_sink=on``):

1. **repartition** (group ``<prefix>monitor-repartition``, topic ``joined``): decode and
   validate (dead letters as the single monitor), then produce each record, unchanged, to
   ``<prefix>monitor-series`` once per series it feeds, keyed by series
   (:func:`.series.series_keys`): a ``group_by`` as in Kafka Streams or Faust.
2. **series** (group ``<prefix>monitor-series``): the owner of a repartition partition owns
   its keys' :class:`.series.SeriesMonitor` (windows, detectors, conditions). Facts are
   deduplicated per (series, request, challenger) (:mod:`.dedup`, namespace
   ``<prefix>series.``); closed windows become rows on ``<prefix>monitor-rows`` (JSON), alerts
   go to the alerts topic; then each touched partition's state is checkpointed to Redis
   (``<prefix>monitor:series:<partition>``) in one transaction with that partition's dedup
   bits; then the offsets are committed (both at most every :data:`CHECKPOINT_S`, for the
   batches delivered since). On a Redis Cluster a partition's keys carry the
   hash tag ``{monitor-series-<partition>}`` after the prefix, so its transaction stays in
   one slot (:meth:`Series.tag`). A rebalance settles the batch in flight, drops the revoked
   partitions' state, and loads the assigned ones' checkpoints: the state moves with the
   partition.
3. **sink** (group ``<prefix>monitor-sink``, topics ``joined`` and ``monitor-rows``): writes
   joined records, orphans, window rows, alerts and drift statistics into ClickHouse (the
   ReplacingMergeTree tables of :mod:`shadowpipe.tables`: a replay writes the same keys
   again, ``FINAL`` keeps one), then commits. The embedded engine admits one process per
   data directory: one monitor runs the sink, the others ``monitor_sink=off``; with a
   ClickHouse server every process may run it and the group splits the partitions.

At-least-once throughout: a stage commits only once its outputs are acknowledged (and, for
the series stage, its checkpoint written). A killed process's partitions move to the others
within the session timeout and are replayed from their last commit against their last
checkpoint.

The process that runs the sink also serves what the single monitor serves on its
ClickHouse client (:func:`serve_reads`): the named queries (``/shadowpipe/query/``, so
``shadowpipe compare``, ``report`` and ``verdict`` work on its web port while the pipeline
runs), the verdict timer and endpoints, and read-only SQL on the embedded engine.

Reference profiles (PSI against training data, ``shadowpipe reference set``): the process
that runs the sink loads them from ClickHouse (and takes new ones on its reference
endpoint) and publishes them in Redis (:func:`.reference.publish`); every series stage
looks for new ones every :data:`PROFILES_REFRESH_S` and applies them to its series.

A graceful stop closes the due windows and puts the open ones on the rows topic as
provisional rows (``monitor_close_on_stop``, :meth:`Series.closing`), as the single monitor
does; the sink writes them once it reads them (at once if it runs in another process,
after the restart if it stopped with this one).

>>> rows_message("windows", {"challenger": "c", "segment": "", "window_start": 0})[0]
b'windows\\x1fc\\x1f\\x1f0'
"""

from __future__ import annotations

import json
import logging
import pickle
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlparse

from redis.exceptions import RedisError

from shadowpipe.config import Settings
from shadowpipe.processors.dead_letter import dead_letter
from shadowpipe.processors.monitor import reference
from shadowpipe.processors.monitor import sink as sink_mod
from shadowpipe.processors.monitor.bulk import BulkDecoder
from shadowpipe.processors.monitor.dedup import Deduper
from shadowpipe.processors.monitor.pipeline import (
    BULK_MIN,
    ORPHAN_STATES,
    BatchResult,
    due_watermark,
)
from shadowpipe.processors.monitor.reference import Profile
from shadowpipe.processors.monitor.runtime import outputs as alert_outputs
from shadowpipe.processors.monitor.series import (
    SeriesMonitor,
    decode_key,
    dedup_pair,
    restore,
    series_keys,
    snapshot,
)
from shadowpipe.processors.publisher import Publisher
from shadowpipe.processors.runtime.loop import BatchLoop, Handler, KafkaSource, Outputs
from shadowpipe.processors.runtime.message import Message
from shadowpipe.processors.runtime.metrics import DELAY_BOUNDS, Buckets
from shadowpipe.schemas import schema
from shadowpipe.schemas.codec import SINGLE_OBJECT, Codec, DecodeError
from shadowpipe.stores import is_cluster_url
from shadowpipe.tables import ALERT_COLUMNS, DRIFT_COLUMNS, WINDOW_COLUMNS

log = logging.getLogger("shadowpipe.monitor")
HEADER = b"shadowpipe-series-state/1\n"
# What the sink reads of a record the engine inserts from its file (orphans: all of it).
SINK_FIELDS = frozenset(("request_id", "challenger", "state", "event_time", "label_time"))
RECENT = 4096  # decoded series messages kept (a record's copies arrive close together)
PROFILES_REFRESH_S = 5.0  # a Redis GET: new reference profiles apply within seconds
# Pickling a partition's series after every batch was a sixth of this mode's CPU: batches
# are settled (checkpoint, then commit) at most this often; a crash replays the rest,
# which the dedup bits in the same transaction keep from counting twice.
CHECKPOINT_S = 1.0
ROW_KEYS = {"windows": ("challenger", "segment", "window_start"), "alerts": ("alert_id",),
            "drift_stats": ("model", "challenger", "metric", "window_start")}
ROW_COLUMNS = {"windows": WINDOW_COLUMNS, "alerts": ALERT_COLUMNS, "drift_stats": DRIFT_COLUMNS}


def series_topic(settings: Settings) -> str:
    return f"{settings.topic_prefix}monitor-series"


def rows_topic(settings: Settings) -> str:
    return f"{settings.topic_prefix}monitor-rows"


def rows_message(table: str, row: dict[str, Any]) -> tuple[bytes, bytes]:
    """(key, value) of a row on the rows topic: keyed by its table identity."""
    key = "\x1f".join((table, *(str(row[k]) for k in ROW_KEYS[table])))
    return key.encode(), json.dumps({"table": table, "row": row}).encode()


def ensure_topics(settings: Settings) -> None:
    """Create the repartition and rows topics (``partitions`` each) if missing."""
    from confluent_kafka import KafkaException
    from confluent_kafka.admin import NewTopic

    from shadowpipe.kafka import admin

    client = admin(settings)
    existing = set(client.list_topics(timeout=10).topics)
    new = [NewTopic(t, settings.partitions, settings.replication_factor)
           for t in (series_topic(settings), rows_topic(settings)) if t not in existing]
    for future in (client.create_topics(new, operation_timeout=10).values() if new else ()):
        try:
            future.result()
        except KafkaException as exc:
            if "TOPIC_ALREADY_EXISTS" not in str(exc):
                raise


def decode(codec: Codec, m: Message) -> dict[str, Any]:
    """The validated JoinedRecord of ``m`` (raises :class:`DecodeError`; the codec checks
    it)."""
    return codec.decode(m.value, "JoinedRecord")


class Repartition(Handler):
    """Stage 1: each joined record onto the repartition topic, once per series key."""

    name = "monitor-repartition"

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.codec = Codec(settings.schema_registry_url)
        self.records = self.dead_letters = self.published = 0

    def process(self, batch: list[Message]) -> Outputs:
        out, dead = [], []
        for m in batch:
            try:
                rec = decode(self.codec, m)
            except DecodeError as exc:
                dead.append(dead_letter(exc.kind, exc.reason, "monitor", m.topic, m.partition,
                                        m.offset, m.key, m.value, m.timestamp))
                continue
            out += [(key, m.value) for key in series_keys(rec, self.settings.segments)]
        self.records += len(batch)
        self.dead_letters += len(dead)
        self.published += len(out)
        return [(series_topic(self.settings), out),
                (self.settings.topic("deadletter"),
                 [(d["key"], self.codec.encode("DeadLetter", d)) for d in dead])]


class Series(Handler):
    """Stage 2: the series monitors of the partitions this process owns."""

    name = "monitor-series"

    def __init__(self, settings: Settings, redis: Any,
                 clock: Callable[[], int] = lambda: int(time.time() * 1000)) -> None:
        self.settings, self.redis, self.clock = settings, redis, clock
        self.codec = Codec(settings.schema_registry_url)
        self.topic = series_topic(settings)
        self.cluster = is_cluster_url(settings.redis_url)
        self.dedups: dict[int, Deduper] = {}
        self.partitions: dict[int, dict[bytes, SeriesMonitor]] = {}
        self.touched: set[int] = set()
        self.loop: BatchLoop | None = None  # set by install: the idle close delivers through it
        self.last_record_ms = clock()
        self.counted = self.duplicates = self.windows_closed = self.alerts = 0
        self.late_dropped = self.windows_open = 0
        self.alerts_by_detector: Counter[str] = Counter()  # raised, not resolved
        self.profiles: dict[str, Profile] = {}  # the reference profiles, from Redis
        self.recent: dict[bytes | None, dict[str, Any]] = {}  # message value -> record
        self.profiles_at = 0.0  # monotonic time of the next look for new ones
        self.checkpointed_at = time.monotonic()

    def tag(self, partition: int) -> str:
        """What follows the prefix in the keys of ``partition``'s transaction: its hash tag
        on a Redis Cluster (one slot: a transaction cannot span slots), else nothing (the
        key names of a single Redis are unchanged)."""
        return f"{{monitor-series-{partition}}}:" if self.cluster else ""

    def state_key(self, partition: int) -> str:
        return f"{self.settings.topic_prefix}{self.tag(partition)}monitor:series:{partition}"

    def deduper(self, partition: int) -> Deduper:
        """The dedup bits of ``partition``'s series (a series key has one partition)."""
        found = self.dedups.get(partition)
        if found is None:
            found = self.dedups[partition] = Deduper(
                self.redis, f"{self.settings.topic_prefix}{self.tag(partition)}series.",
                self.settings.feedback_horizon_s)
        return found

    # -- ownership ---------------------------------------------------------------------------

    def assigned(self, partitions: list[tuple[str, int]]) -> None:
        owned = {p for t, p in partitions if t == self.topic}
        for p in set(self.partitions) - owned:
            del self.partitions[p]  # settled and checkpointed by the loop's revoke first
            self.dedups.pop(p, None)
        for p in sorted(owned - set(self.partitions)):
            self.partitions[p] = self.load(p)
        self.last_record_ms = self.clock()  # idleness counts from when records can arrive

    def load(self, partition: int) -> dict[bytes, SeriesMonitor]:
        blob = self.redis.get(self.state_key(partition))
        if not blob:
            return {}
        if not blob.startswith(HEADER):
            raise ValueError(f"{self.state_key(partition)} is not a series checkpoint")
        monitors = restore(self.settings, pickle.loads(blob[len(HEADER):]))  # noqa: S301
        for mon in monitors.values():
            mon.set_profiles(self.profiles)
        return monitors

    def monitor(self, partition: int, key: bytes) -> SeriesMonitor:
        monitors = self.partitions.get(partition)
        if monitors is None:
            monitors = self.partitions[partition] = self.load(partition)
        found = monitors.get(key)
        if found is None:
            found = monitors[key] = SeriesMonitor(self.settings, decode_key(key))
            found.set_profiles(self.profiles)
        return found

    def refresh_profiles(self) -> None:
        """Every :data:`PROFILES_REFRESH_S`, the reference profiles the sink's process
        published (:func:`.reference.publish`); Redis away: the current ones stay."""
        if time.monotonic() < self.profiles_at:
            return
        self.profiles_at = time.monotonic() + PROFILES_REFRESH_S
        try:
            found = reference.fetch(self.redis, self.settings)
        except RedisError as exc:
            log.warning("reference profiles not refreshed: %s", exc)
            return
        if {m: p.version for m, p in found.items()} != self.profile_versions():
            self.profiles = found
            for monitors in self.partitions.values():
                for mon in monitors.values():
                    mon.set_profiles(found)

    def profile_versions(self) -> dict[str, int]:
        return {m: p.version for m, p in self.profiles.items()}

    # -- batches -----------------------------------------------------------------------------

    def process(self, batch: list[Message]) -> Outputs:
        items = []
        for m in batch:
            if m.key is None:
                continue
            mon = self.monitor(m.partition, m.key)
            rec = self.decode(m)
            items.append((m.partition, mon, rec, dedup_pair(mon.key, rec)))
        bits: dict[str, int] = {}
        for p in sorted({item[0] for item in items}):
            bits |= self.deduper(p).lookup((pair, _time(rec)) for q, _m, rec, pair in items
                                           if q == p)
        touched: dict[int, SeriesMonitor] = {}
        for partition, mon, rec, pair in items:
            before = bits[pair]
            after = mon.add(rec, before)
            if after != before:
                bits[pair] = after
                self.deduper(partition).mark(pair, _time(rec), after)
                self.counted += 1
            else:
                self.duplicates += 1
            touched[id(mon)] = mon
            self.touched.add(partition)
        if items:
            self.last_record_ms = self.clock()
        return self.close(list(touched.values()), None)

    def decode(self, m: Message) -> dict[str, Any]:
        """A record comes once per series it feeds, within a few batches: decode it once
        (fastavro's ~25-35 us per record was a third of this mode's CPU) and share the
        dict, which the monitors only read; the last :data:`RECENT` are kept."""
        rec = self.recent.get(m.value)
        if rec is None:
            rec = self.recent[m.value] = decode(self.codec, m)
            if len(self.recent) > RECENT:
                del self.recent[next(iter(self.recent))]  # the oldest
        return rec

    def close(self, monitors: list[SeriesMonitor], watermark: Callable[[SeriesMonitor],
                                                                       int | None] | None,
              ) -> Outputs:
        """Advance ``monitors`` (to ``watermark(monitor)`` if given): their closed rows on
        the rows topic, their alerts on the alerts topic."""
        rows: list[tuple[bytes, bytes]] = []
        alerts: list[dict[str, Any]] = []
        version = self.clock()
        for mon in monitors:
            closed, raised = mon.advance(watermark(mon) if watermark else None)
            rows += [rows_message("windows", {**r, "version": version}) for r in closed]
            rows += [rows_message("alerts", a) for a in raised]
            rows += [rows_message("drift_stats", d) for d in mon.drain_drift_stats()]
            alerts += raised
            self.windows_closed += len(closed)
            # The overall rows hold a window's late records once (as the single monitor).
            self.late_dropped += sum(r["late_dropped"] for r in closed if not r["segment"])
        self.alerts += len(alerts)
        self.alerts_by_detector.update(a["detector"] for a in alerts
                                       if a["status"] != "resolved")
        out = list(alert_outputs(self.settings, BatchResult(alerts=alerts), self.codec))
        return [*out, (rows_topic(self.settings), rows)]

    def settle_due(self) -> bool:
        return time.monotonic() - self.checkpointed_at >= CHECKPOINT_S

    def settled(self, batch: list[Message]) -> None:
        self.checkpoint()

    def checkpoint(self) -> None:
        """Each touched partition's state and staged dedup bits, in one transaction per
        partition: a crash between two leaves each partition's bits and state agreeing,
        and its records are replayed against them."""
        for p in sorted(self.touched):
            dedup = self.deduper(p)
            if p not in self.partitions and not dedup.staged:
                continue
            pipe = self.redis.pipeline(transaction=True)
            dedup.stage(pipe)
            if p in self.partitions:
                blob = pickle.dumps(snapshot(self.partitions[p]), protocol=pickle.HIGHEST_PROTOCOL)
                pipe.set(self.state_key(p), HEADER + blob)
            pipe.execute()
            dedup.committed()
        self.touched.clear()
        self.checkpointed_at = time.monotonic()
        self.windows_open = self.count_open()

    def count_open(self) -> int:
        """Open (challenger, window) pairs of the owned series, as the single monitor's
        ``windows_open``: the overall challenger keys hold each pair once."""
        return sum(len({(c, start) for c, seg, start in m.state.windows if not seg})
                   for monitors in self.partitions.values() for m in monitors.values()
                   if m.role == "c" and not m.segment)

    def closing(self) -> None:
        """A graceful stop, while this process still owns its partitions (as the single
        monitor's ``monitor_close_on_stop``): close the windows the wall clock has passed,
        then either close the rest (``all``) or put them on the rows topic as provisional
        rows, which their final rows (a higher version) replace once they close after the
        restart; then checkpoint, so the next owner does not close them again."""
        monitors = [(p, m) for p, ms in self.partitions.items() for m in ms.values()]
        if self.loop is None or not monitors:
            return
        held = (self.settings.window_s + self.settings.allowed_lateness_s) * 1000
        now = self.clock()
        if self.settings.monitor_close_on_stop == "all":
            outputs = self.close([m for _p, m in monitors], lambda m: max(
                m.due_starts(), default=m.state.watermark - held) + held)
        else:
            outputs = self.close([m for _p, m in monitors],
                                 lambda m: due_watermark(m.due_starts(), held, now))
            version = self.clock()
            outputs.append((rows_topic(self.settings), [
                rows_message("windows", {**row, "version": version})
                for _p, m in monitors if m.role == "c" for row in m.open_rows()]))
        self.loop.deliver(outputs)
        self.touched.update(p for p, _m in monitors)
        self.checkpoint()

    def tick(self) -> None:
        """An idle stream closes the windows whose end + allowed lateness the wall clock
        has passed (as the single monitor's idle timer); new reference profiles."""
        self.refresh_profiles()
        now = self.clock()
        if self.loop is None or now - self.last_record_ms < self.settings.monitor_idle_s * 1000:
            return
        held = (self.settings.window_s + self.settings.allowed_lateness_s) * 1000
        due: list[tuple[int, SeriesMonitor]] = []
        for p, monitors in self.partitions.items():
            due += [(p, m) for m in monitors.values()
                    if due_watermark(m.due_starts(), held, now) is not None]
        if not due:
            return
        outputs = self.close([m for _p, m in due],
                             lambda m: due_watermark(m.due_starts(), held, now))
        self.loop.deliver(outputs)
        self.touched.update(p for p, _m in due)
        self.checkpoint()

    def stats(self) -> dict[str, Any]:
        return {"partitions": sorted(self.partitions), "counted": self.counted,
                "duplicates": self.duplicates, "windows_closed": self.windows_closed,
                "profiles": self.profile_versions(),
                "alerts_raised": self.alerts,
                "series": sum(len(m) for m in list(self.partitions.values()))}


def _time(rec: dict[str, Any]) -> int:
    t = rec.get("event_time")
    return int(t if t is not None else rec["joined_at"])


class Sink(Handler):
    """Stage 3: joined records and the monitors' rows into ClickHouse, then commit."""

    name = "monitor-sink"

    def __init__(self, settings: Settings, sink: sink_mod.Sink,
                 lock: threading.Lock | None = None) -> None:
        self.settings, self.sink = settings, sink
        # Held while writing: the query, verdict and SQL views use the same client.
        self.lock = lock or threading.Lock()
        self.codec = Codec(settings.schema_registry_url)
        self.rows_topic = rows_topic(settings)
        self.rows_written = 0
        self.label_delays = Buckets(DELAY_BOUNDS)  # seconds, of the records it stores
        # On the embedded engine a batch's joined records are decoded and inserted by the
        # engine from one Avro file (as the single monitor does): fastavro per record was
        # the sink's largest cost.
        self.header = self.codec.header("JoinedRecord", SINGLE_OBJECT)
        self.bulk = (BulkDecoder(sink.connect, schema("JoinedRecord"), SINK_FIELDS)
                     if urlparse(settings.clickhouse).scheme == "chdb" else None)

    def process(self, batch: list[Message]) -> Outputs:
        joined, orphans = [], []
        rows: dict[str, list[dict[str, Any]]] = defaultdict(list)
        messages = []
        for m in batch:
            if m.topic == self.rows_topic:
                body = json.loads(m.value)  # type: ignore[arg-type]
                rows[body["table"]].append(body["row"])
            else:
                messages.append(m)
        with self.lock:  # the bulk decoder's query uses the shared client too
            in_file = self._bulk(messages)
            for i, m in enumerate(messages):
                rec = in_file.get(i)
                if rec is not None and rec["state"] not in ORPHAN_STATES:
                    self._observe(rec)  # the engine inserts it from its file
                    continue
                try:
                    rec = decode(self.codec, m)
                except DecodeError:
                    continue  # the repartition stage dead-letters it
                (orphans if rec["state"] in ORPHAN_STATES else joined).append(rec)
                self._observe(rec)
            tables = {"joined_records": sink_mod.joined_columns(joined),
                      "orphans": sink_mod.orphan_columns(orphans)}
            for table, names in ROW_COLUMNS.items():
                tables[table] = sink_mod.rows_to_columns(rows.get(table, []), names)
            self.rows_written += self.sink.write(tables, self._from_file(in_file))
        return []

    def _bulk(self, messages: list[Message]) -> dict[int, dict[str, Any]]:
        """:data:`SINK_FIELDS` of the messages the embedded engine decoded in bulk."""
        if self.bulk is None:
            return {}
        return self.bulk.decode_batch([m.value for m in messages], self.header,
                                      lambda v: self.codec.decode(v, "JoinedRecord"), BULK_MIN)

    def _from_file(self, in_file: dict[int, dict[str, Any]]) -> tuple[tuple[str, int], ...]:
        """The INSERT ... SELECT of the joined records in the bulk decoder's file."""
        joined = sum(1 for rec in in_file.values() if rec["state"] not in ORPHAN_STATES)
        if self.bulk is None or not joined:
            return ()
        return ((sink_mod.joined_from_avro_sql(self.sink.db, self.bulk.source), joined),)

    def _observe(self, rec: dict[str, Any]) -> None:
        if rec.get("label_time") is not None and rec.get("event_time") is not None:
            self.label_delays.observe(max(0, rec["label_time"] - rec["event_time"]) / 1000)


def install(app: Any, settings: Settings) -> None:
    """Check Redis (and ClickHouse where this process sinks), create the topics, register
    the three loops and the health views (``/metrics``: :func:`metrics_stats`, and each
    stage's readiness and consumer lag as ``worker="monitor-<stage>"``)."""
    from shadowpipe.processors.runtime import metrics
    from shadowpipe.processors.runtime.health import add_health, loop_lag, loop_readiness
    from shadowpipe.processors.runtime.thread import add_loop_service
    from shadowpipe.stores import check_clickhouse, check_redis, redis_client
    from shadowpipe.tables import migrate

    check_redis(settings, "worker monitor")
    ensure_topics(settings)
    size, wait_s = settings.monitor_batch_size, settings.monitor_batch_ms / 1000
    prefix = settings.topic_prefix

    def loop(handler: Handler, group: str, topics: list[str]) -> BatchLoop:
        source = KafkaSource(settings, f"{prefix}{group}", topics, size, wait_s)
        made = BatchLoop(handler, lambda: Publisher(settings), source, overlap=False)
        add_loop_service(app, made, group)
        return made

    series = Series(settings, redis_client(settings, socket_timeout=5.0))
    repartition = Repartition(settings)
    loops = [loop(repartition, "monitor-repartition", [settings.topic("joined")])]
    series.loop = loop(series, "monitor-series", [series_topic(settings)])
    loops.append(series.loop)
    sink: Sink | None = None
    reads: Reads | None = None
    if settings.monitor_sink == "on":
        client = check_clickhouse(settings, "worker monitor")
        for line in migrate(client, settings):
            log.info("clickhouse %s", line)
        sink = Sink(settings, sink_mod.Sink(settings, _factory(settings, client)))
        sink_loop = loop(sink, "monitor-sink", [settings.topic("joined"), rows_topic(settings)])
        loops.append(sink_loop)
        reads = serve_reads(app, settings, sink, sink_loop)

    def readiness() -> tuple[str, str]:
        states = [loop_readiness(one) for one in loops]
        return next((s for s in states if s[0] != "ready"), ("ready", ""))

    def stats() -> dict[str, Any]:
        return {"mode": "partitioned", **series.stats(),
                **metrics_stats(repartition, series, sink),
                "rows_written": sink.rows_written if sink else None,
                **({"verdicts": dict(reads.verdicts)} if reads else {}),
                "positions": {f"{t}:{p}": o for one in loops
                              for (t, p), o in dict(one.positions).items()}}

    add_health(app, "monitor", stats, readiness)
    # The joined topic is read by two groups (repartition, sink): one lag per stage.
    for one in loops:
        metrics.serve(app, one.handler.name, dict, lambda one=one: loop_readiness(one),
                      loop_lag(one))


@dataclass
class Reads:
    """What the verdict agent uses of a monitor: the ClickHouse sink it reads, the pause of
    its publishing retries (raises once the worker stops), the verdicts for /metrics."""

    sink: sink_mod.Sink
    pause: Callable[[float], None]
    verdicts: dict[str, str] = field(default_factory=dict)


def serve_reads(app: Any, settings: Settings, sink: Sink, sink_loop: BatchLoop) -> Reads:
    """The process that runs the sink serves what the single monitor serves on its client:
    the named queries, the verdict (timer and endpoints) and, on the embedded engine,
    read-only SQL; all on one thread that takes turns with the sink's writes.

    With a ClickHouse server every process may run the sink: the verdict timer (which
    publishes changes) runs only in the one whose sink owns partition 0 of the joined
    topic, so the consumer group picks one publisher and moves it when that one dies."""
    from shadowpipe.processors.monitor import queries
    from shadowpipe.processors.monitor.runtime import LockedExecutor
    from shadowpipe.processors.monitor.sql import attach as attach_sql
    from shadowpipe.processors.verdict import agent as verdict_agent
    from shadowpipe.stores import redis_client

    executor = LockedExecutor(sink.lock)
    reads = Reads(sink.sink, sink_loop.pause)
    first = (settings.topic("joined"), 0)
    source = sink_loop.source
    queries.serve(app, settings, sink.sink, executor)
    redis = redis_client(settings, socket_timeout=5.0)
    reference.attach(app, settings, sink.sink, executor,
                     use=lambda rows: reference.publish(redis, settings, rows))
    verdict_agent.install(app, settings, reads, executor,
                          leader=lambda: source is not None and first in source.assigned)
    attach_sql(app, settings)
    return reads


def metrics_stats(repartition: Repartition, series: Series, sink: Sink | None
                  ) -> dict[str, Any]:
    """This process's figures under the names the single monitor's stats give them
    (``metrics.monitor_metrics`` reads both): a figure of a stage this process does not
    run (the sink with ``monitor_sink=off``) is absent, never 0."""
    out: dict[str, Any] = {
        "records": repartition.records, "events_out": repartition.published,
        "dead_letters": repartition.dead_letters, "windows_open": series.windows_open,
        "late_dropped": series.late_dropped,
        "alerts_by_detector": dict(series.alerts_by_detector),
        # Not watched in this mode (no state marker): absent rather than a false 0.
        "redis_state_lost": None}
    if sink is not None:
        out["label_delay_seconds"] = sink.label_delays.snapshot()
        out["clickhouse"] = {"rows_written": sink.sink.rows_written,
                             "failures": sink.sink.failures,
                             "insert_seconds": sink.sink.insert_seconds.snapshot()}
    return out


def _factory(settings: Settings, first: Any) -> Callable[[], Any]:
    """Reuse the start-up check's client, then reconnect after failures."""
    from shadowpipe.stores import clickhouse_client

    pending = [first]
    return lambda: pending.pop() if pending else clickhouse_client(settings)
