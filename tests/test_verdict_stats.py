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


# --- betting CS ---------------------------------------------------------------------------------


class _NotesFormulaB:
    """Formula B of verdict-notes (hedged betting, predictable plug-in), one state per run.

    Written from the notes as the reference the histogram (mixture) version is compared to.
    """

    def __init__(self, runs: int, m: float) -> None:
        self.m, self.t = m, 0
        self.sx = np.zeros(runs)
        self.v = np.zeros(runs)
        self.up = np.zeros(runs)
        self.down = np.zeros(runs)

    def add(self, x: np.ndarray) -> None:
        self.t += 1
        t, m = self.t, self.m
        lam = np.sqrt(2 * math.log(2 / ALPHA) / (((0.25 + self.v) / t) * t * math.log(1 + t)))
        self.up += np.log1p(np.minimum(lam, 0.5 / m) * (x - m))
        self.down += np.log1p(-np.minimum(lam, 0.5 / (1 - m)) * (x - m))
        self.sx += x
        self.v += (x - (0.5 + self.sx) / (t + 1)) ** 2


def _add_to_hist(hist: np.ndarray, x: np.ndarray) -> None:
    """Count values x in [0, 1] (runs x batch) into hist (runs x bins)."""
    runs, bins = hist.shape
    idx = np.minimum((x * bins).astype(int), bins - 1) + bins * np.arange(runs)[:, None]
    hist += np.bincount(idx.ravel(), minlength=runs * bins).reshape(runs, bins)


def test_betting_cs_covers_a_heavy_tailed_log_loss_null_where_formula_a_does_not() -> None:
    # notes T1, last row: d = +9 w.p. .002, else N(-.018, .05^2); log-loss clipped at 1e-4.
    runs, looks, bins = 500, 1000, 2000
    lo, hi = -math.log(1e4), math.log(1e4)
    mu = 0.002 * 9 + 0.998 * -0.018
    m = (mu - lo) / (hi - lo)
    threshold = math.log(2 / ALPHA)
    rng = np.random.default_rng(7)
    hist = np.zeros((runs, bins))
    s1, s2 = np.zeros(runs), np.zeros(runs)
    bet_excl = np.zeros(runs, dtype=bool)
    a_excl, a_guarded_excl = bet_excl.copy(), bet_excl.copy()
    for look in range(1, looks + 1):
        d = np.where(rng.random((runs, STEP)) < 0.002, 9.0, rng.normal(-0.018, 0.05, (runs, STEP)))
        _add_to_hist(hist, (np.clip(d, lo, hi) - lo) / (hi - lo))
        up, down = stats.log_capitals(hist, m)
        bet_excl |= (up >= threshold) | (down >= threshold)
        s1 += d.sum(axis=1)
        s2 += (d * d).sum(axis=1)
        n = look * STEP
        var = stats.sample_variance(n, s1, s2)
        out = np.abs(s1 / n - mu) > stats.half_width(n, var, ALPHA)
        a_excl |= out
        a_guarded_excl |= out & (n >= 1000)
    assert bet_excl.mean() <= ALPHA + _two_se(ALPHA, runs), bet_excl.mean()
    assert a_guarded_excl.mean() > 2 * ALPHA, a_guarded_excl.mean()  # why B, not A, here
    assert a_excl.mean() >= a_guarded_excl.mean()


