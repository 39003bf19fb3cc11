"""The verdict's data: one aggregation query over ``joined_records FINAL``, never rows.

Each result row is a *cell*: the additive counts of one (challenger, segment, age bin),
where segment is ``""`` (overall) or ``attr=value`` of a configured segment attribute
(``GROUPING SETS``: one scan for all of them) and the age bin is the request's age on the
data clock (``now``, the latest event or label time in the table) in log-spaced bins of
a third of an octave (:func:`age_edges_ms`). Grouping by age lets the engine keep, after
the Kaplan-Meier horizon is known, only the cohorts old enough for their labels to have
arrived, without a second scan.

Per cell: operational counts over every row (failures, timeouts, model time over the
SLO, output-constraint violations, disagreement with the primary), and for labelled rows
the paired criteria: 0/1 error as discordant counts (L = only the challenger wrong,
W = only the primary wrong), histograms of the bounded differences (Brier, clipped
log-loss, capped absolute error, cost) in ``bins`` equal-width bins, the primary's loss
sums (relative margins, projected cost), and the label-delay histogram that feeds
Kaplan-Meier. A challenger that failed on a request takes the worst loss there: missing
output never counts in its favour.

>>> age_bin(0), age_bin(999), age_bin(1000), age_bin(8000)
(0, 0, 1, 10)
>>> [round(e) for e in age_edges_ms()[:4]]
[0, 1000, 1260, 1587]
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field, fields
from typing import Any

from shadowpipe.processors.monitor.sink import database
from shadowpipe.processors.verdict.policy import ChallengerPolicy, Policy

from shadowpipe.config import Settings

AGE_BINS = 80  # bin 0: under 1 s; bin k: [2^((k-1)/3), 2^(k/3)) s; the last one is open
_BINS_PER_OCTAVE = 3


def age_edges_ms() -> list[float]:
    """Lower edges of the age bins, ms, plus the upper edge of the last closed one."""
    return [0.0] + [1000.0 * 2 ** ((k - 1) / _BINS_PER_OCTAVE) for k in range(1, AGE_BINS + 1)]


def age_bin(ms: float) -> int:
    """The age/delay bin of ``ms`` (same formula as the SQL)."""
    if ms < 1000:
        return 0
    return min(AGE_BINS - 1, 1 + math.floor(_BINS_PER_OCTAVE * math.log2(ms / 1000)))


def _sql_bin(expr: str) -> str:
    return (f"if({expr} < 1000, 0, toUInt32(least({AGE_BINS - 1}, "
            f"1 + floor({_BINS_PER_OCTAVE} * log2({expr} / 1000)))))")


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

    @classmethod
    def of(cls, p: ChallengerPolicy) -> Spec:
        lo, hi = p.cost_range()
        return cls(p.bins, p.log_loss_clip, p.abs_error_cap, p.cost_matrix, p.cost_default,
                   lo, hi, p.limits.latency_slo_ms, p.limits.allowed_labels,
                   p.limits.value_range)

    def ranges(self, cap: float) -> dict[str, tuple[float, float]]:
        """The [lo, hi] range of each bounded difference (challenger - primary)."""
        ll = -math.log(self.clip) + math.log1p(-self.clip)
        span = self.cost_hi - self.cost_lo
        return {"brier": (-2.0, 2.0), "log_loss": (-ll, ll), "abs_error": (-cap, cap),
                "cost": (-span, span)}


_ADDITIVE = ("rows", "failed", "timeouts", "slow", "timed", "violations", "compared",
             "disagree", "labelled", "err_n", "err_l", "err_w", "err_p",
             "brier_n", "brier_p", "log_loss_n", "log_loss_p", "abs_error_n", "abs_error_p",
             "cost_n", "cost_p", "cost_c", "delay_wrong_n", "delay_wrong_s",
             "delay_right_n", "delay_right_s", "unlabelled_disc")
_MAPS = ("brier_h", "log_loss_h", "abs_error_h", "cost_h", "delays", "delays_disc",
         "decisions", "decisions_labelled")


@dataclass
class Cell:
    """Additive counts of one (challenger, segment, age bin); ``+`` merges cells."""

    rows: int = 0
    failed: int = 0  # no usable challenger output (error, timeout, nothing)
    timeouts: int = 0
    slow: int = 0  # model time over the SLO
    timed: int = 0  # model time known
    violations: int = 0
    compared: int = 0  # both arms answered
    disagree: int = 0
    labelled: int = 0
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
    unlabelled_disc: int = 0
    brier_h: dict[int, int] = field(default_factory=dict)
    log_loss_h: dict[int, int] = field(default_factory=dict)
    abs_error_h: dict[int, int] = field(default_factory=dict)
    cost_h: dict[int, int] = field(default_factory=dict)
    delays: dict[int, int] = field(default_factory=dict)  # label-delay bin -> labelled rows
    delays_disc: dict[int, int] = field(default_factory=dict)
    decisions: dict[str, int] = field(default_factory=dict)  # primary label -> rows
    decisions_labelled: dict[str, int] = field(default_factory=dict)
    first_ms: int | None = None
    last_ms: int | None = None
    is_control: bool = False

    def __add__(self, other: Cell) -> Cell:
        out = Cell()
        for name in _ADDITIVE:
            setattr(out, name, getattr(self, name) + getattr(other, name))
        for name in _MAPS:
            merged = dict(getattr(self, name))
            for k, v in getattr(other, name).items():
                merged[k] = merged.get(k, 0) + v
            setattr(out, name, merged)
        firsts = [t for t in (self.first_ms, other.first_ms) if t is not None]
        lasts = [t for t in (self.last_ms, other.last_ms) if t is not None]
        out.first_ms = min(firsts) if firsts else None
        out.last_ms = max(lasts) if lasts else None
        out.is_control = self.is_control or other.is_control
        return out


def total(cells: Iterable[Cell]) -> Cell:
    out = Cell()
    for cell in cells:
        out = out + cell
    return out


@dataclass
class ChallengerData:
    """Every cell of one challenger: ``cells[segment][age_bin]`` (segment "" = overall)."""

    name: str
    spec: Spec
    cap: float  # the absolute-error cap in force (from the policy or the data)
    cells: dict[str, dict[int, Cell]] = field(default_factory=dict)
    orphans: int = 0  # predictions whose request never arrived (join completeness)

    @property
    def is_control(self) -> bool:
        return any(c.is_control for c in self.cells.get("", {}).values())

    def overall(self, min_bin: int = 0) -> Cell:
        return total(c for b, c in self.cells.get("", {}).items() if b >= min_bin)

    def segment(self, name: str, min_bin: int = 0) -> Cell:
        return total(c for b, c in self.cells.get(name, {}).items() if b >= min_bin)


@dataclass
class Aggregates:
    """The aggregation of one evaluation: the data clock and each challenger's cells."""

    now_ms: int | None
    challengers: dict[str, ChallengerData]
    segments: tuple[str, ...] = ()


