"""Which facts of each (request, challenger) pair the monitor has already counted.

Redelivery (at-least-once) and re-emission (the joiner's higher versions) must never count
twice, possibly days apart (labels arrive up to ``feedback_horizon_s`` late), so an
in-memory set is not enough. The bits live in Redis hashes, one per day of the pair's
event time (``<prefix>monitor:seen:<day>``), which expire ``feedback_horizon_s`` + 2 days
after that day: after the horizon the joiner emits nothing new for the pair.

New bits are staged in memory (reads see them at once) and written in the same Redis
transaction as the monitor checkpoint (:meth:`stage`), so the counted bits and the window
state that counted them can never disagree after a crash.

>>> Deduper(None, "p.", 86400).key(3)
'p.monitor:seen:3'
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterable
from typing import Any

DAY_MS = 86_400_000


class Deduper:
    """Counted-fact bits per pair: Redis hashes by day plus a staged overlay."""

    def __init__(self, redis: Any, prefix: str, horizon_s: int) -> None:
        self.redis = redis
        self.prefix = prefix
        self.horizon_s = horizon_s
        self.staged: dict[str, tuple[int, int]] = {}  # pair -> (day, bits)

    def key(self, day: int) -> str:
        return f"{self.prefix}monitor:seen:{day}"

    def lookup(self, pairs: Iterable[tuple[str, int]]) -> dict[str, int]:
        """Bits of each (pair, event time ms); 0 for pairs never counted."""
        bits: dict[str, int] = {}
        by_day: dict[int, list[str]] = defaultdict(list)
        for pair, t in pairs:
            if pair in self.staged:
                bits[pair] = self.staged[pair][1]
            elif pair not in bits:
                bits[pair] = 0
                by_day[t // DAY_MS].append(pair)
        if by_day:
            pipe = self.redis.pipeline(transaction=False)
            days = list(by_day)
            for day in days:
                pipe.hmget(self.key(day), by_day[day])
            for day, values in zip(days, pipe.execute(), strict=True):
                for pair, value in zip(by_day[day], values, strict=True):
                    bits[pair] = int(value or 0)
        return bits

    def mark(self, pair: str, t: int, bits: int) -> None:
        self.staged[pair] = (t // DAY_MS, bits)

    def stage(self, pipe: Any) -> None:
        """Add the staged bits to a Redis (transaction) pipeline."""
        by_day: dict[int, dict[str, int]] = defaultdict(dict)
        for pair, (day, bits) in self.staged.items():
            by_day[day][pair] = bits
        for day, mapping in by_day.items():
            pipe.hset(self.key(day), mapping=mapping)
            # Old event times (a backfill) still get two days from now.
            expiry = max((day + 1) * DAY_MS // 1000 + self.horizon_s, int(time.time()))
            pipe.expireat(self.key(day), expiry + 2 * 86400)

    def committed(self) -> None:
        """The staged bits are in Redis: drop the overlay."""
        self.staged.clear()
