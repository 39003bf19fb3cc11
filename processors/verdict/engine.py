"""The decision: PROMOTE / REJECT / HOLD / INCONCLUSIVE from aggregates, pure (no I/O).

:func:`evaluate` judges one challenger from its cells (:mod:`.aggregate`) and policy:

1. **Critical limits** (no labels needed, every request): the challenger's failure rate
   (errors + timeouts) and its share of model times over the latency SLO, each a betting
   confidence sequence against its limit; output-constraint violations (allowed labels,
   value range) counted exactly. A crossed limit REJECTs.
2. **Label maturity**: a Kaplan-Meier curve of the label delay (unlabelled requests censored
   at their age) gives the horizon d99 (the larger of all requests' and those where the arms
   differ); label criteria use only the cohorts older than it.
3. **Guardrails** on the paired difference D = loss(challenger) - loss(primary): 0/1 error
   with the asymptotic CS and its guard, Brier / clipped log-loss / capped absolute error /
   cost with the betting CS. REJECT when harm beyond the margin is shown, pass when the
   upper bound is within it.
4. **Segments**: per segment and guardrail an e-value of harm beyond the margin; one at the
   Bonferroni level K/alpha REJECTs (time-uniform, so latched); e-BH over "worse at all"
   e-values lists the current suspects (recomputed, never latched).
5. **Gates** before PROMOTE: join completeness, minimum pairs and discordant pairs, minimum
   duration in event time, a known maturity horizon. No joined records, no labels, broken
   coverage or a control challenger that disagrees with the primary: INCONCLUSIVE.
6. **Latching** against the previous verdict of the same policy: a REJECT stands until the
   policy changes or a reset; a PROMOTE stands unless harm appears, which REJECTs.

>>> from shadowpipe.processors.verdict.aggregate import Aggregates
>>> v = evaluate(Aggregates(None, {}), "c1", ChallengerPolicy())
>>> v.verdict, v.reasons
('INCONCLUSIVE', ['no joined records for c1'])
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from shadowpipe.processors.verdict import stats
from shadowpipe.processors.verdict.aggregate import (
    Aggregates,
    Cell,
    ChallengerData,
)
from shadowpipe.processors.verdict.policy import ChallengerPolicy, Guardrail

PROMOTE, HOLD, INCONCLUSIVE, REJECT = "PROMOTE", "HOLD", "INCONCLUSIVE", "REJECT"
RESET = "RESET"  # a user's reset row in the verdicts table: the next verdict starts afresh
VERDICTS = (PROMOTE, HOLD, INCONCLUSIVE, REJECT)
PASS, HARM, UNDECIDED, IMPROVED, INFO = "pass", "harm", "undecided", "improved", "info"
BOUNDED = ("brier", "log_loss", "abs_error", "cost")
_RATE_BINS = 1000  # 0/1 rates go to the betting CS as a two-spike histogram
_DAY_MS = 86_400_000


@dataclass
class Criterion:
    """One criterion's state: estimate and confidence-sequence bounds in loss units."""

    name: str
    kind: str  # guardrail | success | limit | info
    decision: str  # pass | harm | undecided | improved | info
    estimate: float | None = None
    lo: float | None = None
    hi: float | None = None
    margin: float | None = None  # the margin (guardrail) or limit (limit)
    pairs: int = 0
    eta_pairs: int | None = None
    eta_seconds: float | None = None
    note: str = ""


@dataclass
class Gate:
    name: str
    value: float | None
    required: float
    passed: bool


@dataclass
class Segment:
    """A segment's evidence for one guardrail (flagged: Bonferroni; suspect: e-BH)."""

    segment: str
    criterion: str
    estimate: float
    lo: float | None  # the interval at alpha/K, computed for flagged segments
    hi: float | None
    pairs: int
    log_evalue: float
    flagged: bool = False
    suspect: bool = False


