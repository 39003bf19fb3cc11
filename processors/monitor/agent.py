"""``shadowpipe worker monitor``: the Faust agent around :class:`.pipeline.Pipeline`.

The agent stays thin: it takes micro-batches without acking, runs the pipeline in one
dedicated thread (ClickHouse and Redis calls block; the event loop keeps heartbeating and
serving the web endpoint), publishes alerts (Avro, keyed by challenger) and dead letters,
checkpoints, and only then acks the batch.

It also serves ``GET /shadowpipe/query/?name=arms&since_ms=...&challenger=...&by=...``:
the named read queries of :mod:`.queries` as JSON, run on the monitor's own ClickHouse
client. With the embedded engine only this process may open the data directory, so this is
how ``shadowpipe compare`` reads while the pipeline runs.

Run one monitor instance (a second one is a hot standby): window state and detectors are
per instance, so splitting the joined topic between instances would split the windows.
"""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from shadowpipe.processors.monitor import reference
from shadowpipe.processors.monitor.pipeline import Message, Pipeline
from shadowpipe.processors.monitor.queries import QUERIES
from shadowpipe.processors.monitor.queries import run as run_query
from shadowpipe.processors.publisher import DeliveryError, Publisher
from shadowpipe.processors.verdict import agent as verdict_agent
from shadowpipe.schemas.codec import Codec

from shadowpipe.config import Settings
from shadowpipe.stores import check_clickhouse, check_redis, clickhouse_client

log = logging.getLogger(__name__)
QUERY_PATH = "/shadowpipe/query/"


def _client_factory(settings: Settings, first: Any) -> Any:
    """Reuse the client opened by the start-up check, then reconnect after failures."""
    pending = [first]
    return lambda: pending.pop() if pending else clickhouse_client(settings)


def install(app: Any, settings: Settings) -> None:
    """Check Redis and ClickHouse, migrate the tables, declare the agent and the endpoint."""
    check_redis(settings, "worker monitor")
    client = check_clickhouse(settings, "worker monitor")
    pipeline = Pipeline(settings, client_factory=_client_factory(settings, client))
    for line in pipeline.migrate():
        log.info("clickhouse %s", line)
    executor = ThreadPoolExecutor(1, thread_name_prefix="monitor")
    publisher = Publisher(settings)
    codec = Codec(settings.schema_registry_url)
    topic = app.topic(settings.topic("joined"))

    @app.agent(topic, name=f"{settings.topic_prefix}monitor")
    async def monitor(stream: Any) -> None:
        loop = asyncio.get_running_loop()
        async for events in stream.noack().noack_take(
                settings.monitor_batch_size, within=settings.monitor_batch_ms / 1000):
            messages = [_message(ev) for ev in events]
            result = await loop.run_in_executor(executor, pipeline.process, messages)
            outputs = [(settings.topic("alerts"), a["challenger"], codec.encode("Alert", a))
                       for a in result.alerts]
            outputs += [(settings.topic("deadletter"), d["key"], codec.encode("DeadLetter", d))
                        for d in result.dead_letters]
            await _publish(publisher, outputs)
            await loop.run_in_executor(executor, pipeline.checkpoint)
            for ev in events:
                await stream.ack(ev)

    @app.page(QUERY_PATH)
    async def query(web: Any, request: Any) -> Any:
        params = dict(request.query)
        name = params.pop("name", "")
        if name not in QUERIES:
            return web.json({"error": f"unknown query {name!r}", "queries": sorted(QUERIES)},
                            status=404)
        db = settings.clickhouse_database
        loop = asyncio.get_running_loop()
        try:
            payload = await loop.run_in_executor(
                executor, run_query, pipeline.sink, name, db, params)
        except Exception as exc:  # report query errors to the caller, keep serving
            return web.json({"error": str(exc).splitlines()[0]}, status=400)
        return web.json(payload)

    reference.attach(app, settings, pipeline, executor)
    verdict_agent.install(app, settings, pipeline, executor)


def _message(ev: Any) -> Message:
    msg = ev.message
    ts = int(msg.timestamp * 1000) if msg.timestamp else None
    return Message(ev.value, ev.key, msg.topic, msg.partition, msg.offset, ts)


async def _publish(publisher: Publisher, outputs: list[tuple[str, Any, bytes]]) -> None:
    """Produce and flush, re-producing everything until the broker acknowledged it all
    (a repeated alert carries the same ``alert_id``; nothing is acked before)."""
    backoff = 0.2
    while True:
        for topic, key, value in outputs:
            publisher.produce(topic, key, value)
        try:
            await publisher.flush()
            return
        except DeliveryError as exc:
            log.warning("alert/dead-letter delivery failed (retry in %.1fs): %s", backoff, exc)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 10.0)
