"""``shadowpipe worker join``: the Faust side of the joiner, kept thin.

One agent reads the inference, predictions and feedback topics in micro-batches
(``noack_take``), hands each batch to :class:`~shadowpipe.processors.join.core.JoinCore`
in a thread (decode, atomic Lua merges pipelined into Redis, JoinedRecord bytes), publishes
the records keyed by request id on the joined topic, and acks the batch only after the
Redis writes **and** the broker acknowledged the outputs. A Redis failure (out of memory
included) is logged and counted and the same batch is retried with back-off, never acked.

A timer sweeps requests past the feedback horizon: claim (Lua), publish their orphans,
flush, then bury them. ``GET /join/stats/`` on the worker's web port returns the counters.

>>> sweep_interval_s(7 * 86400), sweep_interval_s(2)
(5.0, 0.5)
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from shadowpipe.processors.join.core import BatchResult, JoinCore, Message
from shadowpipe.processors.join.store import StoreError
from shadowpipe.processors.publisher import DeliveryError, Publisher

from shadowpipe.config import Settings

BATCH_SIZE = 2000
BATCH_WITHIN_S = 0.05
STATS_LOG_S = 30.0
log = logging.getLogger(__name__)


def sweep_interval_s(horizon_s: float) -> float:
    """How often to look for expired requests: a quarter of the horizon, 0.25 s to 5 s."""
    return min(5.0, max(0.25, horizon_s / 4))


class JoinRuntime:
    """The joiner's IO around :class:`JoinCore`: retries, publishing, sweeping."""

    def __init__(self, settings: Settings, core: JoinCore | None = None) -> None:
        self.core = core or JoinCore(settings)
        # Two producers: a flush reports only its own caller's failures.
        self.batch_publisher = Publisher(settings)
        self.sweep_publisher = Publisher(settings)
        self.joined_topic = settings.topic("joined")
        self.deadletter_topic = settings.topic("deadletter")
        self._last_log = time.monotonic()

    async def process(self, messages: list[Message]) -> None:
        """Merge and publish ``messages``, retrying until done; then they may be acked."""
        await self._until_done("batch", self._process_once, messages)

    async def sweep(self) -> None:
        """Publish the orphans of requests past the horizon, then bury them."""
        while await self._until_done("sweep", self._sweep_once):
            pass
        if time.monotonic() - self._last_log >= STATS_LOG_S:
            self._last_log = time.monotonic()
            log.info("join counters: %s", self.core.stats())

    async def _process_once(self, messages: list[Message]) -> int:
        result = await asyncio.to_thread(self.core.process, messages)
        await self._publish(self.batch_publisher, result)
        return len(result.joined)

    async def _sweep_once(self) -> int:
        claim, result = await asyncio.to_thread(self.core.sweep)
        await self._publish(self.sweep_publisher, result)
        await asyncio.to_thread(self.core.finish, claim)
        return claim.handled

    async def _until_done(self, what: str, attempt: Any, *args: Any) -> int:
        delay = 0.2
        while True:
            try:
                return await attempt(*args)
            except (StoreError, DeliveryError) as exc:
                # Nothing was acked: the retry re-emits what was stored, with the same versions.
                log.error("join %s failed, retrying in %.1f s: %s", what, delay, exc)
                self.core.count(**{f"{what}_retries": 1})
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10.0)

    async def _publish(self, publisher: Publisher, result: BatchResult) -> None:
        for key, value in result.joined:
            publisher.produce(self.joined_topic, key, value)
        for key, value in result.dead:
            publisher.produce(self.deadletter_topic, key, value)
        await publisher.flush()


def install(app: Any, settings: Settings) -> None:
    """Check Redis (ConfigError if unreachable), then declare the joiner's agent, timer, page."""
    from shadowpipe.stores import check_redis

    check_redis(settings, "worker join")
    runtime = JoinRuntime(settings)
    kinds = {settings.topic(kind): kind for kind in ("inference", "predictions", "feedback")}
    topic = app.topic(*kinds)

    @app.agent(topic, name="join")
    async def join(stream: Any) -> None:
        async for events in stream.noack().noack_take(BATCH_SIZE, within=BATCH_WITHIN_S):
            await runtime.process([_message(kinds, ev) for ev in events])
            for ev in events:
                await stream.ack(ev)

    @app.timer(interval=sweep_interval_s(settings.feedback_horizon_s), name="join_sweep")
    async def join_sweep() -> None:
        await runtime.sweep()

    @app.page("/join/stats/")
    async def join_stats(web: Any, request: Any) -> Any:
        return web.json({"pending": runtime.core.store.pending(), **runtime.core.stats()})


def _message(kinds: dict[str, str], event: Any) -> Message:
    msg = event.message
    stamp = int(msg.timestamp * 1000) if msg.timestamp else None
    return Message(kinds[msg.topic], msg.partition, msg.offset, msg.key, msg.value, stamp)