@dataclass
class Verdict:
    """The decision on one challenger, with everything that led to it."""

    challenger: str
    verdict: str
    time_ms: int
    reasons: list[str]
    policy_hash: str
    criteria: list[Criterion] = field(default_factory=list)
    gates: list[Gate] = field(default_factory=list)
    segments: list[Segment] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    latched: bool = False  # held from an earlier verdict (REJECT / PROMOTE)
    since_ms: int | None = None  # when the current verdict was first reached
    previous: str | None = None
    data_clock_ms: int | None = None
    pending_share: float | None = None  # requests without a label yet
    maturity_ms: float | None = None  # the label-delay horizon in force
    is_control: bool = False
    changed: bool = False  # set by the store: this evaluation changed the state

    @property
    def flagged(self) -> list[str]:
        """Segments flagged for harm (any criterion), each once."""
        return list(dict.fromkeys(s.segment for s in self.segments if s.flagged))

    @property
    def suspects(self) -> list[str]:
        """Segments e-BH suspects of being worse (any criterion), each once."""
        return list(dict.fromkeys(s.segment for s in self.segments if s.suspect))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (the CLI's and the web endpoint's document)."""
        out = asdict(self)
        out["flagged"], out["suspects"] = self.flagged, self.suspects
        return out

    def to_json(self) -> str:
        """The verdict as one JSON document.

        >>> json.loads(Verdict("c", "HOLD", 0, ["x"], "h").to_json())["verdict"]
        'HOLD'
        """
        return json.dumps(_finite(self.to_dict()), allow_nan=False)

    @classmethod
    def from_dict(cls, doc: dict[str, Any]) -> Verdict:
        doc = {k: v for k, v in doc.items() if k not in ("flagged", "suspects")}
        doc["criteria"] = [Criterion(**c) for c in doc.get("criteria", [])]
        doc["gates"] = [Gate(**g) for g in doc.get("gates", [])]
        doc["segments"] = [Segment(**s) for s in doc.get("segments", [])]
        return cls(**doc)


def _finite(x: Any) -> Any:
    """JSON has no NaN or infinity: they become null."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_finite(v) for v in x]
    return x


# -- the evaluation ---------------------------------------------------------------------------

def evaluate(agg: Aggregates, challenger: str, policy: ChallengerPolicy,
             previous: Verdict | None = None, now_ms: int | None = None) -> Verdict:
    """The verdict on ``challenger``, latched against ``previous`` (see module doc)."""
    now_ms = int(time.time() * 1000) if now_ms is None else now_ms
    fresh = _Judge(agg, challenger, policy).run(now_ms)
    return latch(fresh, previous)


def latch(fresh: Verdict, previous: Verdict | None) -> Verdict:
    """Apply the previous verdict: REJECT stands, PROMOTE stands until harm appears.

    >>> old = Verdict("c", "REJECT", 1, ["worse"], "h", since_ms=1)
    >>> v = latch(Verdict("c", "HOLD", 2, ["undecided"], "h"), old)
    >>> v.verdict, v.latched, v.reasons[0]
    ('REJECT', True, 'latched since 1970-01-01 00:00:00 UTC: worse')
    >>> latch(Verdict("c", "HOLD", 2, [], "other"), old).verdict  # the policy changed
    'HOLD'
    """
    if previous is None or previous.verdict == RESET or previous.policy_hash != fresh.policy_hash:
        fresh.since_ms = fresh.time_ms
        return fresh
    fresh.previous = previous.verdict
    since = previous.since_ms if previous.since_ms is not None else previous.time_ms
    if previous.verdict == REJECT:
        if fresh.verdict == REJECT:
            fresh.since_ms = since
            return fresh
        kept = [r for r in previous.reasons if not r.startswith("latched since")]
        reasons = [f"latched since {_when(since)}: {r}" for r in kept]
        return replace(fresh, verdict=REJECT, latched=True, since_ms=since,
                       reasons=reasons + [f"now: {r}" for r in fresh.reasons],
                       segments=_keep_flags(fresh.segments, previous.segments))
    if previous.verdict == PROMOTE:
        if fresh.verdict == REJECT:
            fresh.since_ms = fresh.time_ms
            fresh.reasons = ["promotion revoked: harm found after PROMOTE", *fresh.reasons]
            return fresh
        if fresh.verdict == PROMOTE:
            fresh.since_ms = since
            return fresh
        return replace(fresh, verdict=PROMOTE, latched=True, since_ms=since,
                       reasons=[f"promoted since {_when(since)}; no harm found since",
                                *[f"now: {r}" for r in fresh.reasons]])
    fresh.since_ms = since if fresh.verdict == previous.verdict else fresh.time_ms
    return fresh


