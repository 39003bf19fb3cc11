"""The shadow worker's consumer loop: take a micro-batch, score, publish, flush, commit.

Why not a Faust stream: on the embedded broker a Faust agent doing nothing but
``noack_take(5000)`` + acks measured ~5,000 events/s (Faust's per-event machinery), half
the throughput target before any decoding or scoring. So the hot path is a librdkafka
consumer in one thread of the Faust worker (which still owns the process, the web
endpoint and the lifecycle), and everything per event is plain Python on raw bytes.

At-least-once: a batch's offsets are committed only after all its outputs (predictions
and dead letters) are acknowledged by the broker. Batch k is flushed and committed after
batch k+1 is scored (its acknowledgements arrive meanwhile), before k+1 is published.
When a rebalance revokes partitions (inside ``consume``) the revoke callback flushes and
commits the batch in flight. A failed delivery rewinds the batches' partitions, so they
are scored again (duplicates, never gaps). Consumers share the
group ``<topic_prefix>shadow``, so ``worker shadow`` replicas split the partitions.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import threading
import time
from typing import Any

from shadowpipe.processors.publisher import DeliveryError, Publisher
from shadowpipe.processors.shadow.affinity import LoopPin, thread_ids
from shadowpipe.processors.shadow.core import Raw, ShadowProcessor

from shadowpipe import kafka
from shadowpipe.config import Settings

log = logging.getLogger("shadowpipe.shadow")
LOG_EVERY_S = 30.0
CONSUMER_OVERRIDES: dict[str, Any] = {
    # Large fetches: the loop takes whole micro-batches at once.
    "fetch.max.bytes": 64 * 1024 * 1024,
    "max.partition.fetch.bytes": 8 * 1024 * 1024,
    "queued.max.messages.kbytes": 256 * 1024,
    # The embedded broker answers a fetch only at fetch.wait.max.ms when no new data
    # arrives meanwhile (real Kafka answers as soon as data is there): keep it short.
    "fetch.wait.max.ms": 20,
    "fetch.error.backoff.ms": 20,
    "fetch.queue.backoff.ms": 20,
}
PRODUCER_OVERRIDES: dict[str, Any] = {"linger.ms": 2, "batch.num.messages": 10000}
YOUNG_GC_THRESHOLD = 50_000


def tune_gc() -> None:
    """Keep the collector off the hot path.

    A micro-batch keeps thousands of containers alive (decoded records, outputs) across
    young collections, so they reach the old generation and trigger full collections
    that walk the whole start-up heap (Faust, scikit-learn...): ~10 us per event
    measured. The start-up heap is frozen (never scanned again; it lives as long as the
    process anyway) and the young generation is made large enough for a batch to die in.
    Process-wide: in ``worker all`` it helps the other loops alike.
    """
    gc.freeze()
    young, middle, old = gc.get_threshold()
    gc.set_threshold(max(young, YOUNG_GC_THRESHOLD), middle, old)


def group_id(settings: Settings) -> str:
    """The consumer group of every shadow worker of a deployment."""
    return f"{settings.topic_prefix}shadow"


class ShadowLoop:
    """Consume ``settings.topic("inference")`` and score it until :meth:`stop`."""

    def __init__(self, settings: Settings, processor: ShadowProcessor) -> None:
        self.settings = settings
        self.processor = processor
        self.stats = processor.stats
        self._stop = threading.Event()
        self._published: dict[tuple[str, int], int] = {}  # next offset, flushed outputs
        self._consumer: Any = None
        self._publisher: Publisher | None = None
        self._inflight: list[Raw] = []  # published, not yet flushed nor committed
        self._produced_at = 0.0
        self.pin: LoopPin | None = None

    def stop(self) -> None:
        self._stop.set()

    def run(self) -> None:
        """The loop; returns after :meth:`stop`, having committed what was published."""
        s = self.settings
        pin = self.pin = LoopPin(enabled=s.shadow_cpu_pinning == "auto")
        pin.pin()  # before the clients: their threads inherit the CPU
        before = thread_ids()
        consumer = self._consumer = kafka.consumer(s, group_id(s), **CONSUMER_OVERRIDES)
        self._publisher = Publisher(s, **PRODUCER_OVERRIDES)
        pin.adopt(thread_ids() - before)
        consumer.subscribe(
            [s.topic("inference")], on_assign=self._on_assign, on_revoke=self._on_revoke
        )
        last_log = time.monotonic()
        tune_gc()
        try:
            while not self._stop.is_set():
                pin.tick()
                waited = time.perf_counter()
                msgs = consumer.consume(s.shadow_batch_size, s.shadow_batch_ms / 1000)
                if msgs:
                    self.stats.record_timing("consume_ms", (time.perf_counter() - waited) * 1000)
                self._handle(consumer, msgs)
                if time.monotonic() - last_log >= LOG_EVERY_S:
                    log.info("shadow: %s", self.stats.summary())
                    last_log = time.monotonic()
        finally:
            pin.release()
            self._settle(consumer, [], asynchronous=False)
            consumer.close()
            self.processor.close()
            log.info("shadow stopped: %s", self.stats.summary())

    def _handle(self, consumer: Any, msgs: list[Any]) -> None:
        """Score this batch, settle the previous one, then publish this one.

        The previous batch's acknowledgements arrive while this one is consumed and
        scored, so the flush in :meth:`_settle` rarely waits.
        """
        consumed_at = int(time.time() * 1000)
        batch = []
        for m in msgs:
            if m.error() is not None:
                log.warning("consumer: %s", m.error())
                continue
            ts_type, ts = m.timestamp()
            batch.append(Raw(m.topic(), m.partition(), m.offset(), m.key(), m.value(),
                             ts if ts_type else None))
        scored = None
        if batch:
            started = time.perf_counter()
            scored = self.processor.score(batch, consumed_at)
            self.stats.record_timing("score_ms", (time.perf_counter() - started) * 1000)
        if not self._settle(consumer, batch, asynchronous=True) or scored is None:
            return
        self._publisher.produce_many(self.settings.topic("predictions"), scored.predictions)
        self._publisher.produce_many(self.settings.topic("deadletter"), scored.dead_letters)
        self._inflight = batch
        self._produced_at = time.perf_counter()

    def _settle(self, consumer: Any, upcoming: list[Raw], asynchronous: bool) -> bool:
        """Flush the batch in flight and commit its offsets. False if its delivery failed:
        then it and ``upcoming`` (scored, not yet published) are rewound to be scored again.
        """
        from confluent_kafka import KafkaException

        inflight, self._inflight = self._inflight, []
        if inflight:
            try:
                self._publisher.flush_sync()
            except DeliveryError as exc:
                self._rewind(consumer, inflight + upcoming, exc)
                return False
            self.stats.record_timing("publish_ms", (time.perf_counter() - self._produced_at) * 1000)
            for raw in inflight:
                self._published[(raw.topic, raw.partition)] = raw.offset + 1
        try:
            self._commit(consumer, asynchronous)
        except KafkaException as exc:  # the next owner replays from the last commit
            log.warning("commit failed (those events will be scored again): %s", exc)
        return True

    def _rewind(self, consumer: Any, batch: list[Raw], exc: Exception) -> None:
        from confluent_kafka import KafkaException, TopicPartition

        self.stats.delivery_retries += 1
        log.error("publishing a batch failed, scoring it again: %s", exc)
        first: dict[tuple[str, int], int] = {}
        for raw in batch:
            key = (raw.topic, raw.partition)
            first[key] = min(first.get(key, raw.offset), raw.offset)
        for (topic, partition), offset in first.items():
            # A partition no longer ours is skipped: its next owner starts at the commit.
            with contextlib.suppress(KafkaException):
                consumer.seek(TopicPartition(topic, partition, offset))
        time.sleep(1.0)

    def _commit(self, consumer: Any, asynchronous: bool) -> None:
        from confluent_kafka import TopicPartition

        if not self._published:
            return
        offsets = [TopicPartition(t, p, o) for (t, p), o in self._published.items()]
        consumer.commit(offsets=offsets, asynchronous=asynchronous)
        self._published.clear()
        self.stats.commits += 1

    def _on_assign(self, consumer: Any, partitions: list[Any]) -> None:
        self.stats.assigned = sorted(self.stats.assigned + [p.partition for p in partitions])
        log.info("shadow: assigned partitions %s", self.stats.assigned)

    def _on_revoke(self, consumer: Any, partitions: list[Any]) -> None:
        gone = {p.partition for p in partitions}
        self.stats.assigned = [p for p in self.stats.assigned if p not in gone]
        self._settle(consumer, [], asynchronous=False)
