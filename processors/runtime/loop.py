"""The one batch loop of the workers: consume a micro-batch -> process -> publish -> flush ->
commit.

At-least-once, the same for every processor: a batch's offsets are committed only after
everything it produced (outputs, dead letters) is acknowledged by the broker and the
processor's own after-flush step (:meth:`Handler.settled`, the monitor's checkpoint) is done.

* **Overlap** (the shadow worker, the joiner): batch k is produced, batch k+1 is processed
  while k's acknowledgements travel, then k is flushed and committed before k+1 is produced.
  Without overlap (the monitor) each batch is settled before :meth:`BatchLoop.step` returns.
* **Failed delivery**: the loop rewinds to the batch it holds, produces its outputs again
  and flushes, with :func:`~.retry.retry`'s backoff, never committing meanwhile; a stop ends
  the retrying, the batch stays uncommitted and is replayed after the restart.
* **Transient processing errors** (``Handler.transient``: the joiner's Redis) retry the
  batch the same way; any other error propagates (the worker stops: see :mod:`.thread`).
* **Held settling** (the partitioned monitor's series stage): a handler whose after-flush
  step is costly may hold delivered batches (:meth:`Handler.settle_due`) and settle them
  together later; their offsets wait with them, so a crash replays them against the
  last settled state. A rebalance and the stop always settle.
* **Revoke**: a rebalance (inside ``consume``, on the loop's thread) first settles and
  commits the batch in flight, so the partitions' next owner starts after it.

The shadow worker and the joiner run :meth:`BatchLoop.run` on a thread with a
:class:`KafkaSource`. The monitor is a Faust agent: it hands each batch to
:meth:`BatchLoop.step` (without overlap, no source) and acks it once that returns.

>>> class Upper(Handler):
...     def process(self, batch):
...         return [("out", [(m.key, m.value.upper()) for m in batch])]
>>> class Wire:  # a publisher that keeps what it is given
...     def __init__(self): self.sent, self.queued = [], []
...     def produce_many(self, topic, pairs): self.queued += [(topic, *p) for p in pairs]
...     def flush_sync(self): self.sent += self.queued; self.queued = []
>>> wire = Wire()
>>> loop = BatchLoop(Upper(), lambda: wire, overlap=False)
>>> loop.step([Message(b"a", b"k", "in", 0, 41)])
>>> wire.sent, loop.positions
([('out', b'k', b'A')], {('in', 0): 42})
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from shadowpipe import kafka
from shadowpipe.config import Settings
from shadowpipe.processors.publisher import DeliveryError, Publisher
from shadowpipe.processors.runtime.message import Message, from_kafka
from shadowpipe.processors.runtime.retry import Stopped, pause_until, retry

log = logging.getLogger("shadowpipe.runtime")
# (topic, [(key, value), ...]) per output topic of a batch
Outputs = Sequence[tuple[str, Sequence[tuple[Any, bytes]]]]
Offsets = dict[tuple[str, int], int]  # (topic, partition) -> next offset
HIGHWATER_S = 1.0  # how often the loop refreshes the watermarks /metrics reads


def produce(publisher: Publisher, outputs: Outputs) -> None:
    """Queue ``outputs`` (confirm with ``publisher.flush_sync`` or :func:`deliver`)."""
    for topic, pairs in outputs:
        if pairs:
            publisher.produce_many(topic, pairs)


def deliver(publisher: Publisher, outputs: Outputs, pause: Callable[[float], None], *,
            produced: bool = False, on_error: Callable[[BaseException], None] | None = None,
            what: str = "Kafka delivery") -> None:
    """Produce ``outputs`` (unless already ``produced``) and flush until the broker
    acknowledged them all; after a failed delivery the whole of them again, with
    :func:`~.retry.retry`'s backoff (``pause`` raises :class:`~.retry.Stopped` to give up)."""
    attempts = [int(not produced)]

    def attempt() -> None:
        if attempts[0]:
            produce(publisher, outputs)
        attempts[0] += 1
        publisher.flush_sync()

    retry(attempt, what, errors=(DeliveryError,), pause=pause, on_error=on_error, logger=log)


