"""Worker output: a confluent-kafka producer whose flush the agent awaits before acking.

Agents process a micro-batch, ``produce`` its outputs, ``await flush()``, and only then
ack the input events, so a crash replays rather than loses (at-least-once).

>>> from shadowpipe.config import Settings
>>> pub = Publisher(Settings.load(env={}))
>>> pub.pending
0
"""

from __future__ import annotations

import asyncio
from typing import Any

from shadowpipe import kafka
from shadowpipe.config import Settings


class DeliveryError(RuntimeError):
    """Some outputs of a batch were not acknowledged by the broker."""


class Publisher:
    """Produce outputs keyed by request id; ``flush`` raises if any delivery failed."""

    def __init__(self, settings: Settings, **overrides: Any) -> None:
        self._producer = kafka.producer(settings, **overrides)
        self._failures: list[str] = []
        self.pending = 0

    def _on_delivery(self, err: Any, _msg: Any) -> None:
        self.pending -= 1
        if err is not None:
            self._failures.append(str(err))

    def produce(self, topic: str, key: str | bytes | None, value: bytes) -> None:
        """Queue one message; on a full local queue, serve callbacks and retry."""
        while True:
            try:
                self._producer.produce(topic, value, key, on_delivery=self._on_delivery)
                self.pending += 1
                return
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
        if self.pending:
            await asyncio.get_running_loop().run_in_executor(None, self.flush_sync, timeout_s)
