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
commits the batch in flight. A failed delivery publishes the batch's outputs again
(duplicates, never gaps). That order is the workers' one batch loop
(:class:`~shadowpipe.processors.runtime.loop.BatchLoop`); this module plugs the scoring
into it. Consumers share the group ``<topic_prefix>shadow``, so ``worker shadow`` replicas
split the partitions.
"""

from __future__ import annotations

import gc
import logging
import time
from typing import Any

from shadowpipe.config import Settings
from shadowpipe.processors.publisher import Publisher
from shadowpipe.processors.runtime.loop import (
    HIGHWATER_S,
    BatchLoop,
    Handler,
    KafkaSource,
    Outputs,
)
from shadowpipe.processors.runtime.message import Message, from_kafka
from shadowpipe.processors.shadow.affinity import LoopPin, thread_ids
from shadowpipe.processors.shadow.core import ShadowProcessor, Started

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


class LookaheadSource(KafkaSource):
    """A KafkaSource that can take the next batch ahead, without waiting.

    :meth:`peek` returns the next batch if librdkafka already fetched a full one, and
    :meth:`poll` hands that same batch to the loop next, so offsets and commits stay the
    loop's: a batch taken ahead and not yet processed is not committed (a stop replays
    it). Fewer messages than a batch are kept for the next poll, which fills them up as
    usual (no smaller batches, so no more requests to a model server, than without
    lookahead). A rebalance runs inside a consume: the batch being processed when one
    happens in :meth:`peek` is published and committed after it (its commit may fail:
    duplicates, never gaps).
    """

    _ahead: list[Message] | None = None

    def peek(self) -> list[Message]:
        ahead = self._ahead = self._ahead or []
        if len(ahead) < self.batch_size:
            ahead += self._take(self.batch_size - len(ahead), 0)
        return ahead if len(ahead) >= self.batch_size else []

    def poll(self) -> list[Message]:
        batch, self._ahead = self._ahead or [], None
        if len(batch) < self.batch_size:
            batch += self._take(self.batch_size - len(batch), self.wait_s)
        if time.monotonic() - self._highwater_at >= HIGHWATER_S:
            self._refresh_highwater()
        return batch

    def _take(self, n: int, wait_s: float) -> list[Message]:
        batch, errors = from_kafka(self.consumer.consume(n, wait_s))
        for error in errors:
            log.warning("%s consumer: %s", self.group, error)
        return batch


class ShadowHandler(Handler):
    """The shadow worker in the batch loop: score, and pin the loop to its CPU."""

    name = "shadow"

    def __init__(self, settings: Settings, processor: ShadowProcessor,
                 source: LookaheadSource | None = None) -> None:
        self.settings = settings
        self.processor = processor
        self.source = source
        self._ahead: Started | None = None  # the next batch, started before this one ended
        self.stats = processor.stats
        self.topics = (settings.topic("predictions"), settings.topic("deadletter"))
        self.pin = LoopPin(enabled=settings.shadow_cpu_pinning == "auto")
        self._threads: set[int] = set()
        self._last_log = time.monotonic()

    def process(self, batch: list[Message]) -> Outputs:
        began = time.perf_counter()
        ahead, self._ahead = self._ahead, None
        proc = self.processor
        started = (ahead if ahead is not None and ahead.batch is batch
                   else proc.start(batch, int(time.time() * 1000)))
        if self.source is not None and proc.pipelined:
            # The next batch, if already fetched, goes to the pipelined challengers now:
            # the server works on it while this one is collected, encoded and published.
            nxt = self.source.peek()
            if nxt:
                self._ahead = proc.start(nxt, int(time.time() * 1000), ahead=True)
        scored = proc.finish(started)
        self.stats.record_timing("score_ms", (time.perf_counter() - began) * 1000)
        return ((self.topics[0], scored.predictions), (self.topics[1], scored.dead_letters))

    def settled(self, batch: list[Message]) -> None:
        self.stats.commits += 1

    def retried(self, what: str, exc: BaseException) -> None:
        self.stats.delivery_retries += 1

    def starting(self) -> None:
        self.pin.pin()  # before the clients: their threads inherit the CPU
        self._threads = thread_ids()

    def started(self) -> None:
        self.pin.adopt(thread_ids() - self._threads)
        tune_gc()

    def tick(self) -> None:
        self.pin.tick()
        if time.monotonic() - self._last_log >= LOG_EVERY_S:
            log.info("shadow: %s", self.stats.summary())
            self._last_log = time.monotonic()

    def stopped(self) -> None:
        self.pin.release()
        self.processor.close()
        log.info("shadow stopped: %s", self.stats.summary())

    def assigned(self, partitions: list[tuple[str, int]]) -> None:
        self.stats.assigned = sorted(p for _t, p in partitions)
        log.info("shadow: assigned partitions %s", self.stats.assigned)


def shadow_loop(settings: Settings, processor: ShadowProcessor) -> BatchLoop:
    """The scoring loop over ``settings.topic("inference")`` (run it on a thread)."""
    s = settings
    source = LookaheadSource(s, group_id(s), [s.topic("inference")], s.shadow_batch_size,
                             s.shadow_batch_ms / 1000, **CONSUMER_OVERRIDES)
    return BatchLoop(ShadowHandler(s, processor, source),
                     lambda: Publisher(s, **PRODUCER_OVERRIDES),
                     source, timing=processor.stats.record_timing)
