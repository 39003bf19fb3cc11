"""One monitor micro-batch, end to end except Kafka: decode, dedupe, aggregate, store,
checkpoint. The Faust agent and the benchmark both drive this class.

Order per batch (at-least-once, nothing lost, nothing double-counted):

1. :meth:`Pipeline.process` decodes the messages (undecodable ones become dead letters),
   counts the facts not yet counted (:mod:`.dedup`), closes windows the watermark passed and
   inserts joined records, orphans, window rows and alerts into ClickHouse, retrying with
   backoff while it is unreachable (:class:`.sink.Sink`); with the embedded engine the joined
   records go in from its parsed file on a background thread while the facts are counted,
   and ``process`` returns only once every insert succeeded;
2. the caller publishes the alerts and dead letters and waits for the broker's acks;
3. :meth:`Pipeline.checkpoint` writes the monitor state (windows, detectors, cooldowns) and
   the newly counted pair bits to Redis in one transaction;
4. the caller commits the input offsets.

A crash anywhere replays the uncommitted messages against the last checkpoint: pairs
counted since are counted again exactly once, rows and alerts come out identical (same
keys and alert ids), so ClickHouse keeps one of each.
"""

from __future__ import annotations

import contextlib
import gc
import io
import logging
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlparse

import fastavro
import redis as redis_lib

from shadowpipe.config import Settings
from shadowpipe.processors.dead_letter import dead_letter
from shadowpipe.processors.monitor import checkpoint as checkpoint_fmt
from shadowpipe.processors.monitor import sink as sink_mod
from shadowpipe.processors.monitor.bulk import BulkDecoder
from shadowpipe.processors.monitor.core import (
    Monitor,
    MonitorState,
    pair_key,
    record_time,
)
from shadowpipe.processors.monitor.dedup import Deduper
from shadowpipe.processors.runtime.message import Message
from shadowpipe.processors.runtime.metrics import DELAY_BOUNDS, Buckets
from shadowpipe.processors.runtime.retry import Stopped, retry
from shadowpipe.processors.state_marker import monitor_holds_state, monitor_marker
from shadowpipe.schemas import schema
from shadowpipe.schemas.codec import SINGLE_OBJECT, Codec, DecodeError
from shadowpipe.schemas.validate import check
from shadowpipe.tables import ALERT_COLUMNS, DRIFT_COLUMNS, WINDOW_COLUMNS, migrate

log = logging.getLogger(__name__)
ORPHAN_STATES = ("orphan_feedback", "orphan_prediction")
BULK_MIN = 64  # smaller batches decode per record (a bulk query has a fixed cost)
HEADER_LEN = 10  # single-object marker + fingerprint
# What Monitor.add and the orphans table read of a record; the rest of a bulk-decoded
# record only goes to joined_records, which the engine fills from its own file.
BULK_FIELDS = frozenset((
    "request_id", "challenger", "version", "state", "event_time", "context", "num_features",
    "primary_output", "primary_latency_ms", "shadow_output", "shadow_error",
    "shadow_error_kind", "model_time_ms", "queue_lag_ms", "label", "label_value",
    "label_time", "feedback_source", "joined_at", "model", "is_control", "cat_features"))
# A paused or restarting Redis surfaces as these and is retried; any other error is a bug
# or a misconfiguration, and stops the worker (a process manager restarts it).
TRANSIENT = (redis_lib.ConnectionError, redis_lib.TimeoutError, OSError)
# Without a socket timeout a paused Redis blocks a call forever, with nothing logged.
REDIS_TIMEOUT_S = 5.0