class Handler:
    """What a processor plugs into :class:`BatchLoop`; every hook but :meth:`process` is
    optional."""

    name = "worker"
    # Errors of ``process`` that a retry can cure (Redis away): the batch is processed again.
    transient: tuple[type[BaseException], ...] = ()

    def process(self, batch: list[Message]) -> Outputs:
        """The outputs of a non-empty batch, by topic (possibly none)."""
        raise NotImplementedError

    def settled(self, batch: list[Message]) -> None:
        """The broker acknowledged ``batch``'s outputs; its offsets are committed next."""

    def settle_due(self) -> bool:
        """Settle now? A handler whose :meth:`settled` step is costly (a checkpoint) may
        say no: the delivered batches are held and settled together, with their offsets,
        at the next step it says yes, at a rebalance or at the stop."""
        return True

    def retried(self, what: str, exc: BaseException) -> None:
        """A retry of the loop (``what`` failed with ``exc``): count it."""

    def starting(self) -> None:
        """On the loop's thread, before its Kafka clients are made."""

    def started(self) -> None:
        """On the loop's thread, once its Kafka clients are made."""

    def tick(self) -> None:
        """On the loop's thread, once per consume."""

    def closing(self) -> None:
        """On the loop's thread at a graceful stop: the last batch is settled and the
        consumer still owns its partitions (outputs go through :meth:`BatchLoop.deliver`)."""

    def stopped(self) -> None:
        """On the loop's thread, at its end."""

    def assigned(self, partitions: list[tuple[str, int]]) -> None:
        """The (topic, partition) pairs this consumer owns now."""


class KafkaSource:
    """Micro-batches from a librdkafka consumer of group ``group``; commits offsets."""

    def __init__(self, settings: Settings, group: str, topics: Iterable[str], batch_size: int,
                 wait_s: float, **overrides: Any) -> None:
        self.settings, self.group, self.topics = settings, group, list(topics)
        self.batch_size, self.wait_s, self.overrides = batch_size, wait_s, overrides
        self.consumer: Any = None
        self.assigned: list[tuple[str, int]] = []
        # High watermark per partition, refreshed on the loop's thread: other threads
        # (``/metrics``) read this dict and never call the consumer (a call from the web
        # thread waited for the loop's consume() and blocked the event loop for seconds).
        self.highwater: dict[tuple[str, int], int] = {}
        self._highwater_at = 0.0

    def open(self, on_assign: Callable[[], None], on_revoke: Callable[[], None]) -> None:
        def assign(_consumer: Any, partitions: list[Any]) -> None:
            self.assigned = sorted({*self.assigned, *((p.topic, p.partition)
                                                     for p in partitions)})
            on_assign()

        def revoke(_consumer: Any, partitions: list[Any]) -> None:
            on_revoke()  # first: the batch in flight is still ours to commit
            gone = {(p.topic, p.partition) for p in partitions}
            self.assigned = [tp for tp in self.assigned if tp not in gone]
            on_assign()

        self.consumer = kafka.consumer(self.settings, self.group, **self.overrides)
        self.consumer.subscribe(self.topics, on_assign=assign, on_revoke=revoke)

    def poll(self) -> list[Message]:
        batch, errors = from_kafka(self.consumer.consume(self.batch_size, self.wait_s))
        for error in errors:
            log.warning("%s consumer: %s", self.group, error)
        if time.monotonic() - self._highwater_at >= HIGHWATER_S:
            self._refresh_highwater()
        return batch

    def _refresh_highwater(self) -> None:
        """librdkafka's cached watermarks of the assigned partitions (no broker call)."""
        from confluent_kafka import TopicPartition

        self._highwater_at = time.monotonic()
        fresh = {}
        for topic, partition in self.assigned:
            try:
                _low, high = self.consumer.get_watermark_offsets(
                    TopicPartition(topic, partition), cached=True)
            except Exception:  # noqa: BLE001 - not fetched yet: unknown, not zero
                continue
            if high >= 0:
                fresh[(topic, partition)] = high
        self.highwater = fresh

    def commit(self, offsets: Offsets, asynchronous: bool) -> None:
        from confluent_kafka import KafkaException, TopicPartition

        try:
            self.consumer.commit(offsets=[TopicPartition(t, p, o) for (t, p), o in
                                          offsets.items()], asynchronous=asynchronous)
        except KafkaException as exc:  # e.g. partitions moved: their next owner replays
            log.warning("%s commit failed (the batch will be replayed): %s", self.group, exc)

    def close(self) -> None:
        if self.consumer is not None:
            self.consumer.close()


