"""Seeded simulations of the verdict statistics (processors/verdict/stats.py), no pipeline.

Each test simulates many independent runs at once (numpy over the run axis) and looks at
the data after every 100 pairs, as a user re-running ``shadowpipe verdict`` would. Error
rates are asserted against their bound plus two Monte-Carlo standard errors; the figures
measured are in /work/notes/h5-verdict-stats.md and docs/verdict.md.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import integrate
from scipy.special import betaln
from shadowpipe.processors.verdict import stats

ALPHA = 0.05
STEP = 100  # pairs between looks


def _two_se(p: float, runs: int) -> float:
    return 2 * math.sqrt(p * (1 - p) / runs)


def _paired_streams(rng, runs: int, looks: int, p_loss: float, p_win: float):
    """Cumulative (n, L, W) per run (rows) and look (columns) of a paired 0/1 stream.

    L = pairs where only the challenger is wrong (d = +1), W = only the primary (d = -1).
    """
    draws = rng.multinomial(STEP, [p_loss, p_win, 1 - p_loss - p_win], size=(runs, looks))
    losses = np.cumsum(draws[..., 0], axis=1)
    wins = np.cumsum(draws[..., 1], axis=1)
    n = STEP * np.arange(1, looks + 1)[None, :] * np.ones((runs, 1), dtype=int)
    return n, losses, wins


def _cs(n, losses, wins, n_tune: int = 10_000):
    """Formula A on every (run, look): estimate, half-width, guard."""
    s1, s2 = losses - wins, losses + wins
    var = stats.sample_variance(n, s1, s2)
    hw = stats.half_width(n, var, ALPHA, n_tune)
    guard = (n >= 1000) & (s2 >= 10) & (var > 0)
    return s1 / n, hw, guard


def _first(mask) -> np.ndarray:
    """Index of the first look where ``mask`` holds, per run; -1 when never."""
    hit = mask.any(axis=1)
    return np.where(hit, mask.argmax(axis=1), -1)


def _latched(promote, reject):
    """The first decision of each run: 'P', 'R' or '' (HOLD to the end), and its look."""
    first_p, first_r = _first(promote), _first(reject)
    big = promote.shape[1] + 1
    fp = np.where(first_p >= 0, first_p, big)
    fr = np.where(first_r >= 0, first_r, big)
    decision = np.where(fp < fr, "P", np.where(fr < fp, "R", ""))
    return decision, np.minimum(fp, fr)


# --- formula A ------------------------------------------------------------------------------


def _normal_mixture_bound(v: float, alpha: float, v_opt: float) -> float:
    """confseq's two-sided normal_mixture_bound (uniform_boundaries.h), written out directly."""
    log_inv = math.log(1 / alpha)
    rho = v_opt / (2 * log_inv + math.log(1 + 2 * log_inv))
    return math.sqrt((v + rho) * (math.log(1 + v / rho) + 2 * log_inv))


@pytest.mark.parametrize("n", [2, 17, 1000, 10_000, 123_456, 10**7])
@pytest.mark.parametrize("var", [1e-4, 0.04, 0.7])
def test_formula_a_is_confseqs_normal_mixture_bound(n: int, var: float) -> None:
    expected = _normal_mixture_bound(n * var, ALPHA, 10_000 * var) / n
    assert stats.half_width(n, var, ALPHA, 10_000) == pytest.approx(expected, rel=1e-12)


def test_formula_a_against_confseq_itself() -> None:
    boundaries = pytest.importorskip("confseq.boundaries")
    for n, var in [(50, 0.1), (5000, 0.04), (200_000, 0.002)]:
        bound = boundaries.normal_mixture_bound(n * var, ALPHA, 10_000 * var, ALPHA, False)
        assert stats.half_width(n, var, ALPHA) == pytest.approx(bound / n, rel=1e-12)


def test_null_cs_rarely_excludes_zero_but_repeated_mcnemar_often_does() -> None:
    runs, looks = 500, 1000  # looks every 100 pairs up to 100,000
    n, losses, wins = _paired_streams(np.random.default_rng(1), runs, looks, 0.02, 0.02)
    mean, hw, _ = _cs(n, losses, wins)
    cs_rate = (np.abs(mean) > hw).any(axis=1).mean()
    with np.errstate(divide="ignore", invalid="ignore"):
        z = np.abs(losses - wins) / np.sqrt(losses + wins)
    mcnemar_rate = (z > 1.959964).any(axis=1).mean()
    assert cs_rate <= ALPHA + _two_se(ALPHA, runs), cs_rate
    assert mcnemar_rate > 0.30, mcnemar_rate


@pytest.mark.parametrize("q", [0.04, 0.10])
def test_at_the_margin_each_wrong_decision_is_rare(q: float) -> None:
    runs, looks, margin = 1000, 1000, 0.01
    gap = margin  # any verdict is wrong here
    n, losses, wins = _paired_streams(
        np.random.default_rng(2), runs, looks, (q + gap) / 2, (q - gap) / 2
    )
    mean, hw, guard = _cs(n, losses, wins)
    decision, _ = _latched(guard & (mean + hw < margin), guard & (mean - hw > margin))
    bound = ALPHA / 2 + _two_se(ALPHA / 2, runs)
    assert (decision == "P").mean() <= bound
    assert (decision == "R").mean() <= bound


