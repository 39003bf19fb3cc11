"""``shadowpipe worker monitor``: the consuming loop around :class:`.pipeline.Pipeline`.

The joined topic is consumed on a thread of its own by the workers' batch loop with a
librdkafka consumer in the group ``<prefix>monitor`` (:func:`group_id`), as the shadow
worker and the joiner do, its partitions merged in timestamp order (:mod:`.source`);
:class:`.runtime.Runtime` runs each micro-batch whole: pipeline, alerts (Avro, keyed by
challenger) and dead letters published, checkpoint, then commit.
Faust owns the process, the web endpoints and the timers: one closes the windows of an idle
stream; a stop closes or stores the open ones. ``GET /shadowpipe/monitor/ready`` (200 or
503) and ``GET /shadowpipe/monitor/stats`` (JSON counters) report on it, as on every worker
(:mod:`~shadowpipe.processors.runtime.health`); a dead loop ends the process with exit
code 1 (see :mod:`.runtime`).

Monitors of earlier releases consumed through a Faust agent in the group
``<prefix>worker-monitor`` (``worker-shadow-join-monitor`` in ``worker all``): a first start
in the new group adopts that group's committed offsets (:func:`adopt_offsets`), so an
upgrade resumes where the old monitor stopped.

It also serves the named read queries (:mod:`.queries`), the verdict (:mod:`shadowpipe.
processors.verdict.agent`) and read-only SQL (:mod:`.sql`) on its own ClickHouse client:
with the embedded engine only this process may open the data directory.

Run one monitor instance (a second one is a hot standby): window state and detectors are
per instance, so splitting the joined topic between instances would split the windows
(``SHADOWPIPE_MONITOR_MODE=partitioned`` is the mode that splits them: :mod:`.partitioned`).
"""

from __future__ import annotations

import logging
from typing import Any

from shadowpipe.config import Settings
from shadowpipe.processors.monitor import partitioned, queries, reference
from shadowpipe.processors.monitor.pipeline import Pipeline
from shadowpipe.processors.monitor.runtime import Runtime, guarded
from shadowpipe.processors.monitor.source import MergedSource
from shadowpipe.processors.monitor.sql import attach as attach_sql
from shadowpipe.processors.runtime.health import add_health
from shadowpipe.processors.runtime.thread import add_loop_service
from shadowpipe.processors.state_marker import monitor_groups
from shadowpipe.processors.verdict import agent as verdict_agent
from shadowpipe.stores import check_clickhouse, check_redis, clickhouse_client

log = logging.getLogger(__name__)
CONSUMER_OVERRIDES: dict[str, Any] = {
    # Runs of at most ~1 MB per partition (a producer's batch), so that MergedSource
    # holds a run of every partition well before its cap (4 micro-batches).
    "fetch.max.bytes": 64 * 1024 * 1024,
    "max.partition.fetch.bytes": 1024 * 1024,
    "queued.max.messages.kbytes": 256 * 1024,
    # The embedded broker answers a fetch only at fetch.wait.max.ms when no new data
    # arrives meanwhile: keep it short.
    "fetch.wait.max.ms": 20,
    "fetch.error.backoff.ms": 20,
    "fetch.queue.backoff.ms": 20,
}


def group_id(settings: Settings) -> str:
    """The consumer group of the monitor (``single`` mode).

    >>> group_id(Settings.load(env={}))
    'shadowpipe.monitor'
    """
    return f"{settings.topic_prefix}monitor"


def adopt_offsets(settings: Settings, group: str, earlier: list[str],
                  topics: list[str]) -> str | None:
    """If ``group`` has no committed offset on ``topics``, commit in it the offsets of the
    first of the ``earlier`` groups that has some (an offset fetch and a commit: no group is
    joined); return that group's name, or None when nothing was adopted."""
    from confluent_kafka import TopicPartition

    from shadowpipe import kafka

    new = kafka.consumer(settings, group)
    try:
        meta = new.list_topics(timeout=10).topics
        tps = [TopicPartition(t, p) for t in topics if t in meta for p in meta[t].partitions]
        if not tps or any(tp.offset >= 0 for tp in new.committed(tps, timeout=10)):
            return None
        for old in earlier:
            consumer = kafka.consumer(settings, old)
            try:
                done = [tp for tp in consumer.committed(tps, timeout=10) if tp.offset >= 0]
            finally:
                consumer.close()
            if done:
                new.commit(offsets=done, asynchronous=False)
                return old
        return None
    finally:
        new.close()


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
    group, topics = group_id(settings), [settings.topic("joined")]
    earlier = [g for g in monitor_groups(settings) if g != group]
    if (old := adopt_offsets(settings, group, earlier, topics)) is not None:
        log.info("monitor: group %s starts at the committed offsets of %s", group, old)
    source = MergedSource(settings, group, topics, settings.monitor_batch_size,
                          settings.monitor_batch_ms / 1000, **CONSUMER_OVERRIDES)
    runtime = Runtime(settings, pipeline, source)
    add_loop_service(app, runtime.loop, f"{settings.topic_prefix}monitor")

    @app.timer(interval=idle_tick_s(settings.monitor_idle_s), name="monitor_idle")
    @guarded(runtime, "idle close")
    async def monitor_idle() -> None:
        if runtime.stopping:
            return
        if not runtime.started or not runtime.assigned():
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

    add_health(app, "monitor", lambda: runtime.stats(runtime.highwater),
               runtime.readiness, lag=lambda: runtime.lag(runtime.highwater))

    queries.serve(app, settings, pipeline.sink, runtime.executor)
    reference.attach(app, settings, pipeline.sink, runtime.executor,
                     use=lambda rows: _set_profiles(pipeline, rows))
    verdict_agent.install(app, settings, pipeline, runtime.executor)
    attach_sql(app, settings)  # read-only SQL on the embedded engine (docs/sql.md)


def _set_profiles(pipeline: Any, rows: list[dict[str, Any]]) -> dict[str, Any]:
    profiles = reference.profiles_from_rows(rows)
    pipeline.monitor.set_profiles(profiles)
    return profiles
