"""The joiner's consumer loop: take a micro-batch, merge, publish, flush, commit.

Why not a Faust stream: through a ``noack_take`` agent the joiner measured ~1,000 joined
records/s on the embedded broker (Faust's per-event machinery), against ~5x that for the
same :class:`~shadowpipe.processors.join.core.JoinCore` fed by librdkafka. So, like the
shadow worker, the hot path is a librdkafka consumer on one thread of the Faust worker,
which still owns the process, the web endpoint, the sweep timer and the lifecycle.

At-least-once: a batch's offsets are committed only after its Redis merges are done and
its outputs (joined records, dead letters) are acknowledged by the broker. A Redis failure
is logged, counted, and the same batch is merged again with back-off (0.2 s to 10 s),
never committed meanwhile; re-merging is safe (a stored message re-emits the same
versions). A delivery failure re-produces the batch's outputs. A rebalance (inside
``consume``, on this thread) first settles the batch in flight. Consumers share the group
``<topic_prefix>join``.

A Redis that comes back empty (see :mod:`~shadowpipe.processors.state_marker`) has lost the
pending requests: that is logged once and counted as ``redis_state_lost``; the loop goes on.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from shadowpipe.processors.join.core import BatchResult, JoinCore, Message
from shadowpipe.processors.join.store import StoreError
from shadowpipe.processors.publisher import DeliveryError, Publisher
from shadowpipe.processors.state_marker import StateMarker, has_committed_offsets

from shadowpipe import kafka
from shadowpipe.config import Settings

log = logging.getLogger("shadowpipe.join")
BATCH_SIZE = 1000  # with publishing overlapped, 500-2000 measured the same throughput
BATCH_WAIT_S = 0.05
INPUT_KINDS = ("inference", "predictions", "feedback")
CONSUMER_OVERRIDES: dict[str, Any] = {
    "fetch.max.bytes": 64 * 1024 * 1024,
    "max.partition.fetch.bytes": 8 * 1024 * 1024,
    # The embedded broker answers a fetch only at fetch.wait.max.ms when no new data
    # arrives meanwhile: keep it short.
    "fetch.wait.max.ms": 20,
    "fetch.error.backoff.ms": 20,
}
PRODUCER_OVERRIDES: dict[str, Any] = {"linger.ms": 2, "batch.num.messages": 10000}


def group_id(settings: Settings) -> str:
    """The consumer group of every joiner of a deployment.

    >>> group_id(Settings.load(env={}))
    'shadowpipe.join'
    """
    return f"{settings.topic_prefix}join"


def produce(publisher: Publisher, settings: Settings, result: BatchResult) -> None:
    """Queue a batch's records and dead letters (confirm with ``publisher.flush_sync``)."""
    publisher.produce_many(settings.topic("joined"), result.joined)
    publisher.produce_many(settings.topic("deadletter"), result.dead)


class JoinLoop:
    """Consume the three input topics into :class:`JoinCore` until :meth:`stop`.

    Publishing overlaps the next batch: batch k's outputs are produced, batch k+1 is merged
    while they travel, then k is flushed and committed before k+1 is produced.
    """

    def __init__(self, settings: Settings, core: JoinCore) -> None:
        self.settings = settings
        self.core = core
        self.kinds = {settings.topic(kind): kind for kind in INPUT_KINDS}
        self._stop = threading.Event()
        self._inflight: tuple[list[Message], BatchResult] | None = None
        self._consumer: Any = None
        self._publisher: Publisher | None = None
        store = core.store
        self.marker = StateMarker(store.client, settings.topic_prefix, "join",
                                  witnesses=(store.deadlines, store.layouts_key))
        core.counters.setdefault("redis_state_lost", 0)  # shown in the stats even when 0

    def stop(self) -> None:
        self._stop.set()

    def run(self) -> None:
        """The loop; returns after :meth:`stop` (a batch in progress is not committed)."""
        s = self.settings
        self._check_state()
        consumer = self._consumer = kafka.consumer(s, group_id(s), **CONSUMER_OVERRIDES)
        consumer.subscribe(list(self.kinds), on_revoke=self._on_revoke)
        self._publisher = Publisher(s, **PRODUCER_OVERRIDES)
        try:
            while not self._stop.is_set():
                batch = self._messages(consumer.consume(BATCH_SIZE, BATCH_WAIT_S))
                result = self._merge(batch) if batch else None
                if not self._settle():
                    break
                if result is not None:
                    produce(self._publisher, s, result)
                    self._inflight = (batch, result)
            self._settle()
        finally:
            consumer.close()

    def _messages(self, msgs: list[Any]) -> list[Message]:
        batch = []
        for m in msgs:
            if m.error() is not None:
                log.warning("join consumer: %s", m.error())
                continue
            ts_type, ts = m.timestamp()
            batch.append(Message(self.kinds[m.topic()], m.partition(), m.offset(), m.key(),
                                 m.value(), ts if ts_type else None))
        return batch

    def _merge(self, batch: list[Message]) -> BatchResult | None:
        """Merge ``batch`` into Redis, retrying with back-off; None if stopped meanwhile."""
        delay = 0.2
        while not self._stop.is_set():
            self._check_state()
            try:
                return self.core.process(batch)
            except StoreError as exc:  # counted by the core; nothing of the batch is committed
                log.error("join batch failed, retrying in %.1f s: %s", delay, exc)
                self.core.count(batch_retries=1)
                self._stop.wait(delay)
                delay = min(delay * 2, 10.0)
        return None

    def _check_state(self) -> None:
        """Count a Redis that came back without this deployment's pending requests (the
        marker logs it once); at most once a second, the first time before consuming."""
        s = self.settings
        if self.marker.check(lambda: has_committed_offsets(s, [group_id(s)], list(self.kinds))):
            self.core.count(redis_state_lost=1)
            self.core.store.layouts.resave()

    def _settle(self) -> bool:
        """Flush and commit the in-flight batch (re-producing it on delivery failures)."""
        if self._inflight is None:
            return True
        batch, result = self._inflight
        assert self._publisher is not None
        delay = 0.2
        while True:
            try:
                self._publisher.flush_sync()
                break
            except DeliveryError as exc:
                log.error("publishing a join batch failed, again in %.1f s: %s", delay, exc)
                self.core.count(delivery_retries=1)
                if self._stop.wait(delay):
                    return False
                delay = min(delay * 2, 10.0)
                produce(self._publisher, self.settings, result)
        self._inflight = None
        self._commit(batch)
        return True

    def _commit(self, batch: list[Message]) -> None:
        from confluent_kafka import KafkaException, TopicPartition

        nxt: dict[tuple[str, int], int] = {}
        topics = {kind: topic for topic, kind in self.kinds.items()}
        for m in batch:
            key = (topics[m.kind], m.partition)
            nxt[key] = max(nxt.get(key, 0), m.offset + 1)
        try:
            self._consumer.commit(
                offsets=[TopicPartition(t, p, o) for (t, p), o in nxt.items()],
                asynchronous=False)
        except KafkaException as exc:  # e.g. partitions moved: their new owner replays
            log.warning("join commit failed (the batch will be replayed): %s", exc)

    def _on_revoke(self, consumer: Any, partitions: list[Any]) -> None:
        self._settle()  # before the partitions' next owner starts from our commits


def sweep_once(core: JoinCore, publisher: Publisher, settings: Settings) -> int:
    """One sweep round: claim due requests, publish their orphans, bury them; how many."""
    claim, result = core.sweep()
    produce(publisher, settings, result)
    publisher.flush_sync()
    core.finish(claim)
    return claim.handled

