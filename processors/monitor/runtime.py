"""The monitor worker's life around :class:`.pipeline.Pipeline`: one batch at a time,
readiness, stats, idle closing, a bounded graceful stop, and exit on a dead loop.

**Consuming.** The workers' one batch loop
(:class:`~shadowpipe.processors.runtime.loop.BatchLoop`, without overlap) runs on its own
thread with a librdkafka consumer in the group ``<prefix>monitor`` (:class:`MonitorLoop`),
as the shadow worker and the joiner do: process, publish alerts and dead letters, flush
(again until the broker has them all), checkpoint (:meth:`MonitorHandler.settled`), then
commit. (A Faust stream spent more CPU per record on the event loop, fetching, wrapping and
acking each message, than the pipeline spent on it: profiled in docs/monitor.md.)

**Serialised.** A batch and a window close (idle timer or stop) each run whole under one
lock (:attr:`Runtime.lock`): a checkpoint never saves the counts of a batch whose alerts
are not yet published. Closes, queries and the verdict agent run on :attr:`Runtime.executor`,
whose one thread takes the same lock for each job.

**Never alive while dead.** Transient Redis and ClickHouse errors are retried inside the
batch (0.2 s doubling to 10 s, as the joiner); readiness says ``retrying`` meanwhile. Any
other error ends the process at once with exit code 1 (:meth:`Runtime.die`): a process
manager restarts it and the uncommitted batch is replayed against the last checkpoint.

**Readiness** (``GET /shadowpipe/monitor/ready``, :mod:`~shadowpipe.processors.runtime.health`):
200 ``ready``; 503 ``starting``, ``retrying``, ``stalled`` (a batch running longer than
``STALL_S``) or ``stopping``.

**Graceful stop** (SIGINT/SIGTERM): new batches are skipped (they stay uncommitted), the
loop's batch in flight gets :data:`STOP_BATCH_S`, then due windows are closed and open ones stored
(``monitor_close_on_stop``) within :data:`STOP_FLUSH_S`; retries are abandoned past that.

>>> outputs(Settings.load(env={}), BatchResult())
[('shadowpipe.alerts', []), ('shadowpipe.deadletter', [])]
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from shadowpipe.config import Settings
from shadowpipe.processors.monitor.pipeline import BatchResult, Message, Pipeline
from shadowpipe.processors.publisher import Publisher
from shadowpipe.processors.runtime.health import Readiness, state_of
from shadowpipe.processors.runtime.loop import BatchLoop, Handler, KafkaSource, Outputs
from shadowpipe.processors.runtime.retry import Stopped
from shadowpipe.schemas.codec import Codec

log = logging.getLogger("shadowpipe.monitor")
STOP_BATCH_S = 10.0  # a stop waits this long for the batch in flight
STOP_FLUSH_S = 10.0  # then this long for closing and storing windows
STOP_POLL_S = 0.05
EXIT_DEAD = 1


def outputs(settings: Settings, result: BatchResult, codec: Codec | None = None) -> Outputs:
    """Alerts (Avro, keyed by challenger) and dead letters of a batch or a close, by topic
    (a repeated alert carries the same ``alert_id``)."""
    codec = codec or Codec(settings.schema_registry_url)
    return [(settings.topic("alerts"), [(a["challenger"], codec.encode("Alert", a))
                                        for a in result.alerts]),
            (settings.topic("deadletter"), [(d["key"], codec.encode("DeadLetter", d))
                                            for d in result.dead_letters])]


class MonitorHandler(Handler):
    """The monitor in the batch loop: the pipeline, then its checkpoint once the broker has
    the batch's alerts and dead letters."""

    name = "monitor"

    def __init__(self, settings: Settings, pipeline: Pipeline) -> None:
        self.settings = settings
        self.pipeline = pipeline
        self.codec = Codec(settings.schema_registry_url)
        self.alerts: Counter[str] = Counter()

    def process(self, batch: list[Message]) -> Outputs:
        result = self.pipeline.process(batch)
        self.count_alerts(result)
        return outputs(self.settings, result, self.codec)

    def count_alerts(self, result: BatchResult) -> None:
        """Alerts raised (not their resolutions) by detector, for /metrics."""
        self.alerts.update(a["detector"] for a in result.alerts if a["status"] != "resolved")

    def settled(self, batch: list[Message]) -> None:
        self.pipeline.checkpoint()

    def retried(self, what: str, exc: BaseException) -> None:
        self.pipeline.note_error(f"{what}: {exc}")


class LockedExecutor(ThreadPoolExecutor):
    """One thread whose every job holds ``lock`` (the lock the consuming loop's batches hold).

    >>> lock = threading.Lock()
    >>> with LockedExecutor(lock) as ex:
    ...     ex.submit(lock.locked).result()
    True
    """

    def __init__(self, lock: threading.Lock) -> None:
        super().__init__(1, thread_name_prefix="monitor")
        self.lock = lock

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future:
        def locked() -> Any:
            with self.lock:
                return fn(*args, **kwargs)

        return super().submit(locked)


