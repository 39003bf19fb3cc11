"""``shadowpipe worker monitor``: the Faust agent around :class:`.pipeline.Pipeline`.

The agent stays thin: it takes micro-batches without acking and hands each to
:class:`.runtime.Runtime`, which runs the pipeline in one dedicated thread (ClickHouse and
Redis calls block; the event loop keeps heartbeating and serving the web endpoints),
publishes alerts (Avro, keyed by challenger) and dead letters, and checkpoints; only then
is the batch acked. A timer closes the windows of an idle stream; a stop closes or stores
the open ones. ``GET /shadowpipe/monitor/ready`` (200 or 503) and
``GET /shadowpipe/monitor/stats`` (JSON counters) report on it, as on every worker
(:mod:`~shadowpipe.processors.runtime.health`); a dead agent ends the process with exit
code 1 (see :mod:`.runtime`).

It also serves ``GET /shadowpipe/query/?name=arms&since_ms=...&challenger=...&by=...``:
the named read queries of :mod:`shadowpipe.processors.read` as JSON, run on the
monitor's own ClickHouse client. With the embedded engine only this process may open the
data directory, so this is how ``shadowpipe compare`` reads while the pipeline runs.

Run one monitor instance (a second one is a hot standby): window state and detectors are
per instance, so splitting the joined topic between instances would split the windows.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from shadowpipe.config import Settings
from shadowpipe.processors.monitor import partitioned, reference
from shadowpipe.processors.monitor.pipeline import Pipeline
from shadowpipe.processors.monitor.runtime import Runtime, guarded
from shadowpipe.processors.monitor.sql import attach as attach_sql
from shadowpipe.processors.read import QUERIES
from shadowpipe.processors.read import run as run_query
from shadowpipe.processors.runtime.health import add_health
from shadowpipe.processors.runtime.message import Message
from shadowpipe.processors.verdict import agent as verdict_agent
from shadowpipe.stores import check_clickhouse, check_redis, clickhouse_client
from shadowpipe.tables import database

log = logging.getLogger(__name__)
QUERY_PATH = "/shadowpipe/query/"


def _client_factory(settings: Settings, first: Any) -> Any:
    """Reuse the client opened by the start-up check, then reconnect after failures."""
    pending = [first]
    return lambda: pending.pop() if pending else clickhouse_client(settings)


def idle_tick_s(idle_s: int) -> float:
    """How often the idle timer looks: a fifth of the idle timeout, 0.5 s to 5 s.

    >>> idle_tick_s(30), idle_tick_s(1)
    (5.0, 0.5)
    """
    return min(5.0, max(0.5, idle_s / 5))


def install(app: Any, settings: Settings) -> None:
    """Check Redis and ClickHouse, migrate the tables, declare the agent, the idle timer,
    the stop handler and the endpoints (query, readiness, stats)."""
    if settings.monitor_mode == "partitioned":  # N processes in consumer groups
        return partitioned.install(app, settings)
    check_redis(settings, "worker monitor")
    client = check_clickhouse(settings, "worker monitor")
    pipeline = Pipeline(settings, client_factory=_client_factory(settings, client))
    for line in pipeline.migrate():
        log.info("clickhouse %s", line)
    runtime = Runtime(settings, pipeline)
    topic = app.topic(settings.topic("joined"))

    @app.agent(topic, name=f"{settings.topic_prefix}monitor")
    async def monitor(stream: Any) -> None:
        @guarded(runtime, "agent")
        async def consume() -> None:
            runtime.started = True
            async for events in stream.noack().noack_take(
                    settings.monitor_batch_size, within=settings.monitor_batch_ms / 1000):
                if runtime.stopping:
                    continue  # left unacked: replayed after the restart
                # Shielded: a stop cancels the agent, not the batch (Runtime.stop waits).
                await asyncio.shield(runtime.submit([_message(ev) for ev in events]))
                for ev in events:
                    await stream.ack(ev)

        await consume()

    @app.timer(interval=idle_tick_s(settings.monitor_idle_s), name="monitor_idle")
    @guarded(runtime, "idle close")
    async def monitor_idle() -> None:
        if runtime.stopping:
            return
        if not runtime.started or not _assigned(app):
            # Idleness counts from when records could arrive: a slow group join with a
            # backlog waiting must not close the windows that backlog belongs to.
            pipeline.last_record_ms = pipeline.clock()
            return
        result = await runtime.close(pipeline.close_idle)
        if result.windows:
            log.info("idle stream: %d windows closed by the wall clock, %d alerts",
                     len(result.windows), len(result.alerts))

    @app.on_before_shutdown.connect
    async def monitor_stop(sender: Any, **kwargs: Any) -> None:
        await runtime.stop()

    add_health(app, "monitor", lambda: runtime.stats(lambda t, p: _highwater(app, t, p)),
               runtime.readiness, lag=lambda: runtime.lag(lambda t, p: _highwater(app, t, p)))

    @app.page(QUERY_PATH)
    async def query(web: Any, request: Any) -> Any:
        params = dict(request.query)
        name = params.pop("name", "")
        if name not in QUERIES:
            return web.json({"error": f"unknown query {name!r}", "queries": sorted(QUERIES)},
                            status=404)
        loop = asyncio.get_running_loop()
        try:
            # run=ID: a replay run's database (stored earlier in the same data directory)
            db = database(settings.replace(run=params.pop("run", "")))
            payload = await loop.run_in_executor(
                runtime.executor, run_query, pipeline.sink, name, db, params)
        except Exception as exc:  # report query errors to the caller, keep serving
            return web.json({"error": str(exc).splitlines()[0]}, status=400)
        return web.json(payload)

    reference.attach(app, settings, pipeline, runtime.executor)
    verdict_agent.install(app, settings, pipeline, runtime.executor)
    attach_sql(app, settings)  # read-only SQL on the embedded engine (docs/sql.md)


def _assigned(app: Any) -> bool:
    try:
        return bool(app.consumer.assignment())
    except Exception:  # not started yet
        return False


def _highwater(app: Any, topic: str, partition: int) -> int | None:
    from faust.types import TP

    try:
        return int(app.consumer.highwater(TP(topic, partition)))
    except Exception:  # unassigned, or not fetched yet: unknown, not zero
        return None


def _message(ev: Any) -> Message:
    msg = ev.message
    ts = int(msg.timestamp * 1000) if msg.timestamp else None
    return Message(ev.value, ev.key, msg.topic, msg.partition, msg.offset, ts)