class BatchLoop:
    """Run ``handler`` over micro-batches with the at-least-once order of the module doc.

    ``publisher`` makes the producer (on the loop's thread, at :meth:`run`, or at the first
    :meth:`step`); ``pause`` is the retries' wait (default: until :meth:`stop`), raising
    :class:`~.retry.Stopped` to give up; ``timing(step, ms)`` receives ``consume_ms`` and
    ``publish_ms`` (produced until acknowledged).
    """

    def __init__(self, handler: Handler, publisher: Callable[[], Publisher],
                 source: KafkaSource | None = None, *, overlap: bool = True,
                 pause: Callable[[float], None] | None = None,
                 timing: Callable[[str, float], None] | None = None) -> None:
        self.handler, self.source, self.overlap = handler, source, overlap
        self._make_publisher = publisher
        self.publisher: Any = None
        self._stop = threading.Event()
        self.pause = pause or pause_until(self._stop)
        self.timing = timing or (lambda step, ms: None)
        self.positions: Offsets = {}  # next offset per partition, committed (or acked)
        self.started = False  # consuming
        self.retrying: str | None = None  # what a retry is waiting for, if any
        self.batch_started: float | None = None  # monotonic start of the step running
        self._inflight: tuple[list[Message], Outputs, float] | None = None
        self._held: list[Message] = []  # delivered, not settled yet (Handler.settle_due)

    # -- the threaded driver -------------------------------------------------------------

    def stop(self) -> None:
        self._stop.set()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def run(self) -> None:
        """Consume and step until :meth:`stop`; then settle what was published."""
        h, source = self.handler, self.source
        assert source is not None, "run() needs a source; the monitor calls step()"
        h.starting()
        source.open(lambda: h.assigned(source.assigned), self._on_revoke)
        self.publisher = self._make_publisher()
        h.started()
        self.started = True
        try:
            while not self._stop.is_set():
                h.tick()
                waited = time.perf_counter()
                batch = source.poll()
                if batch:
                    self.timing("consume_ms", (time.perf_counter() - waited) * 1000)
                self.step(batch)
            self.settle(asynchronous=False, force=True)
            h.closing()
        except Stopped:
            log.warning("%s stopped while retrying %s: the batch in flight is replayed "
                        "from the last commit", h.name, self.retrying)
        finally:
            self.started = False
            source.close()
            h.stopped()

    def _on_revoke(self) -> None:
        # before the partitions' next owner reads our commit
        self.settle(asynchronous=False, force=True)

    # -- one batch -------------------------------------------------------------------------

    def step(self, batch: list[Message]) -> None:
        """Process ``batch``, settle the batch before it, produce this one; without overlap
        settle it too (a batch with no outputs is still committed)."""
        self.batch_started = time.monotonic()
        try:
            outputs = self._process(batch) if batch else None
            self.settle()
            if outputs is None:
                return
            produce(self._producer(), outputs)
            self._inflight = (batch, outputs, time.perf_counter())
            if not self.overlap:
                self.settle()
        finally:
            self.batch_started = None

    def settle(self, asynchronous: bool = True, force: bool = False) -> None:
        """Flush the batch in flight (producing it again until the broker has it all),
        then, unless the handler holds it (:meth:`Handler.settle_due`, overridden by
        ``force``), :meth:`Handler.settled` and the commit of every delivered batch."""
        if self._inflight is not None:
            batch, outputs, produced_at = self._inflight
            self._deliver(outputs, produced=True)
            self._inflight = None
            self.timing("publish_ms", (time.perf_counter() - produced_at) * 1000)
            self._held += batch
        if not self._held or not (force or self.handler.settle_due()):
            return
        held, self._held = self._held, []
        self.handler.settled(held)
        self._commit(held, asynchronous)

    def deliver(self, outputs: Outputs) -> None:
        """Produce ``outputs`` and flush until the broker acknowledged them all (outside a
        batch: the monitor's window closes)."""
        self._deliver(outputs, produced=False)

    def _process(self, batch: list[Message]) -> Outputs:
        return self._retry(lambda: self.handler.process(batch), "processing a batch",
                           self.handler.transient)

    def _producer(self) -> Publisher:
        if self.publisher is None:
            self.publisher = self._make_publisher()
        return self.publisher

    def _deliver(self, outputs: Outputs, produced: bool) -> None:
        what = "Kafka delivery"
        deliver(self._producer(), outputs, self.pause, produced=produced,
                on_error=lambda exc: self._failed(what, exc), what=f"{self.handler.name}: {what}")
        self.retrying = None

    def _retry(self, fn: Callable[[], Any], what: str,
               errors: tuple[type[BaseException], ...]) -> Any:
        value = retry(fn, f"{self.handler.name}: {what}", errors=errors, pause=self.pause,
                      on_error=lambda exc: self._failed(what, exc), logger=log)
        self.retrying = None
        return value

    def _failed(self, what: str, exc: BaseException) -> None:
        self.retrying = what
        self.handler.retried(what, exc)

    def _commit(self, batch: list[Message], asynchronous: bool) -> None:
        nxt: Offsets = {}
        for m in batch:  # a partition's messages come in offset order
            nxt[(m.topic, m.partition)] = m.offset + 1
        self.positions.update(nxt)
        if self.source is not None and nxt:
            self.source.commit(nxt, asynchronous)
