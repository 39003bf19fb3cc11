"""The verdict's data: aggregation queries over ``joined_records FINAL``, never rows.

1. **Criteria** (:func:`query_sql`), per challenger and segment value, in one pass:
   operational counts over every request (failures, timeouts, model time over the SLO,
   output-constraint violations, disagreement with the primary); over the *mature* labelled
   requests (event time at least d99 before ``now``) the paired criteria: 0/1 error as
   discordant counts (L = only the challenger wrong, W = only the primary wrong), and
   histograms of the bounded differences (Brier, clipped log-loss, capped absolute error,
   cost) in ``bins`` equal-width bins (``countResample``: a fixed array per group, no
   per-row allocation), with the primary's loss sums (relative margins, projected cost);
   and the label-delay histograms: the delay of labelled requests and the age of unlabelled
   ones (on the data clock ``now``, the latest event or label time stored) in log-spaced
   bins of a third of an octave (:func:`age_edges_ms`), over all requests and over those
   where the arms differ, which give the Kaplan-Meier horizon d99 (:func:`horizon`).
2. The query needs d99 and measures it: the horizon of the previous evaluation in the
   process is used and checked; the first one gets it from :func:`maturity_sql` (the delay
   histograms alone), and the criteria query runs again only if the horizon grew.
3. Label rates by primary decision (:func:`decisions_sql`, a warning), refreshed at most
   every ``DECISIONS_TTL_S`` per process.

The overall cell of a challenger is the sum of the cells of the first segment attribute's
values (requests without the attribute form the value ""), so each attribute costs one
grouping, and without segments there is one plain GROUP BY. The paired criteria cover the
requests both arms answered; the challenger's failures (errors, timeouts, no output) are
judged by their own critical limit, which must pass before any PROMOTE.

>>> age_bin(0), age_bin(999), age_bin(1000), age_bin(8000)
(0, 0, 1, 10)
>>> [round(e) for e in age_edges_ms()[:4]]
[0, 1000, 1260, 1587]
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, fields
from typing import Any

from shadowpipe.config import Settings
from shadowpipe.processors.verdict import stats
from shadowpipe.processors.verdict.policy import CRITERIA, ChallengerPolicy, Policy
from shadowpipe.tables import database

AGE_BINS = 80  # bin 0: under 1 s; bin k: [2^((k-1)/3), 2^(k/3)) s; the last one is open
_BINS_PER_OCTAVE = 3
_MIN_DISC_EVENTS = 30  # discordant labels needed before their own delay curve counts
# Versions of a (challenger, request) share its event time, hence its monthly partition:
# FINAL need not merge across partitions (a partition in one part is read as is).
SETTINGS = " SETTINGS do_not_merge_across_partitions_select_final = 1"


def age_edges_ms() -> list[float]:
    """Lower edges of the age bins, ms, plus the upper edge of the last closed one."""
    return [0.0] + [1000.0 * 2 ** ((k - 1) / _BINS_PER_OCTAVE) for k in range(1, AGE_BINS + 1)]


def age_bin(ms: float) -> int:
    """The age/delay bin of ``ms`` (same formula as the SQL)."""
    octaves = math.log2(max(ms, 1.0) / 1000)
    return min(AGE_BINS - 1, max(0, 1 + math.floor(_BINS_PER_OCTAVE * octaves)))


def _sql_bin(expr: str) -> str:
    # Branch-free (no if()): a conditional here cost a sixth of the criteria query.
    return (f"toUInt32(least({AGE_BINS - 1}, greatest(0, 1 + floor({_BINS_PER_OCTAVE} * "
            f"log2(greatest(toFloat64({expr}), 1.) / 1000)))))")


def _q(text: str) -> str:
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _f(x: float) -> str:
    return repr(float(x))


@dataclass(frozen=True)
class Spec:
    """What the SQL needs of a challenger's policy; challengers with equal specs share a query."""

    bins: int
    clip: float
    cap: float | None
    cost: tuple[tuple[str, str, float], ...]
    cost_default: float
    cost_lo: float
    cost_hi: float
    slo_ms: float
    allowed: tuple[str, ...] | None
    value_range: tuple[float, float] | None
    criteria: tuple[str, ...] = CRITERIA  # the bounded ones not listed are not computed
    labels: str = "all"

    @classmethod
    def of(cls, p: ChallengerPolicy) -> Spec:
        lo, hi = p.cost_range()
        wanted = {g.name for g in p.guardrails} | ({p.success.criterion} if p.success else set())
        if not p.cost_matrix and not (p.declared and "cost" in wanted) and not (
                p.success and p.success.criterion == "cost"):
            wanted.discard("cost")  # without a matrix cost is the error rate again
        return cls(p.bins, p.log_loss_clip, p.abs_error_cap, p.cost_matrix, p.cost_default,
                   lo, hi, p.limits.latency_slo_ms, p.limits.allowed_labels,
                   p.limits.value_range, tuple(c for c in CRITERIA if c in wanted), p.labels)

    def ranges(self, cap: float) -> dict[str, tuple[float, float]]:
        """The [lo, hi] range of each bounded difference (challenger - primary)."""
        ll = -math.log(self.clip) + math.log1p(-self.clip)
        span = self.cost_hi - self.cost_lo
        return {"brier": (-2.0, 2.0), "log_loss": (-ll, ll), "abs_error": (-cap, cap),
                "cost": (-span, span)}


