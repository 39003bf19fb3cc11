"""Broker acknowledgements counted from librdkafka's statistics, not from per-message calls.

The emitter asks for failure reports only (a per-message Python callback for every success
would land on the service's requests, see docs/producer.md). The count of delivered events
comes instead from the statistics librdkafka emits every ``STATS_INTERVAL_MS`` (one JSON
string, kept as is by the callback; parsed only when someone reads the count): for each
partition, ``acked_msgid`` is the highest message id the broker acknowledged. With the
idempotent producer (shadowpipe's default) message ids are 1, 2, 3... per partition and are
acknowledged in order, so ``acked_msgid`` is the number of messages of that partition that
were either acknowledged or failed before it.

Failures are known from their reports, each with its partition but not its message id, so
a failed message is subtracted from its partition's ``acked_msgid`` only once it is known
(or may be) below it: not while no message of that partition was acknowledged since the
failure (the messages purged at close, the tail of an outage), and for good once the
partition's acknowledgements passed its enqueue count (``msgs``) of the first statistics
after the failure. In between the count is conservative: ``delivered`` may lag, never run
ahead.

>>> acks = Acks()
>>> acks.snapshot('{"topics": {"t": {"partitions": {"0": {"acked_msgid": 5, "msgs": 7}, '
...               '"-1": {"acked_msgid": 0, "msgs": 2}}}}}')
>>> acks.delivered()
5
>>> acks.failed("t", 0)  # message 6 or 7 failed; nothing acknowledged since: not below
>>> acks.delivered()
5
>>> acks.snapshot('{"topics": {"t": {"partitions": {"0": {"acked_msgid": 9, "msgs": 9}}}}}')
>>> acks.delivered()  # 9 acknowledged or failed, 1 of them failed
8
"""

from __future__ import annotations

import json
import threading
from typing import Any

STATS_INTERVAL_MS = 1000  # each costs librdkafka ~0.2 ms of CPU (a ~10 KB JSON)

Partition = tuple[str, int]


class Acks:
    """Delivered-event count of one producer (thread-safe; callbacks from any thread)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._text: str | None = None
        self.seq = 0  # statistics received; close() waits for one after the last ack
        self._parsed: tuple[int, dict[Partition, tuple[int, int]]] = (0, {})
        self._in_queue = -1  # msg_cnt of the latest statistics (-1: none yet)
        # (topic, partition, acked_msgid when it failed) -> [enqueue bound or None, count]
        self._pending: dict[tuple[str, int, int], list[Any]] = {}
        self._below: dict[Partition, int] = {}
        self._unbounded = False

    def snapshot(self, text: str) -> None:
        """librdkafka's ``stats_cb``: keep the JSON (parsed only when it is read)."""
        with self._lock:
            self._text = text
            self.seq += 1
            if self._unbounded:  # failures since the last statistics: bound their ids
                current = self._current()
                for (topic, partition, _), entry in self._pending.items():
                    if entry[0] is None:
                        entry[0] = current.get((topic, partition), (0, 0))[1]
                self._unbounded = False

    def failed(self, topic: str | None, partition: int | None) -> None:
        """A failure report (no partition, or -1: never assigned, never acknowledged)."""
        if topic is None or partition is None or partition < 0:
            return
        with self._lock:
            acked = self._current().get((topic, partition), (0, 0))[0]
            entry = self._pending.setdefault((topic, partition, acked), [None, 0])
            entry[0] = None  # this failure's id may be above the bound of earlier ones
            entry[1] += 1
            self._unbounded = True

    def delivered(self) -> int:
        """Events the broker acknowledged, as of the latest statistics."""
        with self._lock:
            current = self._current()
            uncertain = 0
            for key, (bound, count) in list(self._pending.items()):
                topic, partition, before = key
                acked = current.get((topic, partition), (0, 0))[0]
                if acked <= before:
                    continue  # nothing acknowledged since it failed: above, not counted
                if bound is not None and acked >= bound:
                    self._below[topic, partition] = self._below.get((topic, partition), 0) \
                        + count
                    del self._pending[key]
                else:
                    uncertain += count  # may be below: subtracted, so never an overcount
            acked_total = sum(acked for acked, _ in current.values())
            return max(0, acked_total - sum(self._below.values()) - uncertain)

    def settled_since(self, seq: int) -> bool:
        """Statistics received after the ``seq``-th show no message in flight or queued:
        every acknowledgement of the messages produced before is in them."""
        with self._lock:
            if self.seq <= seq:
                return False
            self._current()
            return self._in_queue == 0

    def _current(self) -> dict[Partition, tuple[int, int]]:
        """(acked_msgid, msgs) per real partition of the latest statistics (cached)."""
        if self._parsed[0] != self.seq and self._text is not None:
            out: dict[Partition, tuple[int, int]] = {}
            doc = json.loads(self._text)
            self._in_queue = int(doc.get("msg_cnt", -1))
            for topic, stats in doc.get("topics", {}).items():
                for name, p in stats.get("partitions", {}).items():
                    if int(name) >= 0:
                        out[topic, int(name)] = (int(p.get("acked_msgid", 0)),
                                                 int(p.get("msgs", 0)))
            self._parsed = (self.seq, out)
        return self._parsed[1]
