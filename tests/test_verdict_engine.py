"""The verdict engine: its rules on hand-built aggregates (pure), then the whole cycle on
the real embedded ClickHouse against a direct computation."""

from __future__ import annotations

import math
import time
import uuid
from typing import Any

import pytest

from shadowpipe import tables
from shadowpipe.config import Settings
from shadowpipe.processors.monitor import sink
from shadowpipe.processors.verdict import aggregate as aggregate_module
from shadowpipe.processors.verdict import stats, store
from shadowpipe.processors.verdict.aggregate import (
    Aggregates,
    Cell,
    ChallengerData,
    Delays,
    Spec,
    age_bin,
    aggregate,
    horizon,
)
from shadowpipe.processors.verdict.engine import (
    HOLD,
    INCONCLUSIVE,
    PROMOTE,
    REJECT,
    RESET,
    Verdict,
    evaluate,
    latch,
)
from shadowpipe.processors.verdict.policy import ChallengerPolicy, Policy
from shadowpipe.schemas.codec import Codec
from shadowpipe.stores import clickhouse_client

DAY = 86_400_000
NOW = 1_800_000_000_000
OLD_BIN = 40  # ~ 9.7 days old: far beyond the 1 s label delays below
POLICY = Policy.parse('[defaults.gates]\nmin_duration = "1d"').for_challenger("c")
SPEC = Spec.of(POLICY)


def _cell(rows: int, *, labelled: int | None = None, losses: int = 0, wins: int = 0,
          primary_wrong: int = 0, failed: int = 0, timeouts: int = 0, slow: int = 0,
          disagree: int = 0, control: bool = False, mature: bool = True) -> Cell:
    """A cell of ``rows`` requests, ``labelled`` of them (the pairs mature unless not)."""
    labelled = rows if labelled is None else labelled
    pairs = labelled if mature else 0
    return Cell(rows=rows, failed=failed, timeouts=timeouts, slow=slow, timed=rows,
                compared=rows - failed, disagree=disagree, labelled=labelled,
                mature=rows if mature else 0, mature_labelled=pairs, cls_rows=labelled,
                err_n=pairs, err_l=losses, err_w=wins, err_p=primary_wrong,
                first_ms=NOW - 10 * DAY, last_ms=NOW - DAY,
                mature_first_ms=NOW - 10 * DAY if mature else None, is_control=control)


def _delays(labelled: int, unlabelled: int, delay_bin: int = 1, age: int = OLD_BIN) -> Delays:
    d = Delays()
    d.events[delay_bin], d.censored[age] = labelled, unlabelled
    return d


def _data(name: str, overall: Cell, segments: dict[str, Cell] | None = None,
          orphans: int = 0, delays: Delays | None = None) -> ChallengerData:
    delays = delays or _delays(overall.labelled, overall.rows - overall.labelled)
    data = ChallengerData(name, SPEC, 1.0, {"": overall, **(segments or {})}, orphans, delays)
    data.maturity_ms = horizon(delays, 0.99) if overall.labelled else None
    return data


def _agg(*data: ChallengerData) -> Aggregates:
    return Aggregates(NOW, {d.name: d for d in data}, ("clinic",))


def _verdict(data: ChallengerData, *others: ChallengerData, policy: ChallengerPolicy = POLICY,
             previous: Verdict | None = None) -> Verdict:
    return evaluate(_agg(data, *others), data.name, policy, previous, NOW)


def _criterion(v: Verdict, name: str) -> Any:
    return next(c for c in v.criteria if c.name == name)


# -- the four verdicts ------------------------------------------------------------------------

def test_equal_challenger_with_enough_pairs_is_promoted() -> None:
    v = _verdict(_data("c", _cell(20_000, losses=400, wins=400, primary_wrong=2000)))
    assert v.verdict == PROMOTE, v.reasons
    error = _criterion(v, "error")
    assert error.decision == "pass" and error.pairs == 20_000
    cs = stats.asymptotic_cs(20_000, 0, 800, 0.05)
    assert (error.estimate, error.lo, error.hi) == (0.0, cs.lo, cs.hi)
    assert error.hi < 0.01 and all(g.passed for g in v.gates)