@contextlib.contextmanager
def paused_gc() -> Iterator[None]:
    """Pause Python's cyclic garbage collector for one batch.

    A batch allocates ~10 containers per record that all live until the batch ends, so the
    collector keeps promoting them and runs full collections over the whole heap (chdb,
    pyarrow, river, the monitor state) every batch or two: measured at about half the decode
    time. Reference counting frees the batch at its end anyway; a cycle waits for the next
    automatic collection.

    >>> with paused_gc():
    ...     gc.isenabled()
    False
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def due_watermark(starts: list[int], held_ms: int, now_ms: int) -> int | None:
    """The watermark that closes exactly the windows (by start) whose end + allowed
    lateness (``held_ms`` after the start) the wall clock ``now_ms`` has passed; None if
    none has. Not ``now_ms`` itself: a backfill arriving after an idle spell must not be
    dropped as late wholesale.

    >>> due_watermark([0, 60_000, 120_000], 120_000, 200_000)
    180000
    >>> due_watermark([120_000], 120_000, 200_000) is None
    True
    """
    due = [start + held_ms for start in starts if start + held_ms <= now_ms]
    return max(due) if due else None


@dataclass
class BatchResult:
    records: int = 0
    counted: int = 0
    duplicates: int = 0
    rows: int = 0
    windows: list[dict[str, Any]] = field(default_factory=list)
    alerts: list[dict[str, Any]] = field(default_factory=list)
    dead_letters: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class Totals:
    """Counters since start, served as the monitor's stats (``/shadowpipe/monitor/stats``)."""

    batches: int = 0
    records: int = 0
    counted: int = 0
    duplicates: int = 0
    dead_letters: int = 0
    windows_closed: int = 0
    windows_provisional: int = 0
    late_dropped: int = 0
    alerts: int = 0
    rows_written: int = 0
    last_write_ms: int | None = None
    last_write_rows: int = 0
    retries: int = 0
    last_error: str | None = None
    last_error_ms: int | None = None

    def add(self, result: BatchResult, now_ms: int) -> None:
        self.records += result.records
        self.counted += result.counted
        self.duplicates += result.duplicates
        self.dead_letters += len(result.dead_letters)
        self.windows_closed += len(result.windows)
        # A late record is counted in the overall ("") row of the window holding the watermark.
        self.late_dropped += sum(w["late_dropped"] for w in result.windows if not w["segment"])
        self.alerts += len(result.alerts)
        if result.rows:
            self.rows_written += result.rows
            self.last_write_ms, self.last_write_rows = now_ms, result.rows


def state_prefix(settings: Settings) -> str:
    """What the monitor's Redis keys start with. On a Redis Cluster it ends in one hash tag:
    the checkpoint writes the state and the counted bits' day hashes in one transaction,
    which a cluster runs only within one slot (key names on a single Redis are unchanged).

    >>> from shadowpipe.config import Settings
    >>> on = Settings.load().replace(topic_prefix="p.", redis_url="redis+cluster://h:7000")
    >>> state_prefix(on), state_prefix(on.replace(redis_url="redis://h:6379/0"))
    ('p.{p.monitor}:', 'p.')
    """
    from shadowpipe.stores import is_cluster_url

    prefix = settings.topic_prefix
    return f"{prefix}{{{prefix}monitor}}:" if is_cluster_url(settings.redis_url) else prefix