_ADDITIVE = ("rows", "failed", "timeouts", "slow", "timed", "violations", "compared",
             "disagree", "labelled", "mature", "mature_labelled", "cls_rows", "prob_rows",
             "reg_rows", "err_n", "err_l", "err_w",
             "err_p", "brier_n", "brier_p", "log_loss_n", "log_loss_p", "abs_error_n",
             "abs_error_p", "cost_n", "cost_p", "cost_c", "delay_wrong_n", "delay_wrong_s",
             "delay_right_n", "delay_right_s")
HISTS = ("brier_h", "log_loss_h", "abs_error_h", "cost_h")


@dataclass
class Cell:
    """Additive counts of one (challenger, segment); ``+`` merges cells.

    Operational counts and ``labelled`` cover every request; the criteria (``err_*``,
    ``*_n``, ``*_p``, histograms) only the mature labelled ones.
    """

    rows: int = 0
    failed: int = 0  # no usable challenger output (error, timeout, nothing)
    timeouts: int = 0
    slow: int = 0  # model time over the SLO
    timed: int = 0  # model time known
    violations: int = 0
    compared: int = 0  # both arms answered
    disagree: int = 0
    labelled: int = 0
    mature: int = 0  # requests older than the maturity horizon
    mature_labelled: int = 0
    cls_rows: int = 0  # labelled classification pairs, mature or not (criteria that apply)
    prob_rows: int = 0
    reg_rows: int = 0
    err_n: int = 0
    err_l: int = 0
    err_w: int = 0
    err_p: int = 0
    brier_n: int = 0
    brier_p: float = 0.0
    log_loss_n: int = 0
    log_loss_p: float = 0.0
    abs_error_n: int = 0
    abs_error_p: float = 0.0
    cost_n: int = 0
    cost_p: float = 0.0
    cost_c: float = 0.0
    delay_wrong_n: int = 0
    delay_wrong_s: float = 0.0
    delay_right_n: int = 0
    delay_right_s: float = 0.0
    brier_h: list[int] = field(default_factory=list)
    log_loss_h: list[int] = field(default_factory=list)
    abs_error_h: list[int] = field(default_factory=list)
    cost_h: list[int] = field(default_factory=list)
    first_ms: int | None = None
    last_ms: int | None = None
    mature_first_ms: int | None = None
    is_control: bool = False

    def __add__(self, other: Cell) -> Cell:
        out = Cell()
        for name in _ADDITIVE:
            setattr(out, name, getattr(self, name) + getattr(other, name))
        for name in HISTS:
            a, b = getattr(self, name), getattr(other, name)
            if len(a) < len(b):
                a, b = b, a
            setattr(out, name, [x + (b[i] if i < len(b) else 0) for i, x in enumerate(a)])
        for name, pick in (("first_ms", min), ("last_ms", max), ("mature_first_ms", min)):
            both = [t for t in (getattr(self, name), getattr(other, name)) if t is not None]
            setattr(out, name, pick(both) if both else None)
        out.is_control = self.is_control or other.is_control
        return out


def total(cells: list[Cell]) -> Cell:
    out = Cell()
    for cell in cells:
        out = out + cell
    return out


@dataclass
class Delays:
    """Label-delay histograms of one challenger (per age/delay bin, :func:`age_edges_ms`)."""

    events: list[int] = field(default_factory=lambda: [0] * AGE_BINS)  # labelled, by delay
    censored: list[int] = field(default_factory=lambda: [0] * AGE_BINS)  # unlabelled, by age
    disc_events: list[int] = field(default_factory=lambda: [0] * AGE_BINS)
    disc_censored: list[int] = field(default_factory=lambda: [0] * AGE_BINS)
    # primary decision -> (mature requests, of them labelled): selective labels
    decisions: dict[str, tuple[int, int]] = field(default_factory=dict)

    def add(self, row: dict[str, Any]) -> None:
        """Add a query row's histograms."""
        for attr in ("events", "censored", "disc_events", "disc_censored"):
            mine = getattr(self, attr)
            for i, n in enumerate(row[attr]):
                mine[i] += int(n)