def test_regression_beyond_the_margin_is_rejected_with_its_size() -> None:
    v = _verdict(_data("c", _cell(5000, losses=400, wins=150, primary_wrong=500)))
    assert v.verdict == REJECT
    assert v.reasons[0].startswith("error rate worse by 5.0 points [")
    assert _criterion(v, "error").lo > 0.01


def test_too_few_pairs_holds_with_an_eta() -> None:
    v = _verdict(_data("c", _cell(600, losses=15, wins=15, primary_wrong=60)))
    assert v.verdict == HOLD
    error = _criterion(v, "error")
    assert error.decision == "undecided" and error.eta_pairs and error.eta_pairs >= 400
    assert error.eta_seconds is not None and error.eta_seconds > 0
    assert any(r.startswith("gate min_pairs: 600 of 1000") for r in v.reasons)
    assert any("more labelled pairs" in r and "at the current rate" in r for r in v.reasons)


def test_always_timing_out_is_rejected_on_the_critical_limit() -> None:
    v = _verdict(_data("c", _cell(300, labelled=0, failed=300, timeouts=300)))
    assert v.verdict == REJECT
    assert v.reasons[0].startswith("critical limit: failed (errors + timeouts; 300 timeouts) "
                                   "100.0% of 300 requests")


def test_slow_challenger_is_rejected_on_the_latency_slo() -> None:
    v = _verdict(_data("c", _cell(2000, losses=20, wins=20, slow=600)))
    assert v.verdict == REJECT and "250 ms SLO" in v.reasons[0]


def test_no_labels_is_inconclusive_and_never_passes() -> None:
    v = _verdict(_data("c", _cell(5000, labelled=0)))
    assert v.verdict == INCONCLUSIVE
    assert v.reasons == ["no labels yet: none of 5000 requests labelled"]
    assert v.pending_share == 1.0


def test_broken_coverage_is_inconclusive() -> None:
    v = _verdict(_data("c", _cell(20_000, losses=400, wins=400), orphans=1000))
    assert v.verdict == INCONCLUSIVE and v.reasons[0].startswith(
        "broken coverage: join completeness 95.2%")


def test_a_control_that_disagrees_is_a_pipeline_fault() -> None:
    control = _data("copy", _cell(20_000, disagree=3, control=True))
    v = _verdict(_data("c", _cell(20_000, losses=400, wins=400, disagree=900)), control)
    assert v.verdict == INCONCLUSIVE
    assert v.reasons == ["pipeline fault: control copy disagrees with the primary on 3 of "
                         "20000 requests"]
    assert _verdict(control, _data("c", _cell(10))).verdict == INCONCLUSIVE


def test_excess_disagreement_over_the_control_is_reported() -> None:
    control = _data("copy", _cell(20_000, losses=0, wins=0, control=True))
    v = _verdict(_data("c", _cell(20_000, losses=400, wins=400, disagree=2000)), control)
    excess = _criterion(v, "excess_disagreement")
    assert excess.estimate == pytest.approx(0.1) and excess.lo < 0.1 < excess.hi
    assert "copy" in excess.note and v.verdict == PROMOTE


def test_young_cohorts_wait_for_label_maturity() -> None:
    # labels come after ~1 day; every request is half a day old: none is mature yet
    young = _cell(5000, labelled=4000, mature=False)
    v = _verdict(_data("c", young, delays=_delays(4000, 1000, age_bin(DAY), age_bin(DAY / 2))))
    assert v.verdict == HOLD and v.maturity_ms is not None and v.maturity_ms >= DAY
    assert _criterion(v, "error").pairs == 0
    assert any("no mature labelled pairs yet" in r for r in v.reasons)


def test_partial_feedback_needs_old_requests_before_the_horizon_is_trusted() -> None:
    # 20 % never labelled: the delay curve levels off at 0.2; with no request old enough to
    # show that the level holds, the horizon is unknown
    cell = _cell(5000, labelled=4000, mature=False)
    v = _verdict(_data("c", cell, delays=_delays(4000, 1000, age=3)))
    assert v.verdict == HOLD and v.maturity_ms is None
    assert any(r.startswith("gate maturity") for r in v.reasons)
    old = _verdict(_data("c", _cell(20_000, labelled=16_000, losses=400, wins=400)))
    assert old.maturity_ms is not None and old.verdict == PROMOTE


