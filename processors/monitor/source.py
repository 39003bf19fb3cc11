"""The monitor's consumer: micro-batches that merge the joined topic's partitions in
timestamp order.

The monitor keeps one watermark, the largest event time it has seen, and counts a record
whose window closed before it as late. librdkafka hands over what a fetch returned, one
partition's run after another (a backlog comes as one run per partition): taken as they
come, a run of partition 0 would move the watermark past the minutes that partitions 1-3
still hold. So the messages read are held per partition, and a batch takes them in the
order of their timestamps (the joiner stamps a record when it emits it), each partition's
in offset order, and stops before passing a partition that has nothing held and is not
known to be read to its end (``waiting``; librdkafka's end-of-partition event says so):
the merge never runs ahead of a partition that has data, for at most :data:`BLOCK_S` (a
partition whose next run does not come, e.g. a lost leader, must not stop the others).
(Faust, which the monitor consumed through before, round-robined partitions per message.)

>>> from shadowpipe.processors.runtime.message import Message
>>> def held():  # partition 0: a (t=10), c (t=30); partition 1: b (t=20)
...     return {("j", p): deque(Message(v, None, "j", p, i, t) for i, (v, t) in enumerate(ms))
...             for p, ms in ((0, [(b"a", 10), (b"c", 30)]), (1, [(b"b", 20)]))}
>>> [m.value for m in merge(held(), 10, waiting=set())]
[b'a', b'b', b'c']
>>> [m.value for m in merge(held(), 10, waiting={("j", 1)})]  # partition 1 has more unread
[b'a', b'b']
"""

from __future__ import annotations

import heapq
import logging
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from shadowpipe.processors.runtime.loop import HIGHWATER_S, KafkaSource
from shadowpipe.processors.runtime.message import Message, from_kafka

log = logging.getLogger(__name__)
Key = tuple[str, int]
HOLD_BATCHES = 4  # messages held at most: this many batches
READ_AHEAD = 8  # extra reads (without waiting) per poll to find the partitions' next runs
BLOCK_S = 1.0  # how long a merge may wait for a partition's next run


def merge(held: dict[Key, deque[Message]], limit: int, waiting: set[Key]) -> list[Message]:
    """Up to ``limit`` held messages in timestamp order (taken out of ``held``), stopping
    once a partition in ``waiting`` (more messages on the broker) has none held."""
    if any(not held.get(key) for key in waiting):
        return []
    heap = [(q[0].timestamp or 0, key, q) for key, q in held.items() if q]
    heapq.heapify(heap)
    out: list[Message] = []
    while heap and len(out) < limit:
        _ts, key, q = heap[0]
        out.append(q.popleft())
        if q:
            heapq.heapreplace(heap, (q[0].timestamp or 0, key, q))
        elif key in waiting:
            break
        else:
            heapq.heappop(heap)
    return out


class MergedSource(KafkaSource):
    """A :class:`KafkaSource` whose :meth:`poll` returns :func:`merge`'s batches; a
    partition is ``waiting`` from its assignment or a message read until librdkafka says
    it reached the end of the partition (``enable.partition.eof``)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **{**kwargs, "enable.partition.eof": True})
        self.held: dict[Key, deque[Message]] = {}
        self.ended: set[Key] = set()  # read to the end (nothing more on the broker)
        self._blocked_since: float | None = None

    def open(self, on_assign: Callable[[], None], on_revoke: Callable[[], None]) -> None:
        def assigned() -> None:
            # A revoked partition is read again from its committed offset by whoever owns
            # it next (this consumer too): what was held of it goes.
            for key in [k for k in self.held if k not in self.assigned]:
                del self.held[key]
            self.ended &= set(self.assigned)
            on_assign()

        super().open(assigned, on_revoke)

    def poll(self) -> list[Message]:
        self._read(self.wait_s)
        for _ in range(READ_AHEAD):
            if self._count() >= HOLD_BATCHES * self.batch_size or not self._starved():
                break
            if not self._read(0):
                break
        if time.monotonic() - self._highwater_at >= HIGHWATER_S:
            self._refresh_highwater()
        now = time.monotonic()
        patient = (self._count() < HOLD_BATCHES * self.batch_size
                   and now - (self._blocked_since or now) < BLOCK_S)
        batch = merge(self.held, self.batch_size, self._waiting() if patient else set())
        if batch or not self._count():
            self._blocked_since = None
        elif self._blocked_since is None:
            self._blocked_since = now
        return batch

    def _read(self, wait_s: float) -> int:
        """Hold what one consume returns; the number of events read."""
        from confluent_kafka import KafkaError

        events = self.consumer.consume(self.batch_size, wait_s)
        plain = []
        for event in events:
            error = event.error()
            if error is None:
                self.ended.discard((event.topic(), event.partition()))
                plain.append(event)
            elif error.code() == KafkaError._PARTITION_EOF:
                self.ended.add((event.topic(), event.partition()))
            else:
                log.warning("%s consumer: %s", self.group, error)
        messages, _errors = from_kafka(plain)
        held = self.held
        for m in messages:
            key = (m.topic, m.partition)
            q = held.get(key)
            if q is None:
                q = held[key] = deque()
            q.append(m)
        return len(events)

    def _count(self) -> int:
        return sum(len(q) for q in self.held.values())

    def _waiting(self) -> set[Key]:
        """Assigned partitions not known to be read to their end."""
        return {key for key in self.assigned if key not in self.ended}

    def _starved(self) -> bool:
        """Some partition not read to its end has nothing held."""
        return any(not self.held.get(key) for key in self._waiting())
