"""Worker output: a confluent-kafka producer whose flush the agent awaits before acking.

Agents process a micro-batch, ``produce`` its outputs, ``await flush()``, and only then
ack the input events, so a crash replays rather than loses (at-least-once).

Only failed deliveries are reported (``delivery.report.only.error``): a Python callback
per acknowledged output cost ~1 us each on the workers' hot loops. A flush that empties
librdkafka's queue with no failure reported means the whole batch is on the broker.

>>> from shadowpipe.config import Settings
>>> pub = Publisher(Settings.load(env={"SHADOWPIPE_KAFKA_BOOTSTRAP": "127.0.0.1:9"}),
...                 log_level=0)
>>> pub.produce("shadowpipe.joined", "r1", b"record")
>>> pub.pending >= 1  # no broker there: it stays queued (connection errors count too)
True
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import Any

from shadowpipe import kafka
from shadowpipe.config import Settings


class DeliveryError(RuntimeError):
    """Some outputs of a batch were not acknowledged by the broker."""


class Publisher:
    """Produce outputs keyed by request id; ``flush`` raises if any delivery failed."""

    def __init__(self, settings: Settings, **overrides: Any) -> None:
        self._producer = kafka.producer(settings, **{
            "on_delivery": self._on_delivery, "delivery.report.only.error": True, **overrides,
        })
        self._failures: list[str] = []

    @property
    def pending(self) -> int:
        """Messages librdkafka still holds (queued, in flight, or reports to serve)."""
        return len(self._producer)

    def _on_delivery(self, err: Any, _msg: Any) -> None:
        if err is not None:
            self._failures.append(str(err))

    def produce(self, topic: str, key: str | bytes | None, value: bytes) -> None:
        """Queue one message; on a full local queue, serve callbacks and retry."""
        self.produce_many(topic, ((key, value),))

    def produce_many(self, topic: str, pairs: Iterable[tuple[Any, bytes]]) -> None:
        """Queue (key, value) pairs; on a full local queue, serve callbacks and retry."""
        produce = self._producer.produce
        for key, value in pairs:
            while True:
                try:
                    produce(topic, value, key)
                    break
                except BufferError:
                    self._producer.poll(0.05)

    def flush_sync(self, timeout_s: float = 30.0) -> None:
        """Block until every queued message is acknowledged, or raise DeliveryError."""
        remaining = self._producer.flush(timeout_s)
        failures, self._failures = self._failures, []
        if remaining or failures:
            raise DeliveryError(
                f"{remaining} undelivered, {len(failures)} failed: {failures[:3]}"
            )

    async def flush(self, timeout_s: float = 30.0) -> None:
        """``flush_sync`` in a thread, so the event loop (heartbeats, web) keeps running."""
        if self.pending or self._failures:
            await asyncio.get_running_loop().run_in_executor(None, self.flush_sync, timeout_s)