def test_discordant_labels_arriving_later_push_the_horizon() -> None:
    delays = _delays(10_000, 100)
    delays.disc_events[age_bin(DAY)] = 200
    assert horizon(delays, 0.99) >= DAY
    assert horizon(_delays(10_000, 100), 0.99) < 2000


def test_output_constraint_violations_are_a_critical_limit() -> None:
    policy = Policy.parse('[defaults.limits]\nallowed_labels = ["a", "b"]').for_challenger("c")
    cell = _cell(20_000, losses=400, wins=400)
    cell.violations = 1
    v = _verdict(_data("c", cell), policy=policy)
    assert v.verdict == REJECT
    assert v.reasons == ["critical limit: 1 outputs violate the output constraints (allowed: 0)"]
    cell.violations = 0
    assert _verdict(_data("c", cell), policy=policy).verdict == PROMOTE


def test_selective_labels_are_warned_about() -> None:
    cell = _cell(20_000, losses=400, wins=400)
    cell.delay_wrong_n, cell.delay_wrong_s = 2000, 2000 * 3_600_000.0
    cell.delay_right_n, cell.delay_right_s = 18_000, 18_000 * 5 * DAY
    data = _data("c", cell)
    data.delays.decisions = {"fraud": (1000, 900), "legit": (19_000, 2000)}
    v = _verdict(data)
    assert any(w.startswith("selective labels: the label rate depends on the primary's "
                            "decision (90.0% when it predicted 'fraud', 10.5% for 'legit')")
               for w in v.warnings)
    assert any("labels arrive sooner when the primary was wrong" in w for w in v.warnings)
    assert _verdict(_data("c", _cell(20_000, losses=400, wins=400))).warnings == []


# -- segments ---------------------------------------------------------------------------------

def test_a_segment_worse_beyond_the_margin_rejects_and_is_named() -> None:
    east = _cell(3000, losses=250, wins=80, primary_wrong=300)
    west = _cell(17_000, losses=150, wins=320, primary_wrong=1700)
    v = _verdict(_data("c", east + west, {"clinic=east": east, "clinic=west": west}))
    assert v.verdict == REJECT and v.flagged == ["clinic=east"]
    reason = next(r for r in v.reasons if r.startswith("worse in"))
    assert reason.startswith("worse in clinic=east by 5.7 points [")
    assert "clinic=east" in v.suspects and "clinic=west" not in v.suspects
    seg = next(s for s in v.segments if s.segment == "clinic=east")
    # K = 2 tests, each at alpha/2: the e-value (with the discordance rate's CS) at 2K/alpha
    assert seg.log_evalue >= math.log(2 * 2 / 0.05)


def test_null_segments_flag_nothing() -> None:
    segs = {f"clinic={i}": _cell(2000, losses=40, wins=40, primary_wrong=200) for i in range(8)}
    overall = Cell()
    for c in segs.values():
        overall = overall + c
    v = _verdict(_data("c", overall, segs))
    assert v.flagged == [] and v.suspects == [] and v.verdict == PROMOTE


# -- latching ---------------------------------------------------------------------------------

def test_reject_stands_until_the_policy_changes_or_a_reset() -> None:
    bad = _data("c", _cell(5000, losses=400, wins=150))
    first = _verdict(bad)
    good = _data("c", _cell(20_000, losses=400, wins=400))
    later = _verdict(good, previous=first)
    assert later.verdict == REJECT and later.latched
    assert later.reasons[0].startswith("latched since ") and "error rate worse" in later.reasons[0]
    assert any(r.startswith("now: ") for r in later.reasons)
    other_policy = Policy.parse("[defaults.guardrails]\nerror = {margin = 0.02}")
    assert _verdict(good, policy=other_policy.for_challenger("c"),
                    previous=first).verdict == PROMOTE
    reset = Verdict("c", RESET, NOW, ["reset"], first.policy_hash)
    assert _verdict(good, previous=reset).verdict == PROMOTE