@pytest.mark.parametrize(("gap", "want"), [(-0.02, "P"), (0.03, "R")])
def test_histogram_betting_cs_decides_about_as_fast_as_notes_formula_b(
    gap: float, want: str
) -> None:
    # A Brier-like paired difference in [-1, 1], sd .15, margin 1 point; both versions see
    # the same values, the histogram one only after every 100 pairs.
    runs, looks, bins, margin = 500, 100, 1000, 0.01
    m = (margin + 1) / 2
    threshold = math.log(2 / ALPHA)
    rng = np.random.default_rng(8)
    hist = np.zeros((runs, bins))
    ref = _NotesFormulaB(runs, m)
    mix_promote, mix_reject = np.zeros((runs, looks), bool), np.zeros((runs, looks), bool)
    ref_promote, ref_reject = mix_promote.copy(), mix_reject.copy()
    ref_up, ref_down = np.zeros(runs, bool), np.zeros(runs, bool)
    for look in range(looks):
        x = (np.clip(rng.normal(gap, 0.15, (runs, STEP)), -1, 1) + 1) / 2
        for col in x.T:
            ref.add(col)
            ref_up |= ref.up >= threshold  # formula B may stop at any pair
            ref_down |= ref.down >= threshold
        _add_to_hist(hist, x)
        up, down = stats.log_capitals(hist, m)
        mix_reject[:, look], mix_promote[:, look] = up >= threshold, down >= threshold
        ref_reject[:, look], ref_promote[:, look] = ref_up, ref_down
    mix, mix_look = _latched(mix_promote, mix_reject)
    ref_dec, ref_look = _latched(ref_promote, ref_reject)
    assert (mix == want).mean() >= 0.99 and (ref_dec == want).mean() >= 0.99
    mix_median = np.median(mix_look + 1) * STEP
    ref_median = np.median(ref_look + 1) * STEP
    assert mix_median <= 1.5 * ref_median, (mix_median, ref_median)


def test_betting_cs_interval_contains_the_mean_and_shrinks() -> None:
    rng = np.random.default_rng(9)
    d = np.clip(rng.normal(0.004, 0.1, 20_000), -1, 1)
    widths = []
    for n in (1000, 20_000):
        hist = np.histogram(d[:n], bins=1000, range=(-1, 1))[0]
        result = stats.betting_cs(hist, -1.0, 1.0, ALPHA)
        lo, hi = result.interval.lo, result.interval.hi
        assert lo < d[:n].mean() < hi
        assert result.log_capital(lo - 1e-3)[0] >= math.log(2 / ALPHA)
        assert result.log_capital(hi + 1e-3)[1] >= math.log(2 / ALPHA)
        widths.append(hi - lo)
    assert widths[1] < widths[0] / 3


# --- label maturity (notes T5, G) ---------------------------------------------------------------

HOURS_PER_DAY = 24


def _t5_stream(rng, per_day: int, days: int, gap: float, q: float = 0.04):
    """Requests of notes T5: primary accuracy .9, discordance q, challenger worse by gap.

    Labels arrive after Exp(1 day) when the primary was wrong, else Exp(5 days): the pairs
    where only the primary is wrong (challenger wins) are labelled first.
    Returns arrival day (sorted), label day, d (+1 loss, -1 win, 0 tie).
    """
    total = per_day * days
    arrival = np.sort(rng.random(total) * days)
    p_loss, p_win = (q + gap) / 2, (q - gap) / 2
    kind = rng.choice(4, size=total, p=[p_loss, p_win, 0.1 - p_win, 1 - 0.1 - p_loss])
    primary_wrong = (kind == 1) | (kind == 2)
    delay = rng.exponential(np.where(primary_wrong, 1.0, 5.0))
    d = np.select([kind == 0, kind == 1], [1, -1], 0)
    return arrival, arrival + delay, d


def _km_horizon(arrival, label_day, now: float) -> float | None:
    """KM d99 (days) at ``now`` from hourly bins, through stats.kaplan_meier."""
    seen = arrival <= now
    labelled = seen & (label_day <= now)
    hours = int(now * HOURS_PER_DAY) + 1
    delay_h = ((label_day - arrival)[labelled] * HOURS_PER_DAY).astype(int)
    age_h = ((now - arrival)[seen & ~labelled] * HOURS_PER_DAY).astype(int)
    events = np.bincount(delay_h, minlength=hours)[:hours]
    censored = np.bincount(age_h, minlength=hours)[:hours]
    curve = stats.kaplan_meier(np.arange(hours + 1), events, censored)
    horizon = stats.maturity_horizon(curve, 0.99)
    return None if horizon is None else horizon / HOURS_PER_DAY