@dataclass
class ChallengerData:
    """One challenger's cells: ``cells[segment]`` (segment "" = overall)."""

    name: str
    spec: Spec
    cap: float  # the absolute-error cap in force (from the policy or the data)
    cells: dict[str, Cell] = field(default_factory=dict)
    orphans: int = 0  # predictions whose request never arrived (join completeness)
    delays: Delays = field(default_factory=Delays)
    maturity_ms: float | None = None  # the horizon d99 (None: unknown yet)

    @property
    def is_control(self) -> bool:
        return self.overall().is_control

    def overall(self) -> Cell:
        return self.cells.get("", Cell())

    def segment(self, name: str) -> Cell:
        return self.cells.get(name, Cell())


@dataclass
class Aggregates:
    """The aggregation of one evaluation: the data clock and each challenger's cells."""

    now_ms: int | None
    challengers: dict[str, ChallengerData]
    segments: tuple[str, ...] = ()


def horizon(delays: Delays, quantile: float) -> float | None:
    """The maturity horizon d99: Kaplan-Meier's ``quantile`` of the label delay, the larger
    of all requests' and (with enough of them) those where the arms differ; None: unknown.

    >>> d = Delays()
    >>> d.events[1], d.censored[40] = 500, 100   # labels after ~1 s, unlabelled ones old
    >>> horizon(d, 0.99)
    1259.92...
    """
    edges = age_edges_ms()
    found = _horizon(edges, delays.events, delays.censored, quantile)
    if found is not None and sum(delays.disc_events) >= _MIN_DISC_EVENTS:
        # the overall curve already showed that requests are followed long enough
        disc = _horizon(edges, delays.disc_events, delays.disc_censored, quantile,
                        trust_level=True)
        found = None if disc is None else max(found, disc)
    return found


def _horizon(edges: list[float], events: list[int], censored: list[int],
             q: float, trust_level: bool = False) -> float | None:
    """Kaplan-Meier's q-quantile of the delay.

    Some requests never get a label (partial feedback), so S(u) may level off above 1 - q.
    The horizon is then the q-quantile among the requests that do get labelled,
    S(u) - S_end <= (1 - q)(1 - S_end), trusted only once enough requests (100, and 1 %)
    are at least twice that old: the level is seen to hold, not assumed.

    >>> _horizon([0, 1, 2, 4, 8], [50, 0, 0, 0], [0, 0, 0, 150], 0.99)  # 25 % labelled
    1.0
    >>> _horizon([0, 1, 2, 4, 8], [50, 0, 0, 0], [0, 150, 0, 0], 0.99) is None  # too young
    True
    """
    curve = stats.kaplan_meier(edges, events, censored)
    found = stats.maturity_horizon(curve, q)
    if found is not None or not any(events):
        return found
    end = curve[-1][1]
    labelled = 1 - end
    found = next((u for u, s in curve if s - end <= (1 - q) * labelled + 1e-12), None)
    if found is None or trust_level:
        return found
    old = sum(n for lo_edge, n in zip(edges, censored, strict=False) if lo_edge >= 2 * found)
    total_n = sum(events) + sum(censored)
    return found if old >= max(100, 0.01 * total_n) else None


# -- SQL --------------------------------------------------------------------------------------

_FAILED = ("(shadow_error IS NOT NULL OR shadow_error_kind IS NOT NULL OR (shadow_label IS NULL "
           "AND shadow_value IS NULL AND empty(shadow_probabilities)))")
_LAB = "(label IS NOT NULL OR label_value IS NOT NULL)"
_CLS = "(primary_label IS NOT NULL AND label IS NOT NULL)"
_REG = "(primary_value IS NOT NULL AND label_value IS NOT NULL)"


def _counted(condition: str, labels: str) -> str:
    """``condition`` on the labels, restricted to those the policy counts."""
    return f"({condition} AND feedback_source = 'human')" if labels == "human" else condition
# Null checks first, then compare the unwrapped values: Nullable comparisons are slower.
_DIFF = ("(NOT x_failed AND ((isNotNull(primary_label) AND isNotNull(shadow_label) AND "
         "assumeNotNull(primary_label) != assumeNotNull(shadow_label)) OR "
         "(isNotNull(primary_value) AND isNotNull(shadow_value) AND "
         "abs(assumeNotNull(primary_value) - assumeNotNull(shadow_value)) > "
         "1e-9 * (1 + abs(assumeNotNull(primary_value))))))")
# The same without reading the challenger's error and probability columns (a failed
# challenger has no label or value, so it does not differ here either).
_DIFF_CHEAP = ("(ifNull(primary_label != shadow_label, 0) OR "
               "ifNull(abs(primary_value - shadow_value) > 1e-9 * (1 + abs(primary_value)), 0))")