# -- SQL --------------------------------------------------------------------------------------

_FAILED = ("(shadow_error IS NOT NULL OR shadow_error_kind IS NOT NULL OR (shadow_label IS NULL "
           "AND shadow_value IS NULL AND empty(shadow_probabilities)))")
_LAB = "(label IS NOT NULL OR label_value IS NOT NULL)"
_CLS = "(primary_label IS NOT NULL AND label IS NOT NULL)"
_REG = "(primary_value IS NOT NULL AND label_value IS NOT NULL)"
_DIFF = ("(NOT x_failed AND ((primary_label IS NOT NULL AND shadow_label IS NOT NULL AND "
         "primary_label != shadow_label) OR (primary_value IS NOT NULL AND shadow_value IS NOT "
         "NULL AND abs(primary_value - shadow_value) > 1e-9 * (1 + abs(primary_value)))))")


def _brier(arm: str) -> str:
    p = f"{arm}_probabilities"
    return f"(arraySum(x -> x * x, mapValues({p})) - 2 * {p}[assumeNotNull(label)] + 1)"


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
    return f"sumMapIf([{index}], [toUInt64(1)], {cond}) AS {name}"


def query_sql(db: str, spec: Spec, segments: tuple[str, ...], challengers: tuple[str, ...],
              exclude: tuple[str, ...], now_ms: int, cap: float) -> str:
    """The one aggregation query for the challengers sharing ``spec``.

    >>> s = Spec(2000, 1e-4, 10.0, (), 1.0, 0.0, 1.0, 250.0, None, None)
    >>> sql = query_sql("db", s, ("clinic",), (), (), 1_700_000_000_000, 10.0)
    >>> "GROUPING SETS" in sql and "FROM db.joined_records FINAL" in sql
    True
    """
    clip = spec.clip
    ll = _f(-math.log(clip) + math.log1p(-clip))
    span = _f(spec.cost_hi - spec.cost_lo)
    b = spec.bins
    seg_cols = [f"context[{_q(attr)}] AS s{i}" for i, attr in enumerate(segments)]
    where = []
    if challengers:
        where.append("challenger IN (" + ", ".join(map(_q, challengers)) + ")")
    if exclude:
        where.append("challenger NOT IN (" + ", ".join(map(_q, exclude)) + ")")
    violations = []
    if spec.allowed is not None:
        allowed = ", ".join(map(_q, spec.allowed))
        violations.append(f"(shadow_label IS NOT NULL AND shadow_label NOT IN ({allowed}))")
    if spec.value_range is not None:
        lo, hi = spec.value_range
        violations.append(f"(shadow_value IS NOT NULL AND NOT (shadow_value >= {_f(lo)} AND "
                          f"shadow_value <= {_f(hi)}))")
    violated = "(NOT x_failed AND (" + " OR ".join(violations) + "))" if violations else "0"
    keys = ["challenger", "age"]
    if segments:
        sets = ", ".join("(" + ", ".join(keys + ([f"s{i}"] if i >= 0 else [])) + ")"
                         for i in range(-1, len(segments)))
        group = f"GROUP BY GROUPING SETS ({sets})"
        set_id = f"grouping({', '.join(f's{i}' for i in range(len(segments)))})"
        seg_out = [f"s{i}" for i in range(len(segments))]
    else:
        group, set_id, seg_out = "GROUP BY challenger, age", "0", []
    delay = "toFloat64(greatest(ifNull(label_delay_ms, 0), 0))"
    select = [
        "challenger", "age", f"{set_id} AS set_id", *seg_out,
        "count() AS rows", "countIf(x_failed) AS failed",
        "countIf(shadow_error_kind = 'timeout') AS timeouts",
        f"countIf(model_time_ms > {_f(spec.slo_ms)}) AS slow",
        "countIf(model_time_ms IS NOT NULL) AS timed",
        f"countIf({violated}) AS violations",
        "countIf(NOT x_failed AND ((primary_label IS NOT NULL AND shadow_label IS NOT NULL) OR "
        "(primary_value IS NOT NULL AND shadow_value IS NOT NULL))) AS compared",
        "countIf(x_differ) AS disagree", "countIf(x_lab) AS labelled",
        "countIf(x_cls) AS err_n", "countIf(x_cls AND x_ec AND NOT x_ep) AS err_l",
        "countIf(x_cls AND x_ep AND NOT x_ec) AS err_w", "countIf(x_cls AND x_ep) AS err_p",
        "countIf(x_prob) AS brier_n", f"sumIf({_brier('primary')}, x_prob) AS brier_p",
        _hist("brier_h", "x_prob", f"(if(x_failed, 2., {_brier('shadow')}) - {_brier('primary')})",
              "-2.", "2.", b),
        "countIf(x_prob) AS log_loss_n",
        f"sumIf({_log_loss('primary', clip)}, x_prob) AS log_loss_p",
        _hist("log_loss_h", "x_prob",
              f"(if(x_failed, {_f(-math.log(clip))}, {_log_loss('shadow', clip)}) - "
              f"{_log_loss('primary', clip)})", f"-{ll}", ll, b),
        "countIf(x_reg) AS abs_error_n",
        "sumIf(least(abs(primary_value - label_value), cap), x_reg) AS abs_error_p",
        _hist("abs_error_h", "x_reg",
              "(if(x_failed OR shadow_value IS NULL, cap, least(abs(shadow_value - label_value), "
              "cap)) - least(abs(primary_value - label_value), cap))", "-cap", "cap", b),
        "countIf(x_cls) AS cost_n", f"sumIf({_cost('primary', spec)}, x_cls) AS cost_p",
        f"sumIf(if(x_failed OR shadow_label IS NULL, {_f(spec.cost_hi)}, "
        f"{_cost('shadow', spec)}), x_cls) AS cost_c",
        _hist("cost_h", "x_cls",
              f"(if(x_failed OR shadow_label IS NULL, {_f(spec.cost_hi)}, {_cost('shadow', spec)})"
              f" - {_cost('primary', spec)})", f"-{span}", span, b),
        "countIf(x_cls AND x_ep) AS delay_wrong_n",
        f"sumIf({delay}, x_cls AND x_ep) AS delay_wrong_s",
        "countIf(x_cls AND NOT x_ep) AS delay_right_n",
        f"sumIf({delay}, x_cls AND NOT x_ep) AS delay_right_s",
        "countIf(NOT x_lab AND x_differ) AS unlabelled_disc",
        f"sumMapIf([{_sql_bin(delay)}], [toUInt64(1)], x_lab) AS delays",
        f"sumMapIf([{_sql_bin(delay)}], [toUInt64(1)], x_lab AND x_differ) AS delays_disc",
        "sumMapIf([assumeNotNull(primary_label)], [toUInt64(1)], primary_label IS NOT NULL) "
        "AS decisions",
        "sumMapIf([assumeNotNull(primary_label)], [toUInt64(1)], primary_label IS NOT NULL "
        "AND x_lab) AS decisions_labelled",
        "toUnixTimestamp64Milli(min(event_time)) AS first_ms",
        "toUnixTimestamp64Milli(max(event_time)) AS last_ms", "max(is_control) AS is_control",
    ]
    inner = [
        "challenger", "is_control", "event_time", "label", "label_value", "label_delay_ms",
        "primary_label", "primary_probabilities", "primary_value", "shadow_label",
        "shadow_probabilities", "shadow_value", "shadow_error_kind", "model_time_ms",
        *seg_cols, f"{_FAILED} AS x_failed", f"{_LAB} AS x_lab", f"{_CLS} AS x_cls",
        f"{_REG} AS x_reg", f"{_DIFF} AS x_differ",
        "x_cls AND notEmpty(primary_probabilities) AND (x_failed OR notEmpty(shadow_probabilities))"
        " AS x_prob",
        "x_cls AND primary_label != label AS x_ep",
        "x_cls AND (x_failed OR ifNull(shadow_label != label, 1)) AS x_ec",
        _sql_bin("toFloat64(greatest(dateDiff('millisecond', event_time, now_t), 0))")
        + " AS age",
    ]
    return (f"WITH fromUnixTimestamp64Milli(toInt64({now_ms})) AS now_t, {_f(cap)} AS cap "
            f"SELECT {', '.join(select)} FROM (SELECT {', '.join(inner)} "
            f"FROM {db}.joined_records FINAL"
            + (f" WHERE {' AND '.join(where)}" if where else "") + f") {group}")


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


