"""Staged inference events: the emit policy, and its pure-Python stage.

An emitted inference event is encoded on the caller's thread and *staged*; staged events go
to librdkafka's ``produce()`` in one burst, where it runs warmer than one call per request
(docs/producer.md, "Fourth pass"). Two parts, kept apart:

* :class:`BurstPolicy` decides: how many events make a burst, which request carries it
  (one no slower than the running mean ``latency_ms``, so that a burst does not land on the
  service's slow tail), and when a burst also serves librdkafka's reports (on one of the
  quickest fifth of requests, or every 8th burst). All of its state and constants live here.
* A stage holds the events and does what the policy says. Two stages behave the same: the
  compiled one (``FastEmit`` in ``producers/_encode.c``, which also takes the whole plain
  ``emit_inference`` call) and :class:`Stage` below, used without a C compiler. The policy
  gives a stage a trigger (``burst``, ``cap``, ``max_wait_ms``, ``carry_ms``); after each
  hand-over the stage passes the handed-over events' latencies to
  :meth:`BurstPolicy.handed_over`, which updates its estimates and answers whether reports
  are served now and the new ``carry_ms``. tests/test_producer_staging.py runs the same calls
  through both stages and compares every decision.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

# The longest a staged event waits for its burst while events keep coming (librdkafka then
# lingers up to linger.ms = 1 s anyway); when none come, the emitter's thread hands it over.
STAGE_WAIT_MS = 100


class BurstPolicy:
    """When staged events are handed to ``produce()``, and when reports are served.

    A stage hands its events over when ``cap`` are staged, when the oldest is
    ``max_wait_ms`` old, or when at least ``burst`` are staged and the call's
    ``latency_ms`` is at most ``carry_ms`` (the running mean latency, weight 1/64; no
    bound before the first burst).

    >>> policy = BurstPolicy()
    >>> policy.handed_over([2.0] * 16, carried=True)  # the carrier is not among the quickest
    (False, 2.0)
    >>> policy.handed_over([5.0], carried=False)  # the emitter's thread: always serves
    (True, 2.046875)
    """

    burst = 16
    cap = 64
    serve_after = 8  # bursts without serving reports: the next one serves them
    weight = 1 / 64  # of a new latency in the running estimates

    def __init__(self, max_wait_ms: int = STAGE_WAIT_MS) -> None:
        self.max_wait_ms = max_wait_ms
        self.carry_ms = math.inf
        self._mean_ms: float | None = None
        self._quick_ms = 0.0  # running estimate of the 20th percentile
        self._unserved = 0
        self._lock = threading.Lock()  # a compiled stage may call in from several threads

    def handed_over(self, latencies: Sequence[float], carried: bool) -> tuple[bool, float]:
        """The stage handed over events with these ``latency_ms``, in staging order; the
        last one's request carried the burst when ``carried`` (else the emitter's thread
        or close did). Returns (serve reports now, the new ``carry_ms``)."""
        with self._lock:
            if self._mean_ms is None:
                self._mean_ms = self._quick_ms = latencies[0]
                latencies = latencies[1:]
                fresh = True
            else:
                fresh = False
            mean, quick, weight = self._mean_ms, self._quick_ms, self.weight
            # Serving can cost ~250-650 us (a whole delivery batch once a second): only
            # the quickest requests carry it (compared before the carrier's own latency
            # counts). One loop with locals: it runs on the carrying request.
            serve = not carried
            last = len(latencies) - 1
            for n, latency in enumerate(latencies):
                if n == last and carried:
                    serve = latency <= quick
                # Running mean, and running 20th percentile (a stochastic approximation
                # whose step is a fraction of the estimate, so it works at any scale).
                mean += (latency - mean) * weight
                step = abs(quick) * weight
                quick += -0.8 * step if latency <= quick else 0.2 * step
            if fresh and last < 0:
                serve = not carried  # the very first latency: nothing to compare with
            self._mean_ms, self._quick_ms = mean, quick
            self._unserved += 1
            if serve or self._unserved >= self.serve_after:
                self._unserved = 0
                serve = True
            self.carry_ms = mean
            return serve, mean


class Stage:
    """The stage without the compiled encoder: the same trigger, room accounting and
    calls as ``FastEmit`` (see the module docstring), in Python.

    ``producer`` is librdkafka's (``len()`` is its queue length); ``serve()`` serves
    reports; ``refused(data, key, exc)`` gets a staged event ``produce()`` refused;
    ``sent`` is counted once per staged event. ``max_messages`` and ``max_queue_bytes`` are
    librdkafka's two queue bounds: an event is staged only when it fits in both with every
    staged event before it, every queued one taken as large as the largest staged.
    """

    full_drops = 0  # the compiled stage counts plain calls dropped for room; this one none

    def __init__(self, policy: BurstPolicy, producer: Any, topic: str,
                 serve: Callable[[], None], refused: Callable[[bytes, Any, BaseException], None],
                 sent: Any, max_messages: int, max_queue_bytes: int) -> None:
        self._policy = policy
        self._producer = producer
        self._topic = topic
        self._serve = serve
        self._refused = refused
        self._sent = sent
        self._max_messages = max_messages
        self._max_queue_bytes = max_queue_bytes
        self._events: list[tuple[bytes, Any]] = []
        self._latencies: list[float] = []
        self._staged_at_ms = 0
        self._room = 0
        self._biggest = 0
        self._lock = threading.Lock()

    @property
    def staged(self) -> int:
        """Events waiting to be handed to ``produce()``."""
        return len(self._events)

    def add(self, data: bytes, key: Any, latency_ms: float) -> bool:
        """Stage one encoded event (counted as sent); False when librdkafka's queue has no
        room for it after the staged ones. Hands the stage over when the policy's trigger
        says so."""
        policy = self._policy
        with self._lock:
            if not self._has_room(len(data) + len(key)):
                return False
            now = time.time_ns() // 1_000_000
            if not self._events:
                self._staged_at_ms = now
            self._events.append((data, key))
            self._latencies.append(latency_ms)
            self._room -= 1
            next(self._sent)
            due = (len(self._events) >= policy.cap
                   or now - self._staged_at_ms >= policy.max_wait_ms
                   or (len(self._events) >= policy.burst and latency_ms <= policy.carry_ms))
        if due:
            self._hand_over(carried=True)
        return True

    def hand_over(self) -> int:
        """Produce the staged events now (the service is quiet); returns how many."""
        return self._hand_over(carried=False)

    def close(self) -> int:
        """Hand the stage over for the last time; returns how many."""
        return self._hand_over(carried=False)

    def _hand_over(self, carried: bool) -> int:
        # Taken under the lock, produced outside it: refused() may block (producer_block_ms).
        with self._lock:
            events, latencies = self._events, self._latencies
            self._events, self._latencies = [], []
        for data, key in events:
            try:
                self._producer.produce(self._topic, data, key)
            except Exception as exc:  # counted by refused(); nothing reaches the caller
                self._refused(data, key, exc)
        if not events:
            return 0
        with self._lock:
            self._look_at_queue()
        if self._policy.handed_over(latencies, carried)[0]:
            self._serve()
        return len(events)

    def _has_room(self, size: int) -> bool:
        if size > self._biggest:
            self._biggest = size
            self._room = 0
        if self._room <= 0:
            self._look_at_queue()
        return self._room > 0

    def _look_at_queue(self) -> None:
        waiting = len(self._producer) + len(self._events)
        size = self._biggest or 1
        self._room = min(self._max_messages - waiting,
                         self._max_queue_bytes // size - waiting)
