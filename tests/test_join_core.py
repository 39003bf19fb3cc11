"""Joiner core against the real embedded Redis: any arrival order, duplicates, orphans, OOM.

The core is driven directly (no Faust) so hundreds of orders run in seconds; the worker tests
(test_join_worker.py) run the same logic through Kafka and a real worker process.
"""

from __future__ import annotations

import random
import uuid
from typing import Any

import pytest

from shadowpipe.config import Settings
from shadowpipe.processors.join.core import JoinCore
from shadowpipe.processors.join.store import StoreError
from shadowpipe.processors.runtime.message import Message
from shadowpipe.schemas.codec import Codec

CODEC = Codec()
T0 = 1_700_000_000_000
IGNORED = ("version", "joined_at")


# -- workload and oracle (shared with test_join_worker) ------------------------------------


def make_requests(rng: random.Random, n: int, challengers: int = 2) -> list[dict[str, Any]]:
    """Requests with their inference, shadow predictions and 0-2 feedbacks (distinct times)."""
    out = []
    for i in range(n):
        rid = f"r{i}-{rng.getrandbits(24):06x}"
        inf = {
            "request_id": rid, "event_time": T0 + i * 10, "model": "m", "model_version": "3",
            "num_features": {f"f{k}": rng.random() for k in range(rng.choice((2, 6)))},
            "cat_features": {"country": rng.choice(("FR", "DE"))}, "null_features": ["f9"],
            "output": {"label": "a", "probabilities": {"a": 0.7, "b": 0.3}, "value": None},
            "latency_ms": 2.5, "context": {"tenant": "t1"},
            "inclusion_prob": rng.choice((1.0, 0.5)),
            "trace_id": rng.choice((None, f"tr{i}")),
        }
        preds = []
        for c in range(challengers):
            failed = rng.random() < 0.1
            preds.append({
                "request_id": rid, "challenger": f"c{c}", "challenger_version": "v1",
                "is_control": c == 0, "event_time": inf["event_time"],
                "scored_at": inf["event_time"] + 5,
                "output": None if failed else {"label": rng.choice("ab"), "probabilities": {},
                                               "value": None},
                "model_time_ms": 0.3, "queue_lag_ms": 4.0,
                "error": "boom" if failed else None, "error_kind": "exception" if failed else None,
            })
        feedbacks = [
            {"request_id": rid, "label": rng.choice("ab"), "value": None,
             "event_time": inf["event_time"] + 1000 * (k + 1), "source": "explicit",
             "weight": 1.0, "inclusion_prob": rng.choice((1.0, 0.25))}
            for k in range(rng.choice((0, 0, 1, 2)))
        ]
        out.append({"id": rid, "inference": inf, "predictions": preds, "feedback": feedbacks})
    return out


def messages_of(req: dict[str, Any]) -> list[tuple[str, bytes]]:
    """(topic kind, encoded value) of every message of a request."""
    msgs = [("inference", CODEC.encode("InferenceEvent", req["inference"]))]
    msgs += [("predictions", CODEC.encode("ShadowPrediction", p)) for p in req["predictions"]]
    msgs += [("feedback", CODEC.encode("Feedback", f)) for f in req["feedback"]]
    return msgs


def expected_records(req: dict[str, Any]) -> dict[tuple[str, str], dict[str, Any]]:
    """The final JoinedRecord of each (request, challenger), built from the contract alone."""
    inf = req["inference"]
    fb = max(req["feedback"], key=lambda f: f["event_time"]) if req["feedback"] else None
    out = {}
    for p in req["predictions"]:
        out[(req["id"], p["challenger"])] = {
            "request_id": req["id"], "challenger": p["challenger"],
            "challenger_version": p["challenger_version"], "is_control": p["is_control"],
            "state": "labelled" if fb else "predicted", "event_time": inf["event_time"],
            "model": inf["model"], "model_version": inf["model_version"],
            "context": inf["context"], "num_features": inf["num_features"],
            "cat_features": inf["cat_features"], "null_features": inf["null_features"],
            "primary_output": inf["output"], "primary_latency_ms": inf["latency_ms"],
            "shadow_output": p["output"], "shadow_error": p["error"],
            "shadow_error_kind": p["error_kind"], "model_time_ms": p["model_time_ms"],
            "queue_lag_ms": p["queue_lag_ms"],
            "label": fb["label"] if fb else None, "label_value": fb["value"] if fb else None,
            "label_time": fb["event_time"] if fb else None,
            "label_delay_ms": fb["event_time"] - inf["event_time"] if fb else None,
            "feedback_source": fb["source"] if fb else None,
            "feedback_weight": fb["weight"] if fb else 1.0,
            "inclusion_prob": inf["inclusion_prob"] * (fb["inclusion_prob"] if fb else 1.0),
            "trace_id": inf["trace_id"],
        }
    return out