def _decide(d: np.ndarray, margin: float = 0.01) -> str:
    """Guarded formula A on a set of labelled pairs: 'P', 'R' or '' (HOLD)."""
    n, losses, wins = len(d), int((d > 0).sum()), int((d < 0).sum())
    var = stats.sample_variance(n, losses - wins, losses + wins)
    if not stats.guard_met(n, losses + wins, var):
        return ""
    cs = stats.asymptotic_cs(n, losses - wins, losses + wins, ALPHA)
    return "P" if cs.hi < margin else "R" if cs.lo > margin else ""


def test_a_worse_challenger_with_sooner_labelled_wins_is_never_promoted_on_mature_cohorts() -> None:
    # notes T5: 3,000 requests/day for 60 days; 50 runs (notes: 200) keep this
    # to seconds. Discordance .10: with .04 the naive comparison promoted in 81 % of runs
    # (looks daily), with .10 in all (notes: 99 %), a clearer contrast.
    runs, per_day, days = 50, 3000, 60
    rng = np.random.default_rng(10)
    naive_first, mature_first = [], []
    for _ in range(runs):
        arrival, label_day, d = _t5_stream(rng, per_day, days, gap=0.015, q=0.10)
        naive = mature = ""
        for day in range(1, days + 1):
            if not naive:
                naive = _decide(d[label_day <= day])
            if not mature:
                horizon = _km_horizon(arrival, label_day, day)
                if horizon is not None:
                    mature = _decide(d[(arrival <= day - horizon) & (label_day <= day)])
            if naive and mature:
                break
        naive_first.append(naive)
        mature_first.append(mature)
    naive_first, mature_first = np.array(naive_first), np.array(mature_first)
    assert (mature_first == "P").sum() == 0
    assert (naive_first == "P").mean() >= 0.9, (naive_first == "P").mean()
    assert (mature_first == "R").mean() >= 0.9, (mature_first == "R").mean()


def test_km_horizon_is_not_biased_low_like_the_observed_delay_percentile() -> None:
    # True d99 of the T5 delay mixture (Exp(1) w.p. .1, Exp(5) w.p. .9) is 22.5 days.
    rng = np.random.default_rng(11)
    now = 30.0
    arrival, label_day, _ = _t5_stream(rng, 3000, int(now), gap=0.0)
    labelled = label_day <= now
    observed = np.percentile((label_day - arrival)[labelled], 99)
    horizon = _km_horizon(arrival, label_day, now)
    assert horizon is not None and abs(horizon - 22.5) < 1.0, horizon
    assert observed < 19.0, observed  # 16.9 measured (notes: 17.0)


def test_kaplan_meier_from_bins_matches_the_per_record_product() -> None:
    rng = np.random.default_rng(12)
    delay = rng.integers(0, 30, 2000)
    labelled = rng.random(2000) < 0.7
    # Per record, the textbook way: at each event time t, S *= 1 - deaths(t) / at_risk(t),
    # at_risk(t) = records whose time (delay or age) is >= t.
    expected, s = {}, 1.0
    for t in range(30):
        at_risk = (delay >= t).sum()
        deaths = ((delay == t) & labelled).sum()
        s *= 1 - deaths / at_risk if at_risk else 1.0
        expected[t + 1] = s
    events = np.bincount(delay[labelled], minlength=30)
    censored = np.bincount(delay[~labelled], minlength=30)
    curve = stats.kaplan_meier(np.arange(31), events, censored)
    assert [u for u, _ in curve] == list(range(1, 31))
    assert [s for _, s in curve] == pytest.approx([expected[u] for u in range(1, 31)], rel=1e-12)
    horizon = stats.maturity_horizon(curve, 0.5)
    assert horizon == min(u for u, s in expected.items() if s <= 0.5)