_DELAY = "toFloat64(greatest(ifNull(label_delay_ms, 0), 0))"


def _where(challengers: tuple[str, ...], exclude: tuple[str, ...]) -> str:
    where = []
    if challengers:
        where.append("challenger IN (" + ", ".join(map(_q, challengers)) + ")")
    if exclude:
        where.append("challenger NOT IN (" + ", ".join(map(_q, exclude)) + ")")
    return f" WHERE {' AND '.join(where)}" if where else ""


def maturity_sql(db: str, challengers: tuple[str, ...], exclude: tuple[str, ...],
                 now_ms: int, labels: str = "all") -> str:
    """The label-delay histograms per challenger (the first evaluation's horizon).

    >>> "countResampleIf(0, 80, 1)" in maturity_sql("db", (), (), 0)
    True
    """
    age = _sql_bin(_age(now_ms))
    res = f"countResampleIf(0, {AGE_BINS}, 1)"
    return (f"SELECT challenger, {res}(delay, x_lab) AS events, "
            f"{res}(age, NOT x_lab) AS censored, "
            f"{res}(delay, x_lab AND x_differ) AS disc_events, "
            f"{res}(age, NOT x_lab AND x_differ) AS disc_censored "
            f"FROM (SELECT challenger, {age} AS age, {_sql_bin(_DELAY)} AS delay, "
            f"{_counted(_LAB, labels)} AS x_lab, {_DIFF_CHEAP} AS x_differ "
            f"FROM {db}.joined_records FINAL{_where(challengers, exclude)}) "
            "GROUP BY challenger" + SETTINGS)


def decisions_sql(db: str, challengers: tuple[str, ...], exclude: tuple[str, ...],
                  cutoffs: dict[str, int], labels: str = "all") -> str:
    """Mature requests and labelled ones per challenger and primary decision (a narrow
    query: labels, decisions and times only) for the selective-labels warning.

    >>> "GROUP BY challenger, decision" in decisions_sql("db", (), (), {"c": 0})
    True
    """
    return (f"SELECT challenger, primary_label AS decision, count() AS n, "
            f"countIf({_counted(_LAB, labels)}) AS k "
            f"FROM {db}.joined_records FINAL{_where(challengers, exclude)} "
            f"{'AND' if challengers or exclude else 'WHERE'} primary_label IS NOT NULL AND "
            f"toUnixTimestamp64Milli(event_time) <= {_cutoff(cutoffs)} "
            "GROUP BY challenger, decision" + SETTINGS)


def _age(now_ms: int) -> str:
    # DateTime64(3) is epoch ms inside: plain arithmetic, no calendar (dateDiff cost ~0.5 s/1M)
    return f"toFloat64(greatest({int(now_ms)} - toUnixTimestamp64Milli(event_time), 0))"


def _cutoff(cutoffs: dict[str, int]) -> str:
    """The latest mature event time (ms) of the row's challenger, as SQL.

    One value for all (the usual case: label delays belong to requests, not challengers)
    is a constant; a challenger left out then gets its rows judged with the others'
    horizon, and the caller discards its label criteria (its horizon is unknown).
    """
    never = "toInt64(-9223372036854775807)"
    if not cutoffs:
        return never
    if len(set(cutoffs.values())) == 1:
        return f"toInt64({int(next(iter(cutoffs.values())))})"
    names = ", ".join(_q(n) for n in cutoffs)
    values = ", ".join(str(int(c)) for c in cutoffs.values())
    return (f"transform(challenger, CAST([{names}], 'Array(String)'), "
            f"CAST([{values}], 'Array(Int64)'), {never})")


def _brier(arm: str) -> str:
    p = f"{arm}_probabilities"
    return f"(L2SquaredNorm(mapValues({p})) - 2 * {p}[assumeNotNull(label)] + 1)"


def _log_loss(arm: str, clip: float) -> str:
    p = f"{arm}_probabilities"
    return f"(-log(least(greatest({p}[assumeNotNull(label)], {_f(clip)}), {_f(1 - clip)})))"


def _cost(arm: str, spec: Spec) -> str:
    pred = f"assumeNotNull({arm}_label)"
    keys = "[" + ", ".join(_q(f"{p}\x1f{t}") for p, t, _c in spec.cost) + "]"
    vals = "[" + ", ".join(_f(c) for _p, _t, c in spec.cost) + "]"
    fallback = f"if({pred} = assumeNotNull(label), 0., {_f(spec.cost_default)})"
    if not spec.cost:
        return fallback
    return (f"transform(concat({pred}, '\\x1f', assumeNotNull(label)), CAST({keys}, "
            f"'Array(String)'), CAST({vals}, 'Array(Float64)'), {fallback})")


