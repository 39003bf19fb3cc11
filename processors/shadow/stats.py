"""Worker counters: per challenger, per batch, and queue lag; a JSON-able snapshot.

Written by the scoring thread, read by the web view and the periodic log line: the
collections are copied under a lock (a deque must not change while it is copied); plain
counters are read as they are, a snapshot tolerates a batch in progress.

>>> stats = Stats(["lr"])
>>> stats.record_batch(3, [10.0, 20.0, 30.0])
>>> stats.challengers["lr"].add(ok=2, errors=1, timeouts=0, skipped=0)
>>> snap = stats.snapshot()
>>> snap["consumed"], snap["challengers"]["lr"]["scored"], snap["queue_lag_ms"]["max"]
(3, 2, 30.0)
"""

from __future__ import annotations

import threading
import time
from collections import Counter, deque
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from shadowpipe.processors.runtime.metrics import Buckets

LAG_WINDOW = 20_000  # recent records the lag percentiles are computed over


@dataclass
class ChallengerCounters:
    """What happened to the records routed to one challenger."""

    scored: int = 0  # a prediction without error
    errors: int = 0  # exception or invalid output
    timeouts: int = 0
    skipped: int = 0  # not in this challenger's sample

    def add(self, ok: int, errors: int, timeouts: int, skipped: int) -> None:
        self.scored += ok
        self.errors += errors
        self.timeouts += timeouts
        self.skipped += skipped


def percentile(sorted_values: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile of an ascending sequence (None when empty)."""
    if not sorted_values:
        return None
    rank = min(len(sorted_values) - 1, max(0, round(q * len(sorted_values)) - 1))
    return sorted_values[rank]


def _summary(values: Sequence[float]) -> dict[str, float | None]:
    return {"p50": percentile(values, 0.5), "p99": percentile(values, 0.99),
            "max": values[-1] if values else None}


class Stats:
    """Counters of one shadow worker."""

    def __init__(self, challengers: Iterable[str]) -> None:
        self.started = time.time()
        self.challengers = {name: ChallengerCounters() for name in challengers}
        # One observation per challenger call on a micro-batch, not per event: cheap.
        self.model_seconds = {name: Buckets() for name in self.challengers}
        self.consumed = 0
        self.batches = 0
        self.max_batch = 0
        self.last_batch = 0
        self.dead_letters: Counter[str] = Counter()
        self.outputs = 0
        self.commits = 0
        self.delivery_retries = 0
        self.assigned: list[int] = []  # partitions of the inference topic this worker owns
        self._lock = threading.Lock()
        self._lags: deque[float] = deque(maxlen=LAG_WINDOW)
        self._timings: dict[str, deque[float]] = {
            step: deque(maxlen=1000) for step in ("consume_ms", "score_ms", "publish_ms")
        }

    def count_dead_letter(self, kind: str) -> None:
        with self._lock:
            self.dead_letters[kind] += 1

    def record_timing(self, step: str, ms: float) -> None:
        """Duration of a batch's ``consume_ms`` (waiting for it), ``score_ms``, or
        ``publish_ms`` (produced until acknowledged; overlaps scoring the next batch)."""
        with self._lock:
            self._timings[step].append(ms)

    def record_batch(self, size: int, lags: Iterable[float]) -> None:
        self.consumed += size
        self.batches += 1
        self.last_batch = size
        self.max_batch = max(self.max_batch, size)
        with self._lock:
            self._lags.extend(lags)

    def snapshot(self) -> dict[str, Any]:
        """Everything, JSON-serialisable."""
        with self._lock:  # copied under the lock, sorted outside: the loop never waits
            lags = list(self._lags)
            timings = {step: list(v) for step, v in self._timings.items()}
            dead = dict(self.dead_letters)
        lags.sort()
        for values in timings.values():
            values.sort()
        uptime = max(time.time() - self.started, 1e-9)
        return {
            "uptime_s": round(uptime, 3),
            "assigned_partitions": self.assigned,
            "consumed": self.consumed,
            "events_per_s": round(self.consumed / uptime, 1),
            "outputs": self.outputs,
            "commits": self.commits,
            "delivery_retries": self.delivery_retries,
            "dead_letters": {"total": sum(dead.values()), **dead},
            "batches": {
                "count": self.batches, "last": self.last_batch, "max": self.max_batch,
                "mean": round(self.consumed / self.batches, 1) if self.batches else None,
            },
            "queue_lag_ms": {
                "window": len(lags), "p50": percentile(lags, 0.5),
                "p99": percentile(lags, 0.99), "max": lags[-1] if lags else None,
            },
            "challengers": {name: asdict(c) for name, c in self.challengers.items()},
            "model_seconds": {name: b.snapshot() for name, b in self.model_seconds.items()},
            **{step: _summary(v) for step, v in timings.items()},
        }

    def summary(self) -> str:
        """One log line."""
        snap = self.snapshot()
        per = " ".join(
            f"{n}[ok={c['scored']} err={c['errors']} timeout={c['timeouts']}]"
            for n, c in snap["challengers"].items()
        )
        return (
            f"consumed={snap['consumed']} ({snap['events_per_s']}/s) "
            f"batches={snap['batches']['count']} mean_batch={snap['batches']['mean']} "
            f"lag_p99_ms={snap['queue_lag_ms']['p99']} "
            f"dead_letters={snap['dead_letters']['total']} {per}"
        )