class MonitorLoop(BatchLoop):
    """The batch loop on the consuming thread: each batch whole under the runtime's lock;
    a batch polled once the stop began is left uncommitted (replayed after the restart);
    an error that is not a stop's ends the process (:meth:`Runtime.die`)."""

    def __init__(self, runtime: Runtime, source: KafkaSource | None) -> None:
        super().__init__(runtime.handler, lambda: Publisher(runtime.settings), source,
                         overlap=False, pause=runtime.pipeline.pause)
        self.runtime = runtime
        self.running = False  # run() has not returned yet
        self.abandoned = False  # a stop gave up a batch's retries: it is replayed

    def step(self, batch: list[Message]) -> None:
        if not batch or self.runtime.stopping:
            return  # nothing in flight without overlap: nothing to settle
        with self.runtime.lock:
            try:
                super().step(batch)
            except Stopped:
                self.abandoned = True
                raise
            finally:
                self.runtime.measure()

    def run(self) -> None:
        self.running = True
        try:
            super().run()
        except BaseException as exc:  # a loop that died processes nothing: exit 1
            self.runtime.die(exc)
        finally:
            self.running = False


class Runtime:
    """Shared by the consuming loop, the idle timer, the stop handler and the web views.

    ``source`` is the loop's consumer (None: batches only through :meth:`MonitorLoop.step`,
    as a test or a benchmark drives them)."""

    def __init__(self, settings: Settings, pipeline: Pipeline,
                 source: KafkaSource | None = None) -> None:
        self.settings = settings
        self.pipeline = pipeline
        self.lock = threading.Lock()
        self.executor = LockedExecutor(self.lock)
        self.handler = MonitorHandler(settings, pipeline)
        self.loop = MonitorLoop(self, source)
        self.stopping = False
        self.measured: dict[str, Any] = {"windows_open": 0, "detectors": 0, "watermark_ms": None}
        self.start_time = time.monotonic()

    @property
    def started(self) -> bool:
        """The loop is consuming."""
        return self.loop.started

    @property
    def offsets(self) -> dict[tuple[str, int], int]:
        """Next offset per partition processed."""
        return self.loop.positions

    def assigned(self) -> bool:
        """The loop's consumer owns partitions (records can arrive)."""
        source = self.loop.source
        return bool(source is not None and source.assigned)

    def highwater(self, topic: str, partition: int) -> int | None:
        """The loop's cached high watermark of a partition it owns (unknown: None)."""
        source = self.loop.source
        return source.highwater.get((topic, partition)) if source is not None else None

    # -- closes ------------------------------------------------------------------------------

    async def close(self, close: Callable[[], BatchResult]) -> BatchResult:
        """Close windows (``pipeline.close_idle`` or ``close_on_stop``), publish their
        alerts, checkpoint; nothing is checkpointed when nothing closed."""
        def run() -> BatchResult:
            result = close()
            self.handler.count_alerts(result)
            if result.windows or result.rows:
                self.loop.deliver(outputs(self.settings, result, self.handler.codec))
                self.pipeline.checkpoint()
            self.measure()
            return result

        return await asyncio.get_running_loop().run_in_executor(self.executor, run)

    def measure(self) -> None:
        """The figures that must not be read while a batch or a close runs (the state dicts
        change under a reader on another thread); call under :attr:`lock`."""
        state = self.pipeline.monitor.state
        self.measured = {"windows_open": self.pipeline.windows_open(),
                         "detectors": len(getattr(state, "detectors", ())),
                         "watermark_ms": state.watermark if state.watermark > -(2**61)
                         else None}

    # -- dying and stopping -----------------------------------------------------------------

    def die(self, exc: BaseException) -> None:
        """Processing is dead: exit now (code 1) rather than run on without it."""
        log.critical("monitor processing died (%s: %s); exiting with %d so that the process "
                     "manager restarts the worker (the batch is replayed)",
                     type(exc).__name__, exc, EXIT_DEAD, exc_info=exc)
        logging.shutdown()
        os._exit(EXIT_DEAD)

    async def stop(self) -> None:
        """The graceful stop of the module doc; returns within ~STOP_BATCH_S + STOP_FLUSH_S."""
        t0 = time.monotonic()
        self.stopping = True
        self.loop.stop()
        if not await self._loop_ended(STOP_BATCH_S):
            self.pipeline.abort_retries()
            await self._loop_ended(STOP_FLUSH_S)
        if self.loop.running or self.loop.abandoned:
            log.warning("monitor stop: the batch in flight did not finish; it is replayed "
                        "after the restart, windows are not closed now")
            return
        abort = asyncio.get_running_loop().call_later(STOP_FLUSH_S,
                                                      self.pipeline.abort_retries)
        try:
            # The close queues behind any job on the executor (a query, the verdict): a
            # stop must not wait for those without bound.
            result = await asyncio.wait_for(self.close(self.pipeline.close_on_stop),
                                            2 * STOP_FLUSH_S)
            log.info("monitor stop: %d windows closed, %d rows stored, %d alerts, in %.1f s",
                     len(result.windows), result.rows, len(result.alerts),
                     time.monotonic() - t0)
        except Stopped:
            log.warning("monitor stop: windows could not be stored within %.0f s (Redis or "
                        "ClickHouse unreachable); they close after the restart", STOP_FLUSH_S)
        except TimeoutError:
            log.warning("monitor stop: closing windows did not start or end within %.0f s "
                        "(the executor was busy); they close after the restart",
                        2 * STOP_FLUSH_S)
        except Exception:  # the stop goes on: the windows close after the restart
            log.exception("monitor stop: closing windows failed")
        finally:
            abort.cancel()

    async def _loop_ended(self, timeout_s: float) -> bool:
        """Whether the consuming loop ended (settled and closed its consumer) in time."""
        deadline = time.monotonic() + timeout_s
        while self.loop.running and time.monotonic() < deadline:
            await asyncio.sleep(STOP_POLL_S)
        return not self.loop.running

    # -- readiness and stats ------------------------------------------------------------------

    def readiness(self) -> Readiness:
        sink = self.pipeline.sink
        retrying = (self.loop.retrying or self.pipeline.retrying
                    or (sink.last_error if sink.retrying else None))
        started = self.loop.batch_started
        return state_of(started=self.started, stopping=self.stopping, retrying=retrying,
                        batch_s=time.monotonic() - started if started is not None else None)

    def lag(self, highwater: Callable[[str, int], int | None]) -> dict[tuple[str, int], int]:
        """Records behind the high watermark per partition processed (unknown: left out)."""
        lag = {}
        for (topic, partition), offset in dict(self.offsets).items():
            high = highwater(topic, partition)
            if high is not None:
                lag[(topic, partition)] = max(0, high - offset)
        return lag

    def stats(self, highwater: Callable[[str, int], int | None]) -> dict[str, Any]:
        """Counters, window and detector figures, last write, lag, readiness."""
        totals = self.pipeline.totals
        state, reason = self.readiness()
        offsets = dict(self.offsets)  # one copy: the pipeline thread updates it
        lag = [highwater(topic, partition) for topic, partition in offsets]
        watermark = self.measured["watermark_ms"]
        now = int(time.time() * 1000)
        return {
            "state": state, "ready": state == "ready", "reason": reason,
            "uptime_s": round(time.monotonic() - self.start_time, 1),
            "batches": totals.batches, "records": totals.records, "counted": totals.counted,
            "duplicates": totals.duplicates, "dead_letters": totals.dead_letters,
            "windows_open": self.measured["windows_open"],
            "windows_closed": totals.windows_closed,
            "windows_provisional": totals.windows_provisional,
            "late_dropped": totals.late_dropped, "detectors": self.measured["detectors"],
            "alerts_raised": totals.alerts,
            "alerts_by_detector": dict(self.handler.alerts),
            "verdicts": dict(self.pipeline.verdicts),
            "label_delay_seconds": self.pipeline.label_delays.snapshot(),
            "clickhouse": {"rows_written": totals.rows_written,
                           "failures": self.pipeline.sink.failures,
                           "insert_seconds": self.pipeline.sink.insert_seconds.snapshot(),
                           "last_write_ms": totals.last_write_ms,
                           "last_write_rows": totals.last_write_rows,
                           "retrying": self.pipeline.sink.retrying},
            "lag": {
                "records": (sum(h - offsets[k] for h, k in zip(lag, offsets, strict=True))
                            if lag and None not in lag else None),
                "watermark_ms": watermark,
                "event_time_ms": now - watermark if watermark is not None else None,
                "since_last_record_ms": now - self.pipeline.last_record_ms,
            },
            "retries": totals.retries, "last_error": totals.last_error,
            "last_error_ms": totals.last_error_ms,
            "redis_state_lost": self.pipeline.marker.lost,  # processors/state_marker.py
        }


def guarded(runtime: Runtime, what: str) -> Callable[[Callable[[], Awaitable[None]]],
                                                      Callable[[], Awaitable[None]]]:
    """Wrap an async step so an unexpected error ends the process (:meth:`Runtime.die`)."""
    def wrap(step: Callable[[], Awaitable[None]]) -> Callable[[], Awaitable[None]]:
        async def run() -> None:
            try:
                await step()
            except asyncio.CancelledError:
                raise
            except Stopped as exc:  # a stop abandoned the retries: not a death
                if not runtime.stopping:
                    runtime.die(exc)
            except BaseException as exc:  # anything else is a dead agent
                log.error("monitor %s failed", what)
                runtime.die(exc)
        return run
    return wrap