def _hist(name: str, cond: str, diff: str, lo: str, hi: str, bins: int) -> str:
    index = (f"toUInt32(least({bins - 1}, greatest(0, floor(({diff} - {lo}) / ({hi} - {lo}) "
             f"* {bins}))))")
    return f"countResampleIf(0, {bins}, 1)({index}, {cond}) AS {name}"


def query_sql(db: str, spec: Spec, segments: tuple[str, ...], challengers: tuple[str, ...],
              exclude: tuple[str, ...], cutoffs: dict[str, int], cap: float,
              now_ms: int, skip: frozenset[str] = frozenset()) -> str:
    """The criteria query for the challengers sharing ``spec``; ``cutoffs``: the latest
    mature event time (ms) per challenger (absent: nothing is mature). It also carries the
    label-delay histograms, so a later evaluation checks its horizon in the same pass.
    The criteria in ``skip`` are not computed (as if the policy did not ask for them).

    >>> s = Spec(2000, 1e-4, 10.0, (), 1.0, 0.0, 1.0, 250.0, None, None)
    >>> sql = query_sql("db", s, ("clinic",), (), (), {"c1": 1_700_000_000_000}, 10.0, 0)
    >>> "GROUP BY challenger, s0" in sql and "FROM db.joined_records FINAL" in sql
    True
    """
    clip = spec.clip
    ll = _f(-math.log(clip) + math.log1p(-clip))
    span = _f(spec.cost_hi - spec.cost_lo)
    b = spec.bins
    violations = []
    if spec.allowed is not None:
        allowed = ", ".join(map(_q, spec.allowed))
        violations.append(f"(shadow_label IS NOT NULL AND shadow_label NOT IN ({allowed}))")
    if spec.value_range is not None:
        lo, hi = spec.value_range
        violations.append(f"(shadow_value IS NOT NULL AND NOT (shadow_value >= {_f(lo)} AND "
                          f"shadow_value <= {_f(hi)}))")
    violated = "(NOT x_failed AND (" + " OR ".join(violations) + "))" if violations else "0"
    if not segments:
        group, set_id, seg_out = "GROUP BY challenger", "0", ["'' AS s0"]
    elif len(segments) == 1:
        group, set_id, seg_out = "GROUP BY challenger, s0", "0", ["s0"]
    else:
        keys = [f"s{i}" for i in range(len(segments))]
        group = "GROUP BY GROUPING SETS (" + ", ".join(f"(challenger, {k})" for k in keys) + ")"
        set_id, seg_out = f"grouping({', '.join(keys)})", keys
    res = f"countResampleIf(0, {AGE_BINS}, 1)"
    cut = _cutoff(cutoffs)
    select = [
        "challenger", f"{set_id} AS set_id", *seg_out,
        "count() AS rows", "countIf(x_failed) AS failed",
        "countIf(shadow_error_kind = 'timeout') AS timeouts",
        f"countIf(model_time_ms > {_f(spec.slo_ms)}) AS slow",
        "countIf(model_time_ms IS NOT NULL) AS timed",
        f"countIf({violated}) AS violations",
        "countIf(NOT x_failed AND ((primary_label IS NOT NULL AND shadow_label IS NOT NULL) OR "
        "(primary_value IS NOT NULL AND shadow_value IS NOT NULL))) AS compared",
        "countIf(x_differ) AS disagree", "countIf(x_lab) AS labelled",
        "countIf(x_mature) AS mature", "countIf(x_mature AND x_lab) AS mature_labelled",
        "countIf(x_cls0) AS cls_rows", "countIf(x_reg0) AS reg_rows",
        "countIf(x_cls0 AND notEmpty(primary_probabilities)) AS prob_rows",
        "countIf(x_cls) AS err_n", "countIf(x_cls AND x_ec AND NOT x_ep) AS err_l",
        "countIf(x_cls AND x_ep AND NOT x_ec) AS err_w", "countIf(x_cls AND x_ep) AS err_p",
        "countIf(x_prob) AS brier_n", f"sumIf({_brier('primary')}, x_prob) AS brier_p",
        _hist("brier_h", "x_prob",
              f"({_brier('shadow')} - {_brier('primary')})", "-2.", "2.", b),
        "countIf(x_prob) AS log_loss_n",
        f"sumIf({_log_loss('primary', clip)}, x_prob) AS log_loss_p",
        _hist("log_loss_h", "x_prob",
              f"({_log_loss('shadow', clip)} - {_log_loss('primary', clip)})", f"-{ll}", ll, b),
        "countIf(x_reg) AS abs_error_n",
        f"sumIf(least(abs(primary_value - label_value), {_f(cap)}), x_reg) AS abs_error_p",
        _hist("abs_error_h", "x_reg",
              f"(least(abs(shadow_value - label_value), {_f(cap)}) - "
              f"least(abs(primary_value - label_value), {_f(cap)}))",
              f"-{_f(cap)}", _f(cap), b),
        "countIf(x_cls) AS cost_n", f"sumIf({_cost('primary', spec)}, x_cls) AS cost_p",
        f"sumIf({_cost('shadow', spec)}, x_cls) AS cost_c",
        _hist("cost_h", "x_cls",
              f"({_cost('shadow', spec)} - {_cost('primary', spec)})", f"-{span}", span, b),
        "countIf(x_lab AND x_ep0) AS delay_wrong_n",
        f"sumIf({_DELAY}, x_lab AND x_ep0) AS delay_wrong_s",
        "countIf(x_lab AND x_cls0 AND NOT x_ep0) AS delay_right_n",
        f"sumIf({_DELAY}, x_lab AND x_cls0 AND NOT x_ep0) AS delay_right_s",
        "toUnixTimestamp64Milli(min(event_time)) AS first_ms",
        "toUnixTimestamp64Milli(max(event_time)) AS last_ms",
        "toUnixTimestamp64Milli(minIf(event_time, x_mature)) AS mature_first_ms",
        "max(is_control) AS is_control",
        f"{res}(delay, x_lab) AS events", f"{res}(age, NOT x_lab) AS censored",
        f"{res}(delay, x_lab AND x_differ) AS disc_events",
        f"{res}(age, NOT x_lab AND x_differ) AS disc_censored",
    ]
    wanted = tuple(c for c in spec.criteria if c not in skip)
    select = [_skip(item, wanted) for item in select]
    inner = [
        "challenger", "is_control", "event_time", "label", "label_value", "label_delay_ms",
        "primary_label", "primary_probabilities", "primary_value", "shadow_label",
        "shadow_probabilities", "shadow_value", "shadow_error_kind", "model_time_ms",
        *[f"context[{_q(attr)}] AS s{i}" for i, attr in enumerate(segments)],
        f"{_FAILED} AS x_failed", f"{_counted(_LAB, spec.labels)} AS x_lab",
        f"{_counted(_CLS, spec.labels)} AS x_cls0",
        f"toUnixTimestamp64Milli(event_time) <= {cut} AS x_mature",
        "x_cls0 AND x_mature AND NOT x_failed AND shadow_label IS NOT NULL AS x_cls",
        f"{_counted(_REG, spec.labels)} AS x_reg0",
        "x_reg0 AND x_mature AND NOT x_failed AND shadow_value IS NOT NULL AS x_reg",
        f"{_DIFF} AS x_differ",
        "x_cls AND notEmpty(primary_probabilities) AND notEmpty(shadow_probabilities) AS x_prob",
        "x_cls0 AND assumeNotNull(primary_label) != assumeNotNull(label) AS x_ep0",
        "x_cls AND x_ep0 AS x_ep",
        "x_cls AND assumeNotNull(shadow_label) != assumeNotNull(label) AS x_ec",
        f"{_sql_bin(_age(now_ms))} AS age",
        f"{_sql_bin(_DELAY)} AS delay",
    ]
    return (f"SELECT {', '.join(select)} FROM (SELECT {', '.join(inner)} "
            f"FROM {db}.joined_records FINAL{_where(challengers, exclude)}) {group}" + SETTINGS)