class Pipeline:
    """Monitor state + dedup + ClickHouse sink for one monitor instance."""

    def __init__(self, settings: Settings, *, redis: Any = None,
                 client_factory: Callable[[], Any] | None = None,
                 sleep: Callable[[float], None] = time.sleep,
                 clock: Callable[[], int] = lambda: int(time.time() * 1000)) -> None:
        from shadowpipe.stores import redis_client

        self.settings = settings
        self.codec = Codec(settings.schema_registry_url)
        self._schema = schema("JoinedRecord")
        self._header = self.codec.header("JoinedRecord", SINGLE_OBJECT)
        self.redis = redis if redis is not None else redis_client(
            settings, socket_timeout=REDIS_TIMEOUT_S, socket_connect_timeout=REDIS_TIMEOUT_S)
        keys = state_prefix(settings)
        self.state_key = f"{keys}monitor:state"
        self.dedup = Deduper(self.redis, keys, settings.feedback_horizon_s)
        self.sleep = sleep
        self.clock = clock
        self.totals = Totals()
        self.label_delays = Buckets(DELAY_BOUNDS)  # seconds, for /metrics
        self.verdicts: dict[str, str] = {}  # challenger -> current verdict (verdict agent)
        self.retrying: str | None = None  # what a retry loop is waiting for, if any
        self._abort = threading.Event()
        self.last_record_ms = clock()  # a restart with open windows and no traffic closes them
        self.sink = sink_mod.Sink(settings, client_factory, sleep=self.pause)
        self.bulk = (BulkDecoder(self.sink.connect, self._schema, BULK_FIELDS)
                     if urlparse(settings.clickhouse).scheme == "chdb" else None)
        self.marker = monitor_marker(self.redis, settings, self.state_key)  # .lost: losses seen
        self.monitor = Monitor(settings, self._load())
        self._inserter = ThreadPoolExecutor(1, thread_name_prefix="monitor-insert")

    def _load(self) -> MonitorState | None:
        blob = self._retry("load checkpoint", lambda: self.redis.get(self.state_key))
        self.marker.check(monitor_holds_state(self.settings))  # a lost checkpoint is logged once
        return checkpoint_fmt.load(blob, self.state_key) if blob else None

    def migrate(self) -> list[str]:
        return migrate(self.sink.connect(), self.settings)

    def decode(self, messages: list[Message]) -> tuple[list[dict[str, Any]], list[dict]]:
        """Records and dead letters (decode errors, records missing their identity).
        Records decoded in bulk hold only :data:`BULK_FIELDS`."""
        records, dead, _in_file = self._decode_batch(messages)
        return records, dead

    def _decode_batch(self, messages: list[Message]) -> tuple[list[dict], list[dict], list[bool]]:
        """:meth:`decode` plus, per record, whether it is in the bulk decoder's file."""
        records, dead, in_file = [], [], []
        bulk = self._bulk_decode(messages)
        for i, m in enumerate(messages):
            rec = bulk.get(i)
            try:
                if rec is None:
                    rec = self._decode(m.value)
                check("JoinedRecord", rec)  # the wire layer's rules, as in every worker
            except DecodeError as exc:  # kind: decode, or invalid (InvalidRecord)
                dead.append(dead_letter(exc.kind, exc.reason, "monitor", m.topic, m.partition,
                                        m.offset, m.key, m.value, m.timestamp))
                continue
            records.append(rec)
            in_file.append(i in bulk)
        return records, dead, in_file

    def _bulk_decode(self, messages: list[Message]) -> dict[int, dict[str, Any]]:
        """Records of the current schema's single-object messages by index, decoded by the
        embedded engine (:mod:`.bulk`); empty when not worth it or on any doubt."""
        if self.bulk is None:
            return {}
        found = self.bulk.decode_batch([m.value for m in messages], self._header,
                                       self._decode, BULK_MIN)
        if self.bulk.off:
            self.bulk = None
        return found

    def _decode(self, data: bytes | None) -> dict[str, Any]:
        """Fast path for the current schema's single-object encoding (the joiner's output);
        anything else, or any error, goes through the codec, which also gives the reason."""
        if data and data[:HEADER_LEN] == self._header:
            buf = io.BytesIO(data)
            buf.seek(HEADER_LEN)
            try:
                rec = fastavro.schemaless_reader(buf, self._schema, None)
                if buf.tell() == len(data):
                    return rec
            except Exception:  # noqa: S110 - the codec below reports why
                pass
        return self.codec.decode(data, "JoinedRecord")

    def process(self, messages: list[Message]) -> BatchResult:
        """Steps 1 of the module doc; blocks (retrying) until ClickHouse took the batch."""
        with paused_gc():
            result = self._process(messages)
        now = self.clock()
        if result.records:
            self.last_record_ms = now
        self.totals.batches += 1
        self.totals.add(result, now)
        return result

    def _process(self, messages: list[Message]) -> BatchResult:
        records, dead, in_file = self._decode_batch(messages)
        result = BatchResult(records=len(records), dead_letters=dead)
        self._observe_delays(records)
        rest, pending = self._insert_from_file(records, in_file)
        try:
            # In event-time order: a batch holds runs of several partitions one after the
            # other, and the one watermark must not pass a partition's records because
            # another partition's run came first (they would count as late).
            self._count(sorted(records, key=record_time), result)
            result.windows, result.alerts = self.monitor.advance()
            result.rows = self.sink.write(self.tables(rest, result))
        finally:  # the file must not be rewritten while the engine still reads it
            if pending is not None:
                result.rows += pending.result()
        return result

    def _observe_delays(self, records: list[dict[str, Any]]) -> None:
        observe = self.label_delays.observe
        for r in records:  # an orphan label has no event time: no delay to observe
            if r.get("label_time") is not None and r.get("event_time") is not None:
                observe(max(0, r["label_time"] - r["event_time"]) / 1000)

    def _insert_from_file(self, records: list[dict[str, Any]], in_file: list[bool],
                          ) -> tuple[list[dict[str, Any]], Future[int] | None]:
        """Start inserting the joined records the engine parsed from its file, in the
        background (chdb releases the GIL while the counting goes on); return the records
        left for the Python columns and the insert's future."""
        if self.bulk is None or not any(in_file):
            return records, None
        rest = [r for r, f in zip(records, in_file, strict=True)
                if not f or r["state"] in ORPHAN_STATES]
        joined = sum(1 for r in records if r["state"] not in ORPHAN_STATES) - sum(
            1 for r in rest if r["state"] not in ORPHAN_STATES)
        sql = sink_mod.joined_from_avro_sql(self.sink.db, self.bulk.source)
        return rest, self._inserter.submit(self.sink.write, {}, ((sql, joined),))

    def _count(self, records: list[dict[str, Any]], result: BatchResult) -> None:
        """Count the facts not counted yet (:mod:`.dedup`) into the monitor."""
        keys = [(pair_key(r), record_time(r)) for r in records]
        bits = self._retry("dedup lookup", lambda: self.dedup.lookup(keys))
        for rec, (pair, t) in zip(records, keys, strict=True):
            before = bits[pair]
            after = self.monitor.add(rec, before)
            if after != before:
                bits[pair] = after
                self.dedup.mark(pair, t, after)
                result.counted += 1
            else:
                result.duplicates += 1

    def close_all(self) -> BatchResult:
        """Close every open window and store it: the end of a finite stream (a backfill)."""
        ends = [start for _c, _s, start in self.monitor.state.windows]
        # Just far enough to close them all: later records for them count as late.
        return self._close_until(max(ends) + self._held_ms() if ends else None)

    def close_idle(self, now_ms: int | None = None) -> BatchResult:
        """Close the windows whose end + allowed lateness the wall clock has passed, once no
        record arrived for ``monitor_idle_s`` (an idle stream must not hold its last
        windows open, as Flink's watermark idleness). Empty result when not idle; the
        watermark moves to :func:`due_watermark`."""
        now = self.clock() if now_ms is None else now_ms
        if now - self.last_record_ms < self.settings.monitor_idle_s * 1000:
            return BatchResult()
        return self._close_due(now)

    def close_on_stop(self, now_ms: int | None = None) -> BatchResult:
        """A graceful stop: close the due windows (as :meth:`close_idle`, without waiting),
        then either close the rest (``monitor_close_on_stop=all``) or store them as
        provisional rows that their final row replaces once they close after a restart."""
        now = self.clock() if now_ms is None else now_ms
        if self.settings.monitor_close_on_stop == "all":
            return self.close_all()
        result = self._close_due(now)
        provisional = self.monitor.open_rows()
        if provisional:
            rows = self.sink.write({"windows": self._window_columns(provisional)})
            result.rows += rows
            self.totals.windows_provisional += len(provisional)
            self.totals.add(BatchResult(rows=rows), now)
        return result

    def _held_ms(self) -> int:
        """How long after its start a window stays open: its length + allowed lateness."""
        return (self.settings.window_s + self.settings.allowed_lateness_s) * 1000

    def _close_due(self, now_ms: int) -> BatchResult:
        starts = [start for _c, _s, start in self.monitor.state.windows]
        return self._close_until(due_watermark(starts, self._held_ms(), now_ms))

    def _close_until(self, watermark: int | None) -> BatchResult:
        result = BatchResult()
        if watermark is None:
            return result
        result.windows, result.alerts = self.monitor.advance(watermark)
        result.rows = self.sink.write(self.tables([], result))
        self.totals.add(result, self.clock())
        return result

    def _window_columns(self, rows: list[dict[str, Any]]) -> dict[str, list[Any]]:
        version = int(time.time() * 1000)
        return sink_mod.rows_to_columns([{**row, "version": version} for row in rows],
                                        WINDOW_COLUMNS)

    def windows_open(self) -> int:
        """Open (challenger, window) pairs, all segments together."""
        return len({(c, start) for c, _s, start in list(self.monitor.state.windows)})

    def abort_retries(self) -> None:
        """Make every retry loop raise :class:`Stopped` (a stop that cannot wait)."""
        self._abort.set()

    def aborted(self) -> bool:
        return self._abort.is_set()

    def tables(self, records: list[dict[str, Any]], result: BatchResult) -> dict[str, dict]:
        joined = [r for r in records if r["state"] not in ORPHAN_STATES]
        orphans = [r for r in records if r["state"] in ORPHAN_STATES]
        version = int(time.time() * 1000)
        windows = [{**row, "version": version} for row in result.windows]
        return {
            "joined_records": sink_mod.joined_columns(joined),
            "orphans": sink_mod.orphan_columns(orphans),
            "windows": sink_mod.rows_to_columns(windows, WINDOW_COLUMNS),
            "alerts": sink_mod.rows_to_columns(result.alerts, ALERT_COLUMNS),
            "drift_stats": sink_mod.rows_to_columns(self.monitor.drain_drift_stats(),
                                                    DRIFT_COLUMNS),
        }

    def checkpoint(self) -> None:
        """Step 3: state and counted bits in one Redis transaction (retried until done)."""
        with paused_gc():
            blob = checkpoint_fmt.dump(self.monitor.state)

        def write() -> None:
            pipe = self.redis.pipeline(transaction=True)
            self.dedup.stage(pipe)
            pipe.set(self.state_key, blob)
            pipe.execute()

        self.marker.check()  # Redis emptied under us: say so before rewriting the checkpoint
        self._retry("checkpoint", write)
        self.dedup.committed()

    def _retry(self, what: str, fn: Callable[[], Any]) -> Any:
        """``fn()``, retried on transient errors (:func:`~..runtime.retry.retry`); nothing
        of the batch is acked meanwhile."""
        def failed(exc: BaseException) -> None:
            self.retrying = f"Redis {what}"
            self.note_error(f"Redis {what}: {type(exc).__name__}: {exc}")

        value = retry(fn, f"Redis {what}", errors=TRANSIENT, pause=self.pause,
                      on_error=failed, logger=log)
        self.retrying = None
        return value

    def note_error(self, text: str) -> None:
        self.totals.retries += 1
        self.totals.last_error, self.totals.last_error_ms = text, self.clock()

    def pause(self, seconds: float) -> None:
        """Back off between retries; raise :class:`Stopped` once the worker must stop."""
        if self.sleep is time.sleep:
            self._abort.wait(seconds)
        else:
            self.sleep(seconds)
        if self._abort.is_set():
            raise Stopped("stopping during a retry")