@pytest.mark.parametrize(
    ("q", "gap", "want", "p90_pairs"),
    # p90 pair counts of notes table T2 (formula A, guarded)
    [
        (0.04, 0.03, "R", 1900),
        (0.04, -0.02, "P", 1100),
        (0.10, 0.03, "R", 4400),
        (0.10, -0.02, "P", 2300),
    ],
)
def test_power_within_the_p90_pair_counts(q: float, gap: float, want: str, p90_pairs: int) -> None:
    runs, looks, margin = 1000, p90_pairs // STEP, 0.01
    n, losses, wins = _paired_streams(
        np.random.default_rng(3), runs, looks, (q + gap) / 2, (q - gap) / 2
    )
    mean, hw, guard = _cs(n, losses, wins)
    decision, _ = _latched(guard & (mean + hw < margin), guard & (mean - hw > margin))
    assert (decision == want).mean() >= 0.90 - _two_se(0.90, runs), (decision == want).mean()


def test_eta_from_the_true_parameters_is_near_the_simulated_median() -> None:
    q, margin = 0.04, 0.01  # equal accuracy: PROMOTE once the upper bound is under 1 point
    n, losses, wins = _paired_streams(np.random.default_rng(4), 500, 200, q / 2, q / 2)
    mean, hw, guard = _cs(n, losses, wins)
    decision, look = _latched(guard & (mean + hw < margin), guard & (mean - hw > margin))
    median = np.median((look[decision == "P"] + 1) * STEP)
    eta = stats.eta_pairs(0.0, margin, q, 0, ALPHA)
    assert (decision == "P").mean() > 0.9
    assert 0.8 * median <= eta <= 1.5 * median, (eta, median)


# --- segments: discordant-pair e-values --------------------------------------------------------


@pytest.mark.parametrize(("wins", "losses"), [(0, 0), (3, 9), (40, 25), (120, 170), (500, 560)])
def test_discordant_evalue_matches_quadrature(wins: int, losses: int) -> None:
    a = 10.0

    # E1 = integral over pi in (1/2, 1) of the likelihood ratio against pi = 1/2, under a
    # Beta(a, a) prior restricted to (1/2, 1) (density doubled).
    def integrand(pi: float) -> float:
        log_ratio = losses * math.log(2 * pi) + wins * math.log(2 * (1 - pi))
        log_prior = (a - 1) * math.log(pi * (1 - pi)) - betaln(a, a)
        return 2 * math.exp(log_ratio + log_prior)

    expected, _ = integrate.quad(integrand, 0.5, 1, epsabs=0, epsrel=1e-10, limit=200)
    assert stats.discordant_log_evalue(wins, losses, a) == pytest.approx(
        math.log(expected), abs=1e-7
    )


def _segment_streams(rng, runs: int, looks: int, probs: np.ndarray, chunk: int = 100):
    """Yield cumulative (L, W) per run and segment at each look; probs[k] = (p_loss, p_win)."""
    k = len(probs)
    cells = np.concatenate([probs.ravel(), [1 - probs.sum()]])
    total = np.zeros((runs, 2 * k + 1), dtype=np.int64)
    for start in range(0, looks, chunk):
        draws = rng.multinomial(STEP, cells, size=(runs, min(chunk, looks - start)))
        for step in np.cumsum(draws, axis=1).transpose(1, 0, 2):
            now = total + step
            yield now[:, 0 : 2 * k : 2], now[:, 1 : 2 * k : 2]
        total = total + draws.sum(axis=1)


def _first_flag_look(runs: int, looks: int, probs: np.ndarray, seed: int) -> np.ndarray:
    """Per run and segment, the first look whose e-value crosses Bonferroni's K/alpha."""
    k = len(probs)
    threshold = math.log(k / ALPHA)
    size = 700  # counts never reach this in 100,000 pairs at 5 % traffic
    grid = np.arange(size)
    table = stats.discordant_log_evalue(grid[:, None], grid[None, :]) >= threshold
    first = np.full((runs, k), -1)
    for look, (losses, wins) in enumerate(
        _segment_streams(np.random.default_rng(seed), runs, looks, probs)
    ):
        assert losses.max() < size and wins.max() < size
        hit = table[wins, losses] & (first < 0)
        first[hit] = look
    return first


def test_twenty_null_segments_rarely_give_a_latched_segment_reject() -> None:
    runs, looks, k = 500, 1000, 20
    probs = np.full((k, 2), 0.05 * 0.02)  # 5 % of traffic each, equal error rates, q = .04
    first = _first_flag_look(runs, looks, probs, seed=5)
    rate = (first >= 0).any(axis=1).mean()
    assert rate <= ALPHA + _two_se(ALPHA, runs), rate


def test_a_segment_eight_points_worse_is_flagged_and_only_it() -> None:
    runs, looks, k = 500, 1000, 20
    probs = np.full((k, 2), 0.05 * 0.02)
    probs[0] = (0.05 * 0.09, 0.05 * 0.01)  # gap .08 in segment 0
    first = _first_flag_look(runs, looks, probs, seed=6)
    assert (first[:, 0] >= 0).mean() >= 0.99
    assert (first[:, 1:] >= 0).any(axis=1).mean() <= ALPHA + _two_se(ALPHA, runs)


def test_e_bh_flags_the_k_largest_that_clear_their_level() -> None:
    # K = 4: level K/(alpha k) is 80, 40, 26.7, 20 for k = 1..4
    logs = [math.log(v) for v in (27.0, 90.0, 1.0, 30.0)]  # 30 < 40 but 27 >= 26.7
    assert stats.e_bh(logs, ALPHA) == [True, True, False, True]
    assert stats.e_bh([math.log(79.0), 0, 0, 0], ALPHA) == [False] * 4
    assert stats.e_bh([math.log(25.0)] * 3 + [0], ALPHA) == [False] * 4


def test_discordant_harm_needs_the_gap_beyond_the_margin() -> None:
    threshold = math.log(2 / ALPHA)
    assert stats.discordant_harm(700, 300, 20_000, 0.01, ALPHA) > threshold  # gap .02
    assert stats.discordant_harm(350, 250, 20_000, 0.01, ALPHA) < threshold  # gap .005