def _skip(item: str, wanted: tuple[str, ...]) -> str:
    """A constant in place of an aggregate of a bounded criterion the policy does not use."""
    alias = item.rsplit(" AS ", 1)[-1]
    name, _, part = alias.rpartition("_")
    if name in CRITERIA and name != "error" and name not in wanted:
        return ("CAST([], 'Array(UInt64)')" if part == "h" else "0") + f" AS {alias}"
    return item


def _spec_groups(policy: Policy) -> list[tuple[Spec, tuple[str, ...], tuple[str, ...]]]:
    """(spec, only these challengers, all but these) per distinct spec."""
    default = Spec.of(policy.defaults)
    special: dict[Spec, list[str]] = {}
    for name in policy.overrides:
        spec = Spec.of(policy.for_challenger(name))
        if spec != default:
            special.setdefault(spec, []).append(name)
    others = tuple(n for names in special.values() for n in names)
    groups = [(default, (), others)]
    groups += [(spec, tuple(names), ()) for spec, names in special.items()]
    return groups


# (ClickHouse, database, challenger) -> the horizon of the previous evaluation in this
# process: the next one uses it and checks it in the same pass (one query, not two).
_HORIZONS: dict[tuple[str, str, str], float] = {}
DECISIONS_TTL_S = 600.0
_DECISIONS: dict[tuple[str, str, str], tuple[float, dict[str, tuple[int, int]]]] = {}