def changed(new: Verdict, previous: Verdict | None) -> bool:
    """Whether ``new`` is a change of state worth a row and an event."""
    return (previous is None or previous.verdict != new.verdict
            or previous.policy_hash != new.policy_hash)


def _keep_flags(now: list[Segment], before: list[Segment]) -> list[Segment]:
    """Segment flags are latched: a flag raised before stays raised."""
    flagged = {(s.segment, s.criterion) for s in before if s.flagged}
    out = [replace(s, flagged=s.flagged or (s.segment, s.criterion) in flagged) for s in now]
    seen = {(s.segment, s.criterion) for s in out}
    return out + [s for s in before if s.flagged and (s.segment, s.criterion) not in seen]


def _when(ms: int) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(ms / 1000))


class _Judge:
    """One evaluation's working state (keeps the steps short)."""

    def __init__(self, agg: Aggregates, challenger: str, policy: ChallengerPolicy) -> None:
        self.agg, self.name, self.p = agg, challenger, policy
        self.alpha = policy.alpha
        self.threshold = math.log(2 / policy.alpha)
        self.data: ChallengerData | None = agg.challengers.get(challenger)
        self.criteria: list[Criterion] = []
        self.gates: list[Gate] = []
        self.rejects: list[str] = []
        self.inconclusive: list[str] = []
        self.warnings: list[str] = []
        self.segments: list[Segment] = []
        self.maturity_ms: float | None = None
        self.rate_per_s: float | None = None

    def run(self, now_ms: int) -> Verdict:
        v = Verdict(self.name, INCONCLUSIVE, now_ms, [], self.p.hash,
                    data_clock_ms=self.agg.now_ms)
        data = self.data
        if data is None or data.overall().rows == 0:
            v.reasons = [f"no joined records for {self.name}"]
            return v
        everything = data.overall()
        v.is_control = data.is_control
        v.pending_share = 1 - everything.labelled / everything.rows
        self._limits(everything)
        self._agreement(everything)
        self.maturity_ms = v.maturity_ms = data.maturity_ms
        self._selective_labels(data, everything)
        if self.p.labels == "human":
            self.warnings.append(f"only human review labels count (policy labels = \"human\"): "
                                 f"{everything.labelled} of {everything.rows} requests labelled")
        results = self._guardrails(data, everything, everything)
        if self.maturity_ms is not None:
            self._segments(data, results)
        self._gates(data, everything, everything)
        v.verdict, v.reasons = self._decide(everything)
        v.criteria, v.gates, v.segments = self.criteria, self.gates, self.segments
        v.warnings = self.warnings
        return v

    # -- operational -----------------------------------------------------------------------

    def _rate(self, name: str, k: int, n: int, limit: float, what: str) -> None:
        if n == 0:
            self.criteria.append(Criterion(name, "limit", UNDECIDED, margin=limit,
                                           note=f"no {what} measured"))
            return
        hist = [0] * _RATE_BINS
        hist[0], hist[-1] = n - k, k
        res = stats.betting_cs(hist, 0.0, 1.0, self.alpha)
        up, down = res.log_capital(limit)
        iv = res.interval
        decision = HARM if up >= self.threshold else PASS if down >= self.threshold else UNDECIDED
        self.criteria.append(Criterion(name, "limit", decision, k / n, iv.lo, iv.hi, limit, n,
                                       note=f"{k} of {n} {what}"))
        if decision == HARM:
            self.rejects.append(f"critical limit: {what} {_pct(k / n)} of {n} requests "
                                f"[{_pct(iv.lo)}, {_pct(iv.hi)}] above the limit {_pct(limit)}")

    def _limits(self, c: Cell) -> None:
        lim = self.p.limits
        self._rate("error_rate", c.failed, c.rows, lim.error_rate,
                   f"failed (errors + timeouts; {c.timeouts} timeouts)")
        self._rate("latency", c.slow, c.timed, lim.latency_share,
                   f"model times over the {lim.latency_slo_ms:g} ms SLO")
        if lim.allowed_labels is None and lim.value_range is None:
            return
        bad = c.violations > lim.max_violations
        self.criteria.append(Criterion(
            "violations", "limit", HARM if bad else PASS, c.violations / c.rows, None, None,
            lim.max_violations, c.rows, note=f"{c.violations} outputs outside the constraints"))
        if bad:
            self.rejects.append(f"critical limit: {c.violations} outputs violate the output "
                                f"constraints (allowed: {lim.max_violations})")

    def _agreement(self, c: Cell) -> None:
        """Disagreement with the primary, against the control's (the noise floor)."""
        controls = [d for n, d in sorted(self.agg.challengers.items())
                    if d.is_control and n != self.name]
        data = self.data
        assert data is not None
        if data.is_control and c.disagree:
            self.inconclusive.append(
                f"pipeline fault: {self.name} is a control (a copy of the primary) and disagrees "
                f"with it on {c.disagree} of {c.compared} requests")
        for ctrl in controls:
            cc = ctrl.overall()
            if cc.disagree:
                self.inconclusive.append(
                    f"pipeline fault: control {ctrl.name} disagrees with the primary on "
                    f"{cc.disagree} of {cc.compared} requests")
        if c.compared == 0:
            return
        mine = self._rate_cs(c.disagree, c.compared, self.alpha / 2)
        if not controls:
            self.criteria.append(Criterion(
                "disagreement", "info", INFO, *mine, pairs=c.compared,
                note="share of requests where the arms differ; no control challenger runs"))
            return
        cc = controls[0].overall()
        if cc.compared == 0:
            return
        floor = self._rate_cs(cc.disagree, cc.compared, self.alpha / 2)
        self.criteria.append(Criterion(
            "excess_disagreement", "info", INFO, mine[0] - floor[0], mine[1] - floor[2],
            mine[2] - floor[1], pairs=c.compared,
            note=f"disagreement {_pct(mine[0])} against the control {controls[0].name}'s "
                 f"{_pct(floor[0])} (the noise floor)"))

    def _rate_cs(self, k: int, n: int, alpha: float) -> tuple[float, float, float]:
        hist = [0] * _RATE_BINS
        hist[0], hist[-1] = n - k, k
        iv = stats.betting_cs(hist, 0.0, 1.0, alpha).interval
        return k / n, iv.lo, iv.hi

    # -- label maturity -------------------------------------------------------------------

    def _selective_labels(self, data: ChallengerData, everything: Cell) -> None:
        rates = [(labelled / n, decision, n)
                 for decision, (n, labelled) in data.delays.decisions.items() if n >= 100]
        if len(rates) >= 2:
            (r1, k1, n1), (r2, k2, n2) = min(rates), max(rates)
            pooled = (r1 * n1 + r2 * n2) / (n1 + n2)
            se = math.sqrt(max(pooled * (1 - pooled) * (1 / n1 + 1 / n2), 1e-12))
            if r2 - r1 > 0.05 and (r2 - r1) / se > 4:
                self.warnings.append(
                    f"selective labels: the label rate depends on the primary's decision "
                    f"({_pct(r2)} when it predicted {k2!r}, {_pct(r1)} for {k1!r}); "
                    "criteria judge only labelled requests")
        wrong, right = everything.delay_wrong_n, everything.delay_right_n
        if wrong >= 30 and right >= 30:
            mw, mr = everything.delay_wrong_s / wrong, everything.delay_right_s / right
            if mw > 0 and mr > 0 and not 0.5 <= mw / mr <= 2:
                sooner = "sooner" if mw < mr else "later"
                self.warnings.append(
                    f"selective labels: labels arrive {sooner} when the primary was wrong "
                    f"(mean delay {_dur(mw)} against {_dur(mr)}); only cohorts older than "
                    "the maturity horizon are judged")

    # -- guardrails ------------------------------------------------------------------------

    def _guardrails(self, data: ChallengerData, everything: Cell,
                    mature: Cell) -> dict[str, tuple[Guardrail, float]]:
        """Judge each guardrail (and the success criterion); return (guardrail, margin) of
        those with mature data, for the segments."""
        p = self.p
        self._set_rate(data, mature)
        judged: dict[str, tuple[Guardrail, float]] = {}
        for g in p.guardrails:
            available = _available(everything, g.name) > 0
            if g.name == "cost" and not p.cost_matrix and not p.declared:
                continue
            if not available and not p.declared:
                continue
            if not available:
                self.criteria.append(Criterion(g.name, "guardrail", UNDECIDED, margin=g.margin,
                                               note="no labelled pairs with this criterion"))
                continue
            margin = self._margin(g, mature)
            crit = self._judge(data, g.name, mature, margin, "guardrail")
            self.criteria.append(crit)
            if crit.pairs:
                judged[g.name] = (g, margin)
            if crit.decision == HARM:
                self.rejects.append(f"{_label(g.name)} worse by {_show(g.name, crit.estimate)} "
                                    f"{_bounds(g.name, crit)} beyond the margin "
                                    f"{_show(g.name, margin)} ({crit.pairs} pairs)")
        if p.success is not None:
            s = p.success
            crit = self._judge(data, s.criterion, mature, -s.min_improvement, "success")
            if crit.decision == PASS:
                crit.decision = IMPROVED
            self.criteria.append(crit)
        return judged

    def _margin(self, g: Guardrail, mature: Cell) -> float:
        if not g.relative:
            return g.margin
        n = _count(mature, g.name)
        if not n:
            return g.margin
        base = mature.err_p if g.name == "error" else getattr(mature, f"{g.name}_p")
        return g.margin * base / n

    def _judge(self, data: ChallengerData, name: str, c: Cell, margin: float,
               kind: str) -> Criterion:
        n = _count(c, name)
        if n == 0:
            note = ("label maturity unknown: delays not yet seen to their "
                    f"{self.p.gates.maturity_quantile:.0%} quantile") \
                if self.maturity_ms is None else "no mature labelled pairs yet"
            return Criterion(name, kind, UNDECIDED, margin=margin, note=note)
        if name == "error":
            return self._judge_error(c, margin, kind)
        lo, hi = data.spec.ranges(data.cap)[name]
        hist = _hist(getattr(c, f"{name}_h"), data.spec.bins)
        res = stats.betting_cs(hist, lo, hi, self.alpha)
        up, down = res.log_capital(margin)
        iv = res.interval
        decision = HARM if up >= self.threshold else PASS if down >= self.threshold else UNDECIDED
        crit = Criterion(name, kind, decision, iv.estimate, iv.lo, iv.hi, margin, n)
        if name == "cost":
            crit.note = (f"projected cost per 1,000 requests: primary {1000 * c.cost_p / n:.4g}, "
                         f"challenger {1000 * c.cost_c / n:.4g}")
        if decision == UNDECIDED:
            self._eta(crit, _hist_variance(hist, lo, hi), n)
        return crit

    def _judge_error(self, c: Cell, margin: float, kind: str) -> Criterion:
        n, s1, s2 = c.err_n, c.err_l - c.err_w, c.err_l + c.err_w
        iv = stats.asymptotic_cs(n, s1, s2, self.alpha, self.p.n_tune)
        var = stats.sample_variance(n, s1, s2)
        gates = self.p.gates
        crit = Criterion("error", kind, UNDECIDED, iv.estimate, iv.lo, iv.hi, margin, n,
                         note=f"challenger alone wrong {c.err_l}, primary alone wrong {c.err_w}; "
                              f"primary error rate {_pct(c.err_p / n)}")
        if not stats.guard_met(n, s2, var, gates.min_pairs, gates.min_discordant):
            crit.note += (f"; too few pairs to decide yet ({n} of {gates.min_pairs} pairs, "
                          f"{s2} of {gates.min_discordant} discordant)")
        elif iv.lo > margin:
            crit.decision = HARM
        elif iv.hi < margin:
            crit.decision = PASS
        if crit.decision == UNDECIDED:
            self._eta(crit, var, n)
            if s2 < gates.min_discordant:
                more = (gates.min_discordant - s2) * n / s2 if s2 else None
                if more is not None:
                    crit.eta_pairs = max(crit.eta_pairs or 0, math.ceil(more))
                    crit.eta_seconds = self._seconds(crit.eta_pairs)
        return crit

    def _eta(self, crit: Criterion, variance: float, n: int) -> None:
        if crit.estimate is None or crit.margin is None:
            return
        pairs = stats.eta_pairs(crit.estimate, crit.margin, variance, n, self.alpha,
                                self.p.n_tune, self.p.gates.min_pairs)
        crit.eta_pairs = pairs
        crit.eta_seconds = self._seconds(pairs)

    def _seconds(self, pairs: int | None) -> float | None:
        if pairs is None or not self.rate_per_s:
            return None
        return pairs / self.rate_per_s

    def _set_rate(self, data: ChallengerData, mature: Cell) -> None:
        """Mature labelled pairs per second of event time (the ETA's clock)."""
        now = self.agg.now_ms
        if not mature.mature_labelled or mature.mature_first_ms is None or now is None:
            return
        span_ms = now - (self.maturity_ms or 0) - mature.mature_first_ms
        if span_ms > 0:
            self.rate_per_s = mature.mature_labelled / (span_ms / 1000)

    # -- segments --------------------------------------------------------------------------

    def _segments(self, data: ChallengerData,
                  judged: dict[str, tuple[Guardrail, float]]) -> None:
        tests = [(segment, name, margin, data.segment(segment))
                 for segment in sorted(s for s in data.cells if s)
                 for name, (_g, margin) in judged.items()
                 if _count(data.segment(segment), name)]
        k = len(tests)
        if not k:
            return
        # (segment, its level, its e-BH "worse at all" log e-value, its cell)
        found = [(*self._segment(data, segment, name, cell, margin, k), cell)
                 for segment, name, margin, cell in tests]
        suspects = stats.e_bh([worse for _s, _l, worse, _c in found], self.alpha)
        for (seg, level, _worse, cell), suspect in zip(found, suspects, strict=True):
            seg.flagged = seg.log_evalue >= level
            seg.suspect = suspect
            if seg.flagged:
                self._segment_interval(data, seg, cell, self.alpha / k)
        self.segments = [s for s, _l, _w, _c in found]
        for s in self.segments:
            if s.flagged:
                bounds = _bounds(s.criterion, Criterion(s.criterion, "", "", lo=s.lo, hi=s.hi))
                self.rejects.append(
                    f"worse in {s.segment} by {_show(s.criterion, s.estimate)} {bounds} "
                    f"({_label(s.criterion)}, {s.pairs} pairs)")

    def _segment(self, data: ChallengerData, segment: str, name: str, cell: Cell,
                 margin: float, k: int) -> tuple[Segment, float, float]:
        """The segment's harm e-value and the level it must reach (Bonferroni over ``k``
        tests), and its "worse at all" e-value for e-BH."""
        n = _count(cell, name)
        if name == "error":
            estimate = (cell.err_l - cell.err_w) / n
            worse = stats.discordant_log_evalue(cell.err_w, cell.err_l)
            if margin > 0:
                # composite: the discordance rate's CS spends half of the test's alpha/k
                harm = stats.discordant_harm(cell.err_l, cell.err_w, n, margin, self.alpha / k)
                level = math.log(2 * k / self.alpha)
            else:
                harm, level = worse, math.log(k / self.alpha)
        else:
            lo, hi = data.spec.ranges(data.cap)[name]
            hist = _hist(getattr(cell, f"{name}_h"), data.spec.bins)
            estimate = _hist_mean(hist, lo, hi)
            # only the capital at two points: the interval is computed for flagged ones
            res = stats.BettingResult(stats.Interval(estimate, lo, hi), tuple(hist), lo, hi)
            harm, level = res.log_capital(margin)[0], math.log(k / self.alpha)
            worse = res.log_capital(0.0)[0]
        return Segment(segment, name, estimate, None, None, n, harm), level, worse

    def _segment_interval(self, data: ChallengerData, seg: Segment, cell: Cell,
                          alpha: float) -> None:
        if seg.criterion == "error":
            iv = stats.asymptotic_cs(cell.err_n, cell.err_l - cell.err_w,
                                     cell.err_l + cell.err_w, alpha, self.p.n_tune)
        else:
            lo, hi = data.spec.ranges(data.cap)[seg.criterion]
            iv = stats.betting_cs(_hist(getattr(cell, f"{seg.criterion}_h"), data.spec.bins),
                                  lo, hi, alpha).interval
        seg.lo, seg.hi = iv.lo, iv.hi

    # -- gates and the decision ------------------------------------------------------------

    def _gates(self, data: ChallengerData, everything: Cell, mature: Cell) -> None:
        g = self.p.gates
        published = everything.rows + data.orphans
        completeness = everything.rows / published if published else 0.0
        span_s = ((everything.last_ms - everything.first_ms) / 1000
                  if everything.first_ms is not None and everything.last_ms is not None else 0)
        pairs = max((c.pairs for c in self.criteria if c.kind == "guardrail"), default=0)
        disc = mature.err_l + mature.err_w
        self.gates = [
            Gate("completeness", completeness, g.completeness, completeness >= g.completeness),
            Gate("min_pairs", pairs, g.min_pairs, pairs >= g.min_pairs),
            Gate("min_duration_s", span_s, g.min_duration_s, span_s >= g.min_duration_s),
            Gate("maturity_ms", self.maturity_ms, g.maturity_quantile,
                 self.maturity_ms is not None),
        ]
        if any(c.name == "error" and c.kind == "guardrail" for c in self.criteria):
            self.gates.insert(2, Gate("min_discordant", disc, g.min_discordant,
                                      disc >= g.min_discordant))
        if completeness < g.completeness:
            self.inconclusive.append(
                f"broken coverage: join completeness {_pct(completeness)} "
                f"({everything.rows} joined of {published}; {data.orphans} predictions never "
                f"joined) below {_pct(g.completeness)}")

    def _decide(self, everything: Cell) -> tuple[str, list[str]]:
        if self.rejects:
            return REJECT, self.rejects
        if self.inconclusive:
            return INCONCLUSIVE, self.inconclusive
        label_crits = [c for c in self.criteria if c.kind in ("guardrail", "success")]
        if everything.labelled == 0 and (label_crits or self.p.guardrails):
            return INCONCLUSIVE, [f"no labels yet: none of {everything.rows} requests labelled"]
        if self.p.guardrails and not label_crits:
            return INCONCLUSIVE, ["no criterion of the policy applies to these outputs"]
        holds = [f"{gate_reason(g)}" for g in self.gates if not g.passed]
        holds += [_hold_reason(c) for c in self.criteria
                  if c.kind in ("guardrail", "limit", "success")
                  and c.decision not in (PASS, IMPROVED)]
        if not holds:
            return PROMOTE, ["every gate passed and every guardrail holds within its margin"] + [
                f"{_label(c.name)}: {_show(c.name, c.estimate)} {_bounds(c.name, c)} within "
                f"{_show(c.name, c.margin)}" for c in self.criteria if c.kind == "guardrail"]
        return HOLD, holds


