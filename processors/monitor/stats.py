"""Small statistics the monitor needs beyond river: a mergeable latency sketch, PSI and
confidence intervals.

River's quantile estimators are per-value objects that cannot be merged or read at several
ranks at once; windows need p50/p95/p99 of three latencies per segment at tens of thousands
of records per second, so latencies go into a log-bucket histogram (the DDSketch idea):
every value lands in bucket ``ceil(log(x) / log(GAMMA))``, so any quantile is known within
1 % relative error, and two sketches merge by adding counts.

>>> s = LogSketch()
>>> for v in range(1, 101):
...     s.add(float(v))
>>> abs(s.quantile(0.5) - 50) / 50 < 0.01, abs(s.quantile(0.99) - 99) / 99 < 0.01
(True, True)
>>> wilson(80, 100)
(0.711..., 0.866...)
>>> round(psi([10, 10, 10, 10], [10, 10, 10, 10]), 6)
0.0
"""

from __future__ import annotations

import math
from collections.abc import Sequence

GAMMA = 1.02
_LOG_GAMMA = math.log(GAMMA)
_ZERO = -(10**6)  # bucket of values <= 0 (a latency of 0 ms is legitimate)
Z95 = 1.959963984540054


def bucket(x: float) -> int:
    """The sketch bucket of ``x``."""
    return math.ceil(math.log(x) / _LOG_GAMMA) if x > 0 else _ZERO


class LogSketch:
    """Quantiles within 1 % relative error; ``merge`` adds another sketch's counts."""

    __slots__ = ("counts", "n")

    def __init__(self) -> None:
        self.counts: dict[int, int] = {}
        self.n = 0

    def add(self, x: float) -> None:
        self.add_bucket(bucket(x))

    def add_bucket(self, key: int) -> None:
        """Count a value by its precomputed :func:`bucket` (one log for many sketches)."""
        self.counts[key] = self.counts.get(key, 0) + 1
        self.n += 1

    def merge(self, other: LogSketch) -> None:
        for key, count in other.counts.items():
            self.counts[key] = self.counts.get(key, 0) + count
        self.n += other.n

    def quantile(self, q: float) -> float | None:
        """The ``q`` quantile (0..1), or None when empty."""
        if not self.n:
            return None
        rank = q * (self.n - 1)
        seen = 0
        for key in sorted(self.counts):
            seen += self.counts[key]
            if seen > rank:
                return 0.0 if key == _ZERO else 2 * GAMMA**key / (GAMMA + 1)
        return None  # unreachable: counts sum to n


def wilson(successes: int, n: int, z: float = Z95) -> tuple[float, float] | None:
    """Wilson score interval of a proportion (95 % by default); None when ``n`` is 0."""
    if n <= 0:
        return None
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (centre - half, centre + half)


def mean_ci(mean: float, stddev: float, n: int, z: float = Z95) -> tuple[float, float] | None:
    """Normal-approximation interval of a mean (e.g. MAE) from its sample stddev.

    >>> mean_ci(2.0, 1.0, 100)
    (1.804..., 2.195...)
    """
    if n <= 1 or stddev is None or math.isnan(stddev):
        return None
    half = z * stddev / math.sqrt(n)
    return (mean - half, mean + half)


def psi(reference: Sequence[float], current: Sequence[float], floor: float = 1e-4) -> float:
    """Population stability index between two histograms over the same bins (counts)."""
    ref_total, cur_total = sum(reference), sum(current)
    total = 0.0
    for r, c in zip(reference, current, strict=True):
        p = max(r / ref_total, floor)
        q = max(c / cur_total, floor)
        total += (q - p) * math.log(q / p)
    return total


def quantile_edges(values: Sequence[float], bins: int = 10) -> list[float]:
    """Inner bin edges at the reference's deciles (duplicates removed).

    >>> quantile_edges([float(v) for v in range(100)], 4)
    [25.0, 50.0, 75.0]
    """
    ordered = sorted(values)
    edges = {ordered[min(len(ordered) - 1, (len(ordered) * i) // bins)] for i in range(1, bins)}
    return sorted(edges)