def aggregate(client: Any, settings: Settings, policy: Policy,
              now_ms: int | None = None) -> Aggregates:
    """Aggregate ``joined_records`` for every challenger, per distinct policy spec.

    The criteria query needs each challenger's maturity horizon and also measures it. A
    first evaluation in the process gets the horizons from the cheaper label-delay query;
    later ones reuse the previous horizons and run the criteria query again only when the
    horizon measured in that pass is longer (or much shorter) than the one used.
    ``now_ms`` defaults to the data clock (the latest event or label time stored).
    """
    db = database(settings)
    segments = settings.segments
    now_ms = now_ms if now_ms is not None else _data_clock(client, db)
    out: dict[str, ChallengerData] = {}
    if now_ms is None:
        return Aggregates(None, out, segments)
    groups = _spec_groups(policy)
    auto_cap = _auto_cap(client, db) if any(s.cap is None for s, _o, _e in groups) else 0.0
    absent = _absent(client, db)
    place = (settings.clickhouse, db)
    for spec, only, exclude in groups:
        cap = spec.cap if spec.cap is not None else auto_cap

        def member(name: str, only: tuple[str, ...] = only,
                   exclude: tuple[str, ...] = exclude) -> bool:
            return name in only if only else name not in exclude

        def quantile(name: str) -> float:
            return policy.for_challenger(name).gates.maturity_quantile

        used = {n: h for (c, d, n), h in _HORIZONS.items() if (c, d) == place and member(n)}
        if not used:
            delays = _delays(client, maturity_sql(db, only, exclude, now_ms, spec.labels))
            used = {n: h for n, d in delays.items()
                    if (h := horizon(d, quantile(n))) is not None}
        for attempt in range(2):
            found = _criteria(client, db, spec, segments, only, exclude, used, cap, now_ms,
                              absent)
            fresh = {n: horizon(d.delays, quantile(n)) for n, d in found.items()}
            stale = [n for n, h in fresh.items() if h is not None and (
                n not in used or h > used[n] + 1e-6 or used[n] > 2 * h)]
            if not stale or attempt:
                break
            used = {n: h for n, h in fresh.items() if h is not None}
        _decisions(client, db, place, only, exclude, found, {
            n: int(now_ms - h) for n, h in used.items() if n in found and fresh[n] is not None},
            spec.labels)
        for name, data in found.items():
            if fresh[name] is None or name not in used:
                data.maturity_ms = None  # not (or no longer) known: nothing counts as mature
                data.cells = {k: _operational(c) for k, c in data.cells.items()}
                _HORIZONS.pop((*place, name), None)
            else:
                data.maturity_ms = used[name]
                _HORIZONS[(*place, name)] = used[name]
        out.update(found)
    for name, orphans in _orphans(client, db).items():
        if name in out:
            out[name].orphans = orphans
    return Aggregates(now_ms, out, segments)


def _decisions(client: Any, db: str, place: tuple[str, str], only: tuple[str, ...],
               exclude: tuple[str, ...], found: dict[str, ChallengerData],
               cutoffs: dict[str, int], labels: str) -> None:
    """Label rates by primary decision, refreshed at most every DECISIONS_TTL_S per process
    (they feed a warning, not the decision, and cost a pass of their own)."""
    now = time.monotonic()
    fresh = {n: _DECISIONS[(*place, n)] for n in found
             if (*place, n) in _DECISIONS and now - _DECISIONS[(*place, n)][0] < DECISIONS_TTL_S}
    if cutoffs and len(fresh) < len(found):
        got: dict[str, dict[str, tuple[int, int]]] = {n: {} for n in found}
        for name, decision, n, k in client.query(
                decisions_sql(db, only, exclude, cutoffs, labels)).result_rows:
            if name in got:
                got[name][decision] = (int(n), int(k))
        fresh = {n: (now, got[n]) for n in found}
        _DECISIONS.update({(*place, n): v for n, v in fresh.items()})
    for name, (_t, decisions) in fresh.items():
        found[name].delays.decisions = dict(decisions)


def _criteria(client: Any, db: str, spec: Spec, segments: tuple[str, ...],
              only: tuple[str, ...], exclude: tuple[str, ...], horizons: dict[str, float],
              cap: float, now_ms: int, absent: frozenset[str]) -> dict[str, ChallengerData]:
    cutoffs = {n: int(now_ms - h) for n, h in horizons.items()}
    sql = query_sql(db, spec, segments, only, exclude, cutoffs, cap, now_ms, absent)
    found = _parse(client.query(sql), spec, segments, cap)
    if absent and _arrived(found, absent):  # written since _absent() looked
        sql = query_sql(db, spec, segments, only, exclude, cutoffs, cap, now_ms)
        found = _parse(client.query(sql), spec, segments, cap)
    return found