def test_promote_stands_while_guardrails_hold_and_harm_revokes_it() -> None:
    promoted = _verdict(_data("c", _cell(20_000, losses=400, wins=400)))
    assert promoted.verdict == PROMOTE
    wobbly = _verdict(_data("c", _cell(20_000, losses=560, wins=400)), previous=promoted)
    assert wobbly.verdict == PROMOTE and wobbly.latched  # undecided now, but no harm
    harmed = _verdict(_data("c", _cell(20_000, losses=900, wins=300)), previous=promoted)
    assert harmed.verdict == REJECT and not harmed.latched
    assert harmed.reasons[0] == "promotion revoked: harm found after PROMOTE"


def test_segment_flags_are_latched_with_the_reject() -> None:
    east = _cell(3000, losses=250, wins=80)
    first = _verdict(_data("c", east, {"clinic=east": east}))
    calm = _cell(3000, losses=30, wins=30)
    later = _verdict(_data("c", calm, {"clinic=east": calm}), previous=first)
    assert later.verdict == REJECT and later.flagged == ["clinic=east"]


def test_latch_keeps_hold_and_inconclusive_fresh() -> None:
    old = Verdict("c", HOLD, 1, ["x"], "h", since_ms=1)
    assert latch(Verdict("c", INCONCLUSIVE, 2, ["y"], "h"), old).since_ms == 2
    assert latch(Verdict("c", HOLD, 3, ["z"], "h"), old).since_ms == 1


# -- the whole cycle on the embedded ClickHouse -------------------------------------------------

def _records(now_ms: int) -> list[dict[str, Any]]:
    """c-bad: 5 points worse overall and all of it in clinic=east; c-eq: equal; some unlabelled
    and young requests, a few timeouts, one request without a challenger output."""
    out = []
    for i in range(4000):
        t = now_ms - 3 * DAY + i * 60_000  # one a minute over ~2.8 days
        clinic = "east" if i % 4 == 0 else "west"
        truth = "a" if i % 3 else "b"
        p_ok = i % 10 != 0
        labelled = i % 5 != 4 and i < 3900  # the last 100 are still waiting
        for name in ("c-bad", "c-eq"):
            s_ok = p_ok if name == "c-eq" else (p_ok and not (clinic == "east" and i % 5 == 1))
            timeout = name == "c-eq" and i % 97 == 0
            other = "b" if truth == "a" else "a"
            probs = {truth: 0.8, other: 0.2}
            rec = {"request_id": f"r{i}", "challenger": name, "version": 2 if labelled else 1,
                   "state": "labelled" if labelled else "predicted", "event_time": t,
                   "context": {"clinic": clinic},
                   "primary_output": {"label": truth if p_ok else other,
                                      "probabilities": probs if p_ok else
                                      {truth: 0.2, other: 0.8}, "value": None},
                   "shadow_output": None if timeout else {
                       "label": truth if s_ok else other,
                       "probabilities": probs if s_ok else {truth: 0.2, other: 0.8},
                       "value": None},
                   "shadow_error": "timeout" if timeout else None,
                   "shadow_error_kind": "timeout" if timeout else None,
                   "model_time_ms": 5.0, "joined_at": t + 1000}
            if labelled:
                rec.update(label=truth, label_time=t + 3_600_000, label_delay_ms=3_600_000)
            out.append(rec)
    return out


@pytest.fixture
def ch_settings(stack_settings: Settings) -> Settings:
    return stack_settings.replace(clickhouse_database=f"v{uuid.uuid4().hex[:10]}",
                                  segments=("clinic",))


