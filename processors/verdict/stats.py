"""Anytime-valid statistics of the verdict engine: pure functions of aggregates, no I/O.

Every interval here is a *confidence sequence*: it covers the true mean at every sample
size at once with probability >= 1 - alpha, so a verdict may be re-evaluated as often as
people like. The formulas and their simulated error rates are in docs/verdict.md and
/work/notes/verdict-notes.md (A: asymptotic CS, C: discordant-pair e-values, E: e-BH,
F: ETA, G: Kaplan-Meier maturity); the betting CS is the diversified-Kelly mixture of
Waudby-Smith & Ramdas, which depends on the data only through a histogram.

A paired accuracy comparison: 5,000 labelled pairs, the challenger alone wrong on 70,
alone right on 60 (d = loss_challenger - loss_primary is +1, -1 or 0):

>>> n, losses, wins = 5000, 70, 60
>>> cs = asymptotic_cs(n, losses - wins, losses + wins, alpha=0.05)
>>> round(cs.estimate, 4), cs.lo < 0 < cs.hi, cs.hi < 0.01  # within a 1-point margin
(0.002, True, True)
>>> guard_met(n, losses + wins, sample_variance(n, losses - wins, losses + wins))
True
>>> discordant_log_evalue(wins, losses) < math.log(1 / 0.05)  # not yet evidence of harm
True
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple, TypeAlias

import numpy as np
from scipy.special import betainc, betaln

ArrayLike: TypeAlias = "float | int | np.ndarray"
Numeric: TypeAlias = "float | np.ndarray"

# ln of the smallest positive double: an e-value below it is reported as this.
_LOG_TINY = -745.0
# The betting mixture: equal weights on constant bets lambda = c/m * g, g geometric in
# [0.01, 1], c = 0.9 (each factor stays >= 0.1). Twelve bets cost ln 12 = 2.5 nats against
# the best single bet; the ratio 1.52 between neighbours loses under 8 % of its log-capital.
# Low-variance differences (Brier, clipped log-loss) want the largest bet, hence c = 0.9
# rather than the notes' 1/2: on a Brier-like stream the median pairs to a verdict fell from
# 600 to 400 (notes formula B, which may stop at any pair: 300).
_BET_C = 0.9
_BET_GRID = np.geomspace(0.01, 1.0, 12)


class Interval(NamedTuple):
    """A point estimate and the bounds of its confidence sequence."""

    estimate: float
    lo: float
    hi: float


def sample_variance(n: ArrayLike, s1: ArrayLike, s2: ArrayLike) -> Numeric:
    """Unbiased variance from ``n``, the sum ``s1`` and the sum of squares ``s2`` (0 when n < 2).

    Works elementwise on arrays too (one value per simulated run).

    >>> sample_variance(4, 2.0, 2.0)  # d = 1, 1, 0, 0
    0.333...
    """
    n_, s1_, s2_ = (np.asarray(v, dtype=float) for v in (n, s1, s2))
    with np.errstate(divide="ignore", invalid="ignore"):
        var = (s2_ - s1_ * s1_ / n_) / (n_ - 1)
    return _out(np.where(n_ >= 2, np.maximum(var, 0.0), 0.0))


def _out(x: np.ndarray) -> Numeric:
    return float(x) if x.ndim == 0 else x


def _rho2(alpha: float, n_tune: int) -> float:
    log_a = math.log(alpha)
    return (-2 * log_a + math.log(1 - 2 * log_a)) / n_tune


def half_width(n: ArrayLike, variance: ArrayLike, alpha: float, n_tune: int = 10_000) -> Numeric:
    """Half-width of the two-sided asymptotic CS at ``n`` pairs (formula A); 0 when n < 2.

    ``n_tune`` is where the sequence is tightest; at n = n_tune the width is ~1.7x Wald's.
    Works elementwise on arrays too.

    >>> round(half_width(10_000, 0.04, 0.05), 5)
    0.00607
    """
    n_ = np.asarray(n, dtype=float)
    var = np.asarray(variance, dtype=float)
    rho2 = _rho2(alpha, n_tune)
    with np.errstate(divide="ignore", invalid="ignore"):
        factor = 2 * (n_ * rho2 + 1) / (n_ * n_ * rho2) * np.log(np.sqrt(n_ * rho2 + 1) / alpha)
        hw = np.sqrt(np.maximum(var, 0.0) * factor)
    return _out(np.where((n_ >= 2) & (var > 0), hw, 0.0))


def asymptotic_cs(n: int, s1: float, s2: float, alpha: float, n_tune: int = 10_000) -> Interval:
    """Asymptotic confidence sequence (Waudby-Smith et al. 2024) on the mean of d.

    ``s1`` is the sum of d, ``s2`` the sum of d squared. The half-width is 0 when n < 2 or
    the variance is 0 (every pair tied): it is then no evidence at all, and the caller must
    HOLD (:func:`guard_met` says when the CS may be acted on).

    >>> asymptotic_cs(10_000, 100, 400, 0.05)
    Interval(estimate=0.01, lo=0.00393..., hi=0.0160...)
    >>> asymptotic_cs(0, 0, 0, 0.05)
    Interval(estimate=0.0, lo=0.0, hi=0.0)
    """
    if n <= 0:
        return Interval(0.0, 0.0, 0.0)
    mean = s1 / n
    hw = float(half_width(n, sample_variance(n, s1, s2), alpha, n_tune))
    return Interval(mean, mean - hw, mean + hw)


def guard_met(
    n: int, discordant: int, variance: float, min_pairs: int = 1000, min_discordant: int = 10
) -> bool:
    """Whether formula A's CS may decide: enough pairs, discordant pairs and variance.

    Without this guard a worse challenger was PROMOTEd in up to 30 % of simulated runs.

    >>> guard_met(1000, 10, 0.01), guard_met(999, 50, 0.01), guard_met(5000, 9, 0.01)
    (True, False, False)
    """
    return n >= min_pairs and discordant >= min_discordant and variance > 0


# --- betting CS over a histogram -------------------------------------------------------------


def log_capitals(
    hist: np.ndarray | Sequence[int], m: float
) -> tuple[np.ndarray | float, np.ndarray | float]:
    """Log-capital of the betting mixture against mean ``m``, data rescaled to [0, 1].

    ``hist`` holds counts of B equal-width bins over [0, 1] (leading axes allowed: one
    histogram per simulated run). Returns (evidence mean > m, evidence mean < m); each side
    is an e-process, compared with ln(2/alpha). A mixture of constant bets does not depend
    on the order of the data; each bin is rounded to its edge in the conservative direction
    (the lower edge when betting on a larger mean, the upper edge otherwise), so the
    histogram's capital is never above that of the raw values.

    >>> up, down = log_capitals([0, 0, 0, 100], 0.5)  # 100 values in [0.75, 1]
    >>> up > math.log(2 / 0.05), down < 0
    (True, True)
    """
    counts, used, bins = _sparse(hist)
    up, down = _capital(counts, used, bins, m, True), _capital(counts, used, bins, m, False)
    if counts.ndim == 1:
        return float(up), float(down)
    return up, down


def _sparse(hist: np.ndarray | Sequence[int]) -> tuple[np.ndarray, np.ndarray, int]:
    # Histograms are sparse (a loss difference rarely spreads over many bins): only the
    # bins that hold data in some histogram enter the tables.
    counts = np.asarray(hist, dtype=float)
    bins = counts.shape[-1]
    used = np.flatnonzero(counts.reshape(-1, bins).any(axis=0))
    return counts[..., used], used, bins


def _capital(counts: np.ndarray, used: np.ndarray, bins: int, m: float,
             up: bool) -> np.ndarray:
    """One side of :func:`log_capitals` on the used bins."""
    m = min(max(m, 1e-12), 1 - 1e-12)
    if up:
        lams, x, sign = (_BET_C / m) * _BET_GRID, used / bins, 1.0
    else:
        lams, x, sign = (_BET_C / (1 - m)) * _BET_GRID, (used + 1) / bins, -1.0
    # A table of log-factors (bets x bins); a matrix product sums it over the bins.
    table = np.log1p(sign * lams[:, None] * (x[None, :] - m))
    return _log_mean_exp(counts @ table.T)


def _log_mean_exp(x: np.ndarray) -> np.ndarray:
    top = x.max(axis=-1)
    return top + np.log(np.exp(x - top[..., None]).mean(axis=-1))


class BettingResult(NamedTuple):
    """The betting CS on the mean of d in [lo, hi], from a histogram of d."""

    interval: Interval
    hist: tuple[int, ...]
    lo: float
    hi: float

    def log_capital(self, m: float) -> tuple[float, float]:
        """(evidence mean > m, evidence mean < m) for ``m`` in d's units; act at ln(2/alpha).

        >>> r = betting_cs([0] * 50 + [400] + [0] * 49, -1.0, 1.0, 0.05)  # d near 0
        >>> r.log_capital(0.5)[1] > math.log(2 / 0.05)
        True
        """
        x = (m - self.lo) / (self.hi - self.lo)
        up, down = log_capitals(self.hist, x)
        return float(up), float(down)


def betting_cs(hist: Sequence[int], lo: float, hi: float, alpha: float) -> BettingResult:
    """Betting confidence sequence (diversified Kelly) for d in [lo, hi] given as a histogram.

    ``hist`` holds counts of B equal-width bins over [lo, hi] (the last bin includes hi).
    The estimate is the histogram's mean (bin centres). Valid at every n, no guard needed,
    but rounding to bin edges widens the interval by up to one bin width: use ~1000 bins.
    An empty histogram gives the whole range [lo, hi].

    >>> hist = [0] * 1000
    >>> hist[495] = 3000  # 3,000 differences near -0.01 in [-1, 1]
    >>> r = betting_cs(hist, -1.0, 1.0, 0.05)
    >>> round(r.interval.estimate, 3), r.interval.hi < 0
    (-0.009, True)
    """
    counts = tuple(int(c) for c in hist)
    total = sum(counts)
    bins = len(counts)
    if total == 0:
        return BettingResult(Interval(0.0, lo, hi), counts, lo, hi)
    centres = (np.arange(bins) + 0.5) / bins
    mean_x = float(np.dot(counts, centres) / total)
    threshold = math.log(2 / alpha)
    arr, used, _ = _sparse(counts)
    # Evidence for "mean > m" falls as m grows: the lower bound is where it drops below the
    # threshold; evidence for "mean < m" grows with m: the upper bound is where it reaches it.
    lo_x = _crossing(lambda m: _capital(arr, used, bins, m, True) >= threshold, 0.0, 1.0)
    hi_x = _crossing(lambda m: _capital(arr, used, bins, m, False) < threshold, 0.0, 1.0)
    scale = hi - lo
    return BettingResult(
        Interval(lo + scale * mean_x, lo + scale * lo_x, lo + scale * hi_x), counts, lo, hi
    )


def _crossing(test, a: float, b: float, iterations: int = 34) -> float:
    """Where ``test``, True near ``a`` and False near ``b`` (monotone), flips to False.

    Returns ``a`` when it is False already at a, ``b`` when it is still True at b; else
    within (b - a) / 2**iterations of the flip (6e-11 of the range: far below a bin).
    """
    if not test(a):
        return a
    if test(b):
        return b
    for _ in range(iterations):
        mid = (a + b) / 2
        a, b = (mid, b) if test(mid) else (a, mid)
    return b


# --- discordant pairs, e-BH ------------------------------------------------------------------


def discordant_log_evalue(wins: ArrayLike, losses: ArrayLike, a: float = 10.0) -> Numeric:
    """Log e-value for "the challenger is worse": P(alone wrong | discordant) > 1/2.

    ``losses`` = pairs where only the challenger is wrong, ``wins`` = only the primary.
    A Beta(a, a) prior on that probability, restricted to (1/2, 1) (notes C, lnE1). Act
    when it reaches ln(1/alpha) (or ln(K/alpha) over K tests); 0 with no discordant pair.
    Works elementwise on arrays too; floored at -745 (below the smallest double).

    >>> round(discordant_log_evalue(0, 0), 12)
    0.0
    >>> round(discordant_log_evalue(20, 60), 2)
    8.19
    """
    w = np.asarray(wins, dtype=float)
    los = np.asarray(losses, dtype=float)
    ln_e = (w + los) * math.log(2) + betaln(los + a, w + a) - betaln(a, a)
    with np.errstate(divide="ignore"):
        ln_e1 = math.log(2) + ln_e + np.log(betainc(w + a, los + a, 0.5))
    return _out(np.maximum(ln_e1, _LOG_TINY))


def _rate_cs(k: int, n: int, alpha: float) -> tuple[float, float]:
    """CS at ``alpha`` for a rate from k of n (uniform-prior mixture; notes C)."""
    if n <= 0:
        return 0.0, 1.0
    level = math.log(alpha) + betaln(k + 1, n - k + 1)

    def inside(p: float) -> bool:
        return k * math.log(p) + (n - k) * math.log1p(-p) > level

    centre = min(max(k / n, 1e-300), 1 - 1e-16)
    q_lo = 0.0 if k == 0 else _crossing(lambda p: not inside(p), 1e-300, centre)
    q_hi = 1.0 if k == n else _crossing(inside, centre, 1 - 1e-16)
    return q_lo, q_hi


def discordant_harm(
    losses: int, wins: int, n: int, margin: float, alpha: float, a: float = 10.0
) -> float:
    """Log evidence that the gap (P(alone wrong) - P(alone right)) exceeds ``margin``.

    The discordance rate q gets a CS at alpha/2 among the ``n`` pairs; gap > margin means
    pi = P(loss | discordant) > pi0 = 1/2 + margin/(2q), hardest at the plausible q farthest
    from the margin (q_lo for a positive margin). Compare the result with ln(2/alpha);
    0.0 when pi0 >= 1 or the losses do not exceed pi0 of the discordant pairs.

    >>> discordant_harm(600, 300, 10_000, 0.01, 0.05) > math.log(2 / 0.05)  # gap 0.03
    True
    >>> discordant_harm(130, 110, 10_000, 0.01, 0.05)  # gap 0.002
    0.0
    """
    n_d = losses + wins
    if n_d == 0 or n <= 0:
        return 0.0
    q_lo, q_hi = _rate_cs(n_d, n, alpha / 2)
    q = q_lo if margin > 0 else q_hi
    if margin == 0:
        pi0 = 0.5
    elif q <= 0:
        return 0.0
    else:
        pi0 = 0.5 + margin / (2 * q)
    if not 0 < pi0 < 1 or losses <= pi0 * n_d:
        return 0.0
    return float(
        betaln(losses + a, wins + a)
        - betaln(a, a)
        - losses * math.log(pi0)
        - wins * math.log1p(-pi0)
    )


def e_bh(log_evalues: Sequence[float], alpha: float) -> list[bool]:
    """e-BH (Wang & Ramdas): which of K tests to flag, controlling the FDR at ``alpha``.

    Flags the k* largest e-values, k* = max{k: e_(k) >= K / (alpha k)}. Valid at each
    look, not for "ever flagged": recompute at every refresh, never latch.

    >>> e_bh([math.log(100), math.log(30), 0.0], 0.05)
    [True, True, False]
    >>> e_bh([math.log(50), 0.0, 0.0], 0.05)
    [False, False, False]
    """
    k_total = len(log_evalues)
    if k_total == 0:
        return []
    order = sorted(range(k_total), key=lambda i: log_evalues[i], reverse=True)
    base = math.log(k_total / alpha)
    k_star = 0
    for rank, i in enumerate(order, start=1):
        if log_evalues[i] >= base - math.log(rank):
            k_star = rank
    flagged = set(order[:k_star])
    return [i in flagged for i in range(k_total)]


# --- ETA, label maturity ---------------------------------------------------------------------


def eta_pairs(
    estimate: float,
    margin: float,
    variance: float,
    n: int,
    alpha: float,
    n_tune: int = 10_000,
    n_min: int = 1000,
) -> int | None:
    """More pairs needed until the CS excludes ``margin`` if the estimate holds (notes F).

    Solves half_width(n*) = |estimate - margin|; returns max(n*, n_min) - n, at least 0.
    None when the estimate equals the margin or there is no variance to go by.

    >>> eta_pairs(0.0, 0.01, 0.04, 1000, 0.05)
    2916
    >>> eta_pairs(0.01, 0.01, 0.04, 1000, 0.05) is None
    True
    """
    gap = abs(estimate - margin)
    if gap == 0 or variance <= 0 or not math.isfinite(gap):
        return None
    lo, hi = 0.0, math.log(1e15)
    if half_width(int(math.exp(hi)), variance, alpha, n_tune) > gap:
        return int(1e15)
    for _ in range(60):
        mid = (lo + hi) / 2
        if half_width(max(int(math.exp(mid)), 2), variance, alpha, n_tune) > gap:
            lo = mid
        else:
            hi = mid
    return max(math.ceil(math.exp(hi)), n_min, n) - n


def kaplan_meier(
    bin_edges_ms: Sequence[float], events: Sequence[int], censored: Sequence[int]
) -> list[tuple[float, float]]:
    """Kaplan-Meier survival of the label delay from counts per delay bin (notes G).

    ``events[k]`` = requests labelled with a delay in bin k (edges k, k+1); ``censored[k]``
    = requests not labelled yet whose age is in bin k. Returns (upper edge of bin k, S)
    where S = P(delay > that edge). Censored requests count as at risk for their bin's
    events (the usual convention), which keeps S from falling too fast.

    >>> kaplan_meier([0, 1, 2, 3], [5, 3, 1], [0, 1, 0])
    [(1.0, 0.5), (2.0, 0.2), (3.0, 0.0)]
    """
    if len(bin_edges_ms) != len(events) + 1 or len(events) != len(censored):
        raise ValueError("kaplan_meier needs len(edges) == len(events) + 1 == len(censored) + 1")
    dead = np.asarray(events, dtype=float)
    gone = np.asarray(censored, dtype=float)
    # At risk at the start of bin k: everyone whose delay or age is in bin k or later.
    at_risk = (dead + gone)[::-1].cumsum()[::-1]
    with np.errstate(divide="ignore", invalid="ignore"):
        factor = np.where(at_risk > 0, 1 - dead / at_risk, 1.0)
    survival = np.cumprod(factor)
    return [(float(u), float(s)) for u, s in zip(bin_edges_ms[1:], survival, strict=True)]


def maturity_horizon(curve: Sequence[tuple[float, float]], quantile: float = 0.99) -> float | None:
    """The smallest delay u with S(u) <= 1 - quantile; None when S never gets that low.

    >>> maturity_horizon([(1.0, 0.5), (2.0, 0.2), (3.0, 0.0)], 0.9)
    3.0
    >>> maturity_horizon([(1.0, 0.5), (2.0, 0.2)], 0.99) is None
    True
    """
    limit = 1 - quantile + 1e-12
    for u, s in curve:
        if s <= limit:
            return u
    return None