def _parse(result: Any, spec: Spec, segments: tuple[str, ...],
           cap: float) -> dict[str, ChallengerData]:
    names = list(result.column_names)
    found: dict[str, ChallengerData] = {}
    for row in result.result_rows:
        record = dict(zip(names, row, strict=True))
        name = record["challenger"]
        data = found.get(name) or found.setdefault(name, ChallengerData(name, spec, cap))
        _add_row(data, segments, record)
    return found


def _operational(cell: Cell) -> Cell:
    """The cell without its label criteria (computed with a horizon no longer valid)."""
    keep = ("rows", "failed", "timeouts", "slow", "timed", "violations", "compared",
            "disagree", "labelled", "cls_rows", "prob_rows", "reg_rows", "first_ms",
            "last_ms", "is_control")
    return Cell(**{k: getattr(cell, k) for k in keep})


def _delays(client: Any, sql: str) -> dict[str, Delays]:
    out: dict[str, Delays] = {}
    result = client.query(sql)
    names = list(result.column_names)
    for row in result.result_rows:
        record = dict(zip(names, row, strict=True))
        out.setdefault(record["challenger"], Delays()).add(record)
    return out


def _add_row(data: ChallengerData, segments: tuple[str, ...], row: dict[str, Any]) -> None:
    i, value = 0, ""
    if segments:
        mask, k = int(row["set_id"]), len(segments)
        i = next(i for i in range(k) if not mask >> (k - 1 - i) & 1) if k > 1 else 0
        value = row[f"s{i}"]
    cell = Cell(first_ms=row["first_ms"], last_ms=row["last_ms"],
                mature_first_ms=row["mature_first_ms"] if row["mature"] else None,
                is_control=bool(row["is_control"]))
    for f in fields(Cell):
        if f.name in _ADDITIVE:
            setattr(cell, f.name, row[f.name] or 0)  # a sum over no rows is NULL
        elif f.name in HISTS:
            setattr(cell, f.name, [int(n) for n in row[f.name]])
    if i == 0:  # the first attribute's values (or the one group) add up to the whole
        data.cells[""] = data.cells.get("", Cell()) + cell
        data.delays.add(row)
    if segments and value != "":
        data.cells[f"{segments[i]}={value}"] = cell


def _data_clock(client: Any, db: str) -> int | None:
    # Two maxima, not one of greatest(): max(event_time) is answered from part metadata
    # (event_time is the partition key), so only label_time is read.
    value = client.command(
        f"SELECT toUnixTimestamp64Milli(greatest((SELECT max(event_time) FROM "
        f"{db}.joined_records), ifNull((SELECT max(label_time) FROM {db}.joined_records), "
        f"toDateTime64(0, 3))))")
    return int(value) if value not in (None, "", 0, "0") else None


# The rows a criterion needs (as counted by the criteria query), by criterion.
_NEEDS = {"abs_error": "reg_rows", "brier": "prob_rows", "log_loss": "prob_rows"}


def _absent(client: Any, db: str) -> frozenset[str]:
    """The criteria no stored request has the outputs for (absolute error on a classifier,
    say): not computing them saves a third of the criteria query, and an empty one is
    "no data" either way. Reads only null maps and array sizes, and stops at a first row."""
    def none(where: str) -> str:
        return f"(SELECT count() = 0 FROM (SELECT 1 FROM {db}.joined_records WHERE {where} " \
               "LIMIT 1))"
    no_reg, no_prob = client.query(f"SELECT {none(_REG)}, "
                                   f"{none('notEmpty(primary_probabilities)')}").result_rows[0]
    return frozenset(c for c, rows in _NEEDS.items()
                     if (no_reg if rows == "reg_rows" else no_prob))


def _arrived(found: dict[str, ChallengerData], skipped: frozenset[str]) -> bool:
    return any(getattr(data.cells[""], _NEEDS[c]) for data in found.values()
               for c in skipped if "" in data.cells)


def _orphans(client: Any, db: str) -> dict[str, int]:
    rows = client.query(f"SELECT challenger, count() FROM {db}.orphans FINAL "
                        "WHERE state = 'orphan_prediction' GROUP BY challenger").result_rows
    return {name: int(n) for name, n in rows}


def _auto_cap(client: Any, db: str) -> float:
    """2 x the primary's 99th percentile absolute error: the cap when the policy sets none."""
    return float(client.command(
        f"SELECT greatest(ifNull(2 * quantileExact(0.99)(abs(primary_value - label_value)), 0),"
        f" 1e-9) FROM {db}.joined_records WHERE {_REG}"))