def aggregate(client: Any, settings: Settings, policy: Policy,
              now_ms: int | None = None) -> Aggregates:
    """Aggregate ``joined_records`` for every challenger (one query per distinct spec).

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
    for spec, only, exclude in groups:
        cap = spec.cap if spec.cap is not None else auto_cap
        result = client.query(query_sql(db, spec, segments, only, exclude, now_ms, cap))
        names = list(result.column_names)
        for row in result.result_rows:
            _add_row(out, spec, cap, segments, dict(zip(names, row, strict=True)))
    for name, orphans in _orphans(client, db).items():
        if name in out:
            out[name].orphans = orphans
    return Aggregates(now_ms, out, segments)


def _add_row(out: dict[str, ChallengerData], spec: Spec, cap: float,
             segments: tuple[str, ...], row: dict[str, Any]) -> None:
    name = row["challenger"]
    data = out.get(name)
    if data is None:
        data = out[name] = ChallengerData(name, spec, cap)
    segment = ""
    mask = int(row["set_id"])
    full = (1 << len(segments)) - 1
    if segments and mask != full:
        i = next(i for i in range(len(segments)) if not mask >> (len(segments) - 1 - i) & 1)
        value = row[f"s{i}"]
        if value == "":
            return  # the attribute is missing from these requests' context
        segment = f"{segments[i]}={value}"
    cell = Cell(first_ms=row["first_ms"], last_ms=row["last_ms"],
                is_control=bool(row["is_control"]))
    for f in fields(Cell):
        if f.name in _ADDITIVE:
            setattr(cell, f.name, row[f.name] or 0)  # a sum over no rows is NULL
        elif f.name in _MAPS:
            keys, values = row[f.name]
            setattr(cell, f.name, {(int(k) if f.name != "decisions" and
                                    f.name != "decisions_labelled" else k): int(v)
                                   for k, v in zip(keys, values, strict=True)})
    data.cells.setdefault(segment, {})[int(row["age"])] = cell


def _data_clock(client: Any, db: str) -> int | None:
    value = client.command(
        f"SELECT toUnixTimestamp64Milli(max(greatest(event_time, ifNull(label_time, "
        f"event_time)))) FROM {db}.joined_records")
    return int(value) if value not in (None, "", 0, "0") else None


def _orphans(client: Any, db: str) -> dict[str, int]:
    rows = client.query(f"SELECT challenger, count() FROM {db}.orphans FINAL "
                        "WHERE state = 'orphan_prediction' GROUP BY challenger").result_rows
    return {name: int(n) for name, n in rows}


def _auto_cap(client: Any, db: str) -> float:
    """2 x the primary's 99th percentile absolute error: the cap when the policy sets none."""
    return float(client.command(
        f"SELECT greatest(ifNull(2 * quantileExact(0.99)(abs(primary_value - label_value)), 0),"
        f" 1e-9) FROM {db}.joined_records WHERE {_REG}"))