def latest(records: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
    """What a sink keeping the highest version per (request, challenger) ends with."""
    best: dict[tuple[str, str], dict[str, Any]] = {}
    for rec in records:
        key = (rec["request_id"], rec["challenger"])
        if key not in best or rec["version"] > best[key]["version"]:
            best[key] = rec
    return {k: {f: v for f, v in r.items() if f not in IGNORED} for k, r in best.items()}


# -- fixtures ---------------------------------------------------------------------------------


@pytest.fixture
def join_settings(stack_settings: Settings) -> Settings:
    """Own Redis keys per test (the key prefix follows the topic prefix)."""
    return stack_settings.replace(topic_prefix=f"j{uuid.uuid4().hex[:10]}.")


def msg(kind: str, partition: int, offset: int, key: bytes | None, value: bytes) -> Message:
    """A consumed message of input ``kind`` (the core takes a kind for a topic)."""
    return Message(value, key, kind, partition, offset)


def run(core: JoinCore, msgs: list[Message], now_ms: int = T0, batch: int = 7) -> list[dict]:
    out = []
    for start in range(0, len(msgs), batch):
        result = core.process(msgs[start:start + batch], now_ms=now_ms)
        out += [CODEC.decode(value, "JoinedRecord") for _, value in result.joined]
    return out


def shuffled_messages(rng: random.Random, reqs: list[dict], dup_rate: float) -> list[Message]:
    raw = [m for req in reqs for m in messages_of(req)]
    raw += [m for m in raw if rng.random() < dup_rate]  # duplicates: new messages, same bytes
    rng.shuffle(raw)
    offsets: dict[str, int] = {}
    msgs = []
    for kind, value in raw:
        offsets[kind] = offsets.get(kind, -1) + 1
        msgs.append(msg(kind, 0, offsets[kind], None, value))
    return msgs


# -- tests ------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(8))
def test_any_order_with_duplicates_reaches_the_expected_state(
    join_settings: Settings, seed: int
) -> None:
    rng = random.Random(seed)
    reqs = make_requests(rng, 40)
    core = JoinCore(join_settings)
    records = run(core, shuffled_messages(rng, reqs, dup_rate=0.3), batch=rng.choice((1, 5, 50)))

    keys = [(r["request_id"], r["challenger"], r["version"]) for r in records]
    assert len(keys) == len(set(keys)), "a (request, challenger, version) was emitted twice"
    expected = {k: v for req in reqs for k, v in expected_records(req).items()}
    assert latest(records) == expected
    # Versions grow with content: the highest carries the label whenever there is one.
    assert core.stats()["part_duplicate"] > 0


def test_duplicate_that_changes_nothing_emits_nothing(join_settings: Settings) -> None:
    req = make_requests(random.Random(1), 1)[0]
    core = JoinCore(join_settings)
    kinds = messages_of(req)
    first = run(core, [msg(k, 0, n, None, v) for n, (k, v) in enumerate(kinds)])
    again = run(core, [msg(k, 1, n, None, v) for n, (k, v) in enumerate(kinds)])
    assert first and again == []


def test_redelivered_message_reemits_same_version(join_settings: Settings) -> None:
    """After a crash between the Redis write and the publish, the replay must re-emit."""
    req = make_requests(random.Random(2), 1)[0]
    req["feedback"] = []
    core = JoinCore(join_settings)
    msgs = [msg(k, 0, n, None, v) for n, (k, v) in enumerate(messages_of(req))]
    first = run(core, msgs)
    replay = run(core, msgs[-1:])  # the shadow that completed the last join, same offset
    assert len(replay) == 1
    assert (replay[0]["challenger"], replay[0]["version"]) in {
        (r["challenger"], r["version"]) for r in first}
    assert core.stats()["reemitted_predicted"] == 1


def test_later_feedback_replaces_label_and_bumps_version(join_settings: Settings) -> None:
    req = make_requests(random.Random(3), 1, challengers=1)[0]
    inf, pred = req["inference"], req["predictions"][0]
    late = {"request_id": req["id"], "label": "b", "event_time": inf["event_time"] + 9000}
    early = {**late, "label": "a", "event_time": inf["event_time"] + 100}
    core = JoinCore(join_settings)
    recs = run(core, [
        msg("inference", 0, 0, None, CODEC.encode("InferenceEvent", inf)),
        msg("feedback", 0, 0, None, CODEC.encode("Feedback", late)),
        msg("predictions", 0, 0, None, CODEC.encode("ShadowPrediction", pred)),
        msg("feedback", 0, 1, None, CODEC.encode("Feedback", early)),  # older: ignored
    ], batch=1)
    assert [(r["version"], r["state"], r["label"], r["label_delay_ms"]) for r in recs] == [
        (1, "labelled", "b", 9000)]


def test_horizon_orphans_late_feedback_and_tombstones(join_settings: Settings) -> None:
    settings = join_settings.replace(feedback_horizon_s=2)
    core = JoinCore(settings)
    reqs = make_requests(random.Random(4), 3, challengers=1)
    joined, no_primary, unknown = reqs
    fb = {"request_id": joined["id"], "label": "b", "event_time": T0 + 50_000}
    stray_fb = {"request_id": unknown["id"], "label": "a", "event_time": T0 + 1}
    run(core, [
        msg("inference", 0, 0, None, CODEC.encode("InferenceEvent", joined["inference"])),
        msg("predictions", 0, 0, None,
                CODEC.encode("ShadowPrediction", joined["predictions"][0])),
        msg("predictions", 0, 1, None,
                CODEC.encode("ShadowPrediction", no_primary["predictions"][0])),
        msg("feedback", 0, 0, None, CODEC.encode("Feedback", stray_fb)),
    ])
    claim, early = core.sweep(now_ms=T0 + 1000)
    assert early.joined == [] and claim.handled == 0  # nothing is due before the horizon

    claim, result = core.sweep(now_ms=T0 + 2001)
    orphans = {(r["request_id"], r["challenger"]): r for r in
               (CODEC.decode(v, "JoinedRecord") for _, v in result.joined)}
    assert orphans[(no_primary["id"], "c0")]["state"] == "orphan_prediction"
    assert orphans[(no_primary["id"], "c0")]["event_time"] == no_primary["inference"]["event_time"]
    assert orphans[(unknown["id"], "")]["state"] == "orphan_feedback"
    assert orphans[(unknown["id"], "")]["label"] == "a"
    assert len(orphans) == 2
    assert core.finish(claim) == 2
    assert core.store.pending() == 0

    late = run(core, [msg("feedback", 0, 5, None, CODEC.encode("Feedback", fb)),
                      msg("feedback", 0, 6, None, CODEC.encode("Feedback", fb))],
               now_ms=T0 + 3000)
    assert [(r["request_id"], r["challenger"], r["state"], r["version"]) for r in late] == [
        (joined["id"], "", "orphan_feedback", 1)]
    stats = core.stats()
    assert stats["orphan_feedback_late"] == 1
    assert stats["orphan_feedback_unknown"] == 1
    assert stats["orphan_prediction_no_primary"] == 1
    assert stats["swept_unlabelled"] == 1


def test_claimed_orphans_are_reissued_until_finished(join_settings: Settings) -> None:
    """A sweeper that dies after claiming: the next sweep re-publishes the same versions."""
    core = JoinCore(join_settings.replace(feedback_horizon_s=1), lease_s=1)
    req = make_requests(random.Random(5), 1, challengers=1)[0]
    pred = CODEC.encode("ShadowPrediction", req["predictions"][0])
    run(core, [msg("predictions", 0, 0, None, pred)])
    _, first = core.sweep(now_ms=T0 + 1001)
    claim, again = core.sweep(now_ms=T0 + 2002)  # lease of the first claim expired
    assert first.joined and [CODEC.decode(v, "JoinedRecord")["version"] for _, v in again.joined] \
        == [CODEC.decode(v, "JoinedRecord")["version"] for _, v in first.joined]
    assert core.finish(claim) == 1


def test_bad_messages_are_dead_lettered(join_settings: Settings) -> None:
    core = JoinCore(join_settings)
    bad_pred = {**make_requests(random.Random(6), 1)[0]["predictions"][0], "challenger": ""}
    result = core.process([
        msg("inference", 0, 0, b"k", b"\x99garbage"),
        msg("predictions", 0, 0, b"k", CODEC.encode("ShadowPrediction", bad_pred)),
    ])
    letters = [CODEC.decode(v, "DeadLetter") for _, v in result.dead]
    assert [(d["error_kind"], d["source_topic"]) for d in letters] == [
        ("decode", join_settings.topic("inference")),
        ("invalid", join_settings.topic("predictions"))]
    assert core.stats()["deadletter_invalid"] == 1


def test_redis_out_of_memory_is_an_error_and_a_counter(join_settings: Settings) -> None:
    core = JoinCore(join_settings)
    client = core.store.client
    reqs = make_requests(random.Random(7), 20)
    msgs = [msg(k, 0, n, None, v)
            for n, (k, v) in enumerate(m for r in reqs for m in messages_of(r))]
    client.config_set("maxmemory", 1)  # the stack runs noeviction: every write is refused
    try:
        with pytest.raises(StoreError) as err:
            core.process(msgs)
        assert err.value.oom
        assert core.stats()["redis_oom"] == 1
    finally:
        client.config_set("maxmemory", 0)
    # Nothing was lost: the same batch succeeds once memory is available.
    assert {r["request_id"] for r in run(core, msgs, batch=len(msgs))} == {r["id"] for r in reqs}