# -- helpers ----------------------------------------------------------------------------------

def _available(c: Cell, name: str) -> int:
    """Labelled pairs, mature or not, that the criterion applies to."""
    return {"brier": c.prob_rows, "log_loss": c.prob_rows, "abs_error": c.reg_rows}.get(
        name, c.cls_rows)


def _count(c: Cell, name: str) -> int:
    return c.err_n if name == "error" else getattr(c, f"{name}_n")


def _hist(counts: list[int], bins: int) -> list[int]:
    return list(counts) + [0] * (bins - len(counts))


def _hist_mean(hist: list[int], lo: float, hi: float) -> float:
    n = sum(hist)
    width = (hi - lo) / len(hist)
    return sum(k * (lo + (i + 0.5) * width) for i, k in enumerate(hist) if k) / n if n else 0.0


def _hist_variance(hist: list[int], lo: float, hi: float) -> float:
    n = sum(hist)
    if n < 2:
        return 0.0
    width = (hi - lo) / len(hist)
    s1 = s2 = 0.0
    for i, k in enumerate(hist):
        if k:
            x = lo + (i + 0.5) * width
            s1 += k * x
            s2 += k * x * x
    return stats.sample_variance(n, s1, s2)


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def _dur(ms: float) -> str:
    s = ms / 1000
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if s >= size:
            return f"{s / size:.1f} {unit}"
    return f"{s:.1f} s"