def test_aggregate_and_evaluate_on_clickhouse_match_a_direct_computation(
        ch_settings: Settings) -> None:
    s = ch_settings
    client = clickhouse_client(s)
    tables.migrate(client, s)
    now_ms = (int(time.time()) // 60) * 60_000
    records = _records(now_ms)
    codec = Codec()
    full = [codec.decode(codec.encode("JoinedRecord", r), "JoinedRecord") for r in records]
    # an older version of some pairs too: FINAL must keep only the latest
    stale = [{**r, "version": 0, "state": "predicted", "label": None} for r in full[:50]]
    for batch in (stale, full):
        cols = sink.joined_columns(batch)
        client.insert("joined_records", list(cols.values()), column_names=list(cols),
                      database=s.clickhouse_database, column_oriented=True)
    policy = Policy.parse('[defaults.gates]\nmin_duration = "1d"\nmin_pairs = 500')
    agg = aggregate(client, s, policy)
    assert agg.now_ms == max(r["label_time"] if r.get("label_time") else r["event_time"]
                             for r in records)

    for name in ("c-bad", "c-eq"):
        data, mine = agg.challengers[name], [r for r in records if r["challenger"] == name]
        overall = data.overall()
        assert overall.rows == 4000
        assert overall.failed == overall.timeouts == sum(1 for r in mine if r["shadow_error"])
        assert overall.labelled == sum(1 for r in mine if r.get("label"))
        assert data.delays.events[age_bin(3_600_000)] == overall.labelled
        assert sum(data.delays.events) == overall.labelled
        east = data.segment("clinic=east")
        assert east.rows == sum(1 for r in mine if r["context"]["clinic"] == "east")

    v_bad = evaluate(agg, "c-bad", policy.for_challenger("c-bad"), None, now_ms)
    # direct computation over the mature labelled pairs (label delay 1 h: KM horizon 1-1.26 h)
    maturity = v_bad.maturity_ms
    assert maturity is not None and 3_600_000 <= maturity <= 1.26 * 3_600_000 + 1
    cutoff = agg.now_ms - maturity
    bad = [r for r in records if r["challenger"] == "c-bad" and r.get("label")]
    mature = [r for r in bad if r["event_time"] <= int(cutoff)]
    every_mature = [r for r in records if r["challenger"] == "c-bad"
                    and r["event_time"] <= int(cutoff)]
    by_decision = agg.challengers["c-bad"].delays.decisions
    assert by_decision["a"] == (
        sum(1 for r in every_mature if r["primary_output"]["label"] == "a"),
        sum(1 for r in every_mature if r["primary_output"]["label"] == "a" and r.get("label")))
    losses = sum(1 for r in mature if r["shadow_output"]["label"] != r["label"]
                 and r["primary_output"]["label"] == r["label"])
    wins = sum(1 for r in mature if r["primary_output"]["label"] != r["label"]
               and r["shadow_output"]["label"] == r["label"])
    error = _criterion(v_bad, "error")
    assert error.pairs == len(mature) and error.estimate == pytest.approx(
        (losses - wins) / len(mature))
    expected = stats.asymptotic_cs(len(mature), losses - wins, losses + wins, 0.05)
    assert (error.lo, error.hi) == pytest.approx((expected.lo, expected.hi))
    assert v_bad.verdict == REJECT and "clinic=east" in v_bad.flagged
    east = [r for r in mature if r["context"]["clinic"] == "east"]
    seg = next(x for x in v_bad.segments if x.segment == "clinic=east" and x.criterion == "error")
    assert seg.pairs == len(east)

    brier = _criterion(v_bad, "brier")
    direct = sum(_brier(r["shadow_output"], r["label"]) - _brier(r["primary_output"], r["label"])
                 for r in mature) / len(mature)
    assert brier.estimate == pytest.approx(direct, abs=4 / 2000)  # bin centres: <= 1 bin

    # a cost matrix: projected cost per 1,000 requests of each arm, paired difference
    priced = Policy.parse('[defaults.cost]\nmatrix = {a = {b = 5.0}, b = {a = 1.0}}\n'
                          '[defaults.gates]\nmin_pairs = 500')
    cost = _criterion(evaluate(aggregate(client, s, priced), "c-bad",
                               priced.for_challenger("c-bad"), None, now_ms), "cost")

    def price(pred: str, truth: str) -> float:
        return {("a", "b"): 5.0, ("b", "a"): 1.0}.get((pred, truth), 0.0)

    per_arm = [sum(price(r[arm]["label"], r["label"]) for r in mature) / len(mature)
               for arm in ("primary_output", "shadow_output")]
    assert cost.estimate == pytest.approx(per_arm[1] - per_arm[0], abs=10 / 2000)
    assert f"primary {1000 * per_arm[0]:.4g}, challenger {1000 * per_arm[1]:.4g}" in cost.note

    # a remembered horizon that is too short is measured again in the same pass and redone
    aggregate_module._HORIZONS[(s.clickhouse, s.clickhouse_database, "c-bad")] = 1000.0
    redone = aggregate(client, s, policy).challengers["c-bad"]
    assert redone.maturity_ms == maturity
    assert redone.overall().err_n == len(mature)

    # the Verdict event carries the same decision (unflagged segments have no interval)
    event = codec.decode(codec.encode("Verdict", store.to_record(v_bad)), "Verdict")
    assert event["verdict"] == REJECT and event["flagged"] == v_bad.flagged
    assert any(seg["lo"] is None for seg in event["segments"])

    # the store: a state change is written once, latched and read back
    verdicts = store.run_verdicts(client, s, policy, now_ms=now_ms)
    assert {v.challenger: v.verdict for v in verdicts}["c-bad"] == REJECT
    assert all(v.changed for v in verdicts)
    again = store.run_verdicts(client, s, policy, now_ms=now_ms + 1000)
    assert not any(v.changed for v in again)
    latest = store.latest(client, s)
    assert latest["c-bad"].verdict == REJECT and latest["c-bad"].flagged == v_bad.flagged
    rows = client.query(f"SELECT challenger, verdict, criterion FROM {s.clickhouse_database}."
                        "verdicts ORDER BY challenger").result_rows
    assert [r[:2] for r in rows] == [(v.challenger, v.verdict) for v in verdicts]
    assert "error" in rows[0][2]
    store.reset(client, s, "c-bad", now_ms + 2000)
    assert store.latest(client, s, "c-bad")["c-bad"].verdict == RESET
    after = store.run_verdicts(client, s, policy, now_ms=now_ms + 3000)
    assert [v.changed for v in after if v.challenger == "c-bad"] == [True]


def _brier(out: dict[str, Any], label: str) -> float:
    probs = out["probabilities"]
    return sum(p * p for p in probs.values()) - 2 * probs.get(label, 0.0) + 1


def test_age_bin_matches_the_sql_bin_on_the_engine(settings: Settings) -> None:
    values = [-5.0, 0.0, 1.0, 500.0, 793.7, 794.0, 999.0, 999.999, 1000.0, 1259.9, 1260.0,
              1587.5, 2000.0, 86_400_000.0, 1e12, 1e15]
    values += [1000 * 2 ** (k / 3) * f for k in range(80) for f in (0.9999, 1.0001)]
    rows = ", ".join(f"({v!r})" for v in values)
    sql = (f"SELECT x, {aggregate_module._sql_bin('x')} FROM "
           f"values('x Float64', {rows}) ORDER BY x")
    got = {x: b for x, b in clickhouse_client(settings).query(sql).result_rows}
    assert got == {x: age_bin(x) for x in values}


def test_criteria_no_request_has_outputs_for_are_skipped_until_such_requests_arrive(
        ch_settings: Settings) -> None:
    s = ch_settings
    client = clickhouse_client(s)
    tables.migrate(client, s)
    now_ms = (int(time.time()) // 60) * 60_000
    codec = Codec()

    def insert(records: list[dict[str, Any]]) -> None:
        full = [codec.decode(codec.encode("JoinedRecord", r), "JoinedRecord") for r in records]
        cols = sink.joined_columns(full)
        client.insert("joined_records", list(cols.values()), column_names=list(cols),
                      database=s.clickhouse_database, column_oriented=True)

    insert(_records(now_ms)[:200])
    assert aggregate_module._absent(client, s.clickhouse_database) == {"abs_error"}
    regression = [{"request_id": f"q{i}", "challenger": "c-reg", "version": 2,
                   "state": "labelled", "event_time": now_ms - 2 * DAY + i * 60_000,
                   "context": {"clinic": "east"},
                   "primary_output": {"label": None, "probabilities": {}, "value": 1.0},
                   "shadow_output": {"label": None, "probabilities": {}, "value": 1.5},
                   "model_time_ms": 5.0, "joined_at": now_ms, "label_value": 1.25,
                   "label_time": now_ms - DAY, "label_delay_ms": 60_000} for i in range(30)]
    insert(regression)  # after the look: the criteria query sees them and asks again
    spec = Spec.of(Policy.parse("").defaults)
    found = aggregate_module._criteria(client, s.clickhouse_database, spec, (), (), (),
                                       {"c-reg": 60_000.0}, 10.0, now_ms,
                                       frozenset({"abs_error"}))
    cell = found["c-reg"].overall()
    assert cell.reg_rows == cell.abs_error_n == 30
    assert cell.abs_error_p == pytest.approx(30 * 0.25)
    assert sum(cell.abs_error_h) == 30
    assert aggregate_module._absent(client, s.clickhouse_database) == frozenset()


def test_policy_labels_human_counts_only_human_review_labels(ch_settings: Settings) -> None:
    s = ch_settings
    client = clickhouse_client(s)
    tables.migrate(client, s)
    now_ms = (int(time.time()) // 60) * 60_000
    records = _records(now_ms)
    for r in records:
        if r.get("label"):
            r["feedback_source"] = "human" if int(r["request_id"][1:]) % 3 == 0 else "explicit"
    codec = Codec()
    full = [codec.decode(codec.encode("JoinedRecord", r), "JoinedRecord") for r in records]
    cols = sink.joined_columns(full)
    client.insert("joined_records", list(cols.values()), column_names=list(cols),
                  database=s.clickhouse_database, column_oriented=True)
    gates = '[defaults.gates]\nmin_duration = "1d"\nmin_pairs = 500\n'
    every = aggregate(client, s, Policy.parse(gates))
    human_policy = Policy.parse('[defaults]\nlabels = "human"\n' + gates)
    human = aggregate(client, s, human_policy)
    for name in ("c-bad", "c-eq"):
        mine = [r for r in records if r["challenger"] == name]
        assert every.challengers[name].overall().labelled == sum(1 for r in mine if r.get("label"))
        assert human.challengers[name].overall().labelled == sum(
            1 for r in mine if r.get("feedback_source") == "human")
    v = evaluate(human, "c-bad", human_policy.for_challenger("c-bad"), None, now_ms)
    assert any("only human review labels" in w for w in v.warnings)
    assert 0 < _criterion(v, "error").pairs < _criterion(
        evaluate(every, "c-bad", Policy.parse(gates).for_challenger("c-bad"), None, now_ms),
        "error").pairs


def test_a_replay_run_is_judged_on_its_own_records_and_never_published(
        ch_settings: Settings) -> None:
    from shadowpipe.config import ConfigError
    from shadowpipe.processors.verdict.service import Evaluator

    client = clickhouse_client(ch_settings)
    live, replay = ch_settings, ch_settings.replace(run="june")
    codec = Codec()
    now_ms = (int(time.time()) // 60) * 60_000
    for s, name in ((live, "c-bad"), (replay, "c-eq")):
        tables.migrate(client, s)
        mine = [r for r in _records(now_ms) if r["challenger"] == name]
        full = [codec.decode(codec.encode("JoinedRecord", r), "JoinedRecord") for r in mine]
        cols = sink.joined_columns(full)
        client.insert("joined_records", list(cols.values()), column_names=list(cols),
                      database=tables.database(s), column_oriented=True)
    evaluator = Evaluator(live, lambda: client)
    outcome = evaluator.evaluate(run="june")
    assert [v["challenger"] for v in outcome.reply["verdicts"]] == ["c-eq"]
    assert outcome.reply["verdicts"][0]["what_if"] is True
    assert outcome.events == [] and outcome.changed == []
    assert [v["challenger"] for v in evaluator.evaluate().reply["verdicts"]] == ["c-bad"]
    with pytest.raises(ConfigError, match="SHADOWPIPE_RUN"):
        evaluator.evaluate("c-eq", reset=True, run="june")