def _label(name: str) -> str:
    return {"error": "error rate", "abs_error": "absolute error", "log_loss": "log-loss",
            "brier": "Brier score", "cost": "cost per request"}.get(name, name)


def _show(name: str, x: float | None) -> str:
    """Error in accuracy points, the others in their loss units."""
    if x is None:
        return "n/a"
    if name == "error":
        return f"{100 * x:.1f} points"
    return f"{x:.4g}"


def _bounds(name: str, c: Criterion) -> str:
    if c.lo is None or c.hi is None:
        return ""
    if name == "error":
        return f"[{100 * c.lo:.1f}, {100 * c.hi:.1f}]"
    return f"[{c.lo:.4g}, {c.hi:.4g}]"


def gate_reason(g: Gate) -> str:
    if g.name == "min_duration_s":
        return f"gate min_duration: {_dur(1000 * (g.value or 0))} of {_dur(1000 * g.required)}"
    if g.name == "maturity_ms":
        return ("gate maturity: label delays not yet seen to their "
                f"{g.required:.0%} quantile (Kaplan-Meier)")
    if g.name == "completeness":
        return f"gate completeness: {_pct(g.value)} below {_pct(g.required)}"
    return f"gate {g.name}: {g.value:g} of {g.required:g}"


def _hold_reason(c: Criterion) -> str:
    text = (f"{_label(c.name)} undecided: {_show(c.name, c.estimate)} {_bounds(c.name, c)}"
            f" vs margin {_show(c.name, c.margin)}" if c.kind != "limit" else
            f"{c.name} undecided against the limit {_pct(c.margin)}"
            f" ({_pct(c.estimate)} [{_pct(c.lo)}, {_pct(c.hi)}])")
    if c.kind == "success":
        text = text.replace("undecided", "improvement not shown yet")
    if c.eta_pairs is not None:
        text += f"; ~{c.eta_pairs:,} more labelled pairs"
        if c.eta_seconds is not None:
            text += f" (~{_dur(1000 * c.eta_seconds)} at the current rate)"
    elif c.note and c.estimate is None:
        text += f"; {c.note}"
    return text
