"""The emitter against the real embedded broker: round trips, outages, hostile inputs."""

from __future__ import annotations

import asyncio
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from shadowpipe import kafka
from shadowpipe.config import ConfigError, Settings
from shadowpipe.producers import Emitter, current_request_id, is_sampled, use_request_id
from shadowpipe.producers.emitter import fast_emitter
from shadowpipe.schemas.codec import Codec
from shadowpipe.stack import EmbeddedStack
from tests.conftest import assign_from_start, free_port

QUIET = {"log_level": 0}


def consume(settings: Settings, kinds: dict[str, str], expected: int,
            timeout_s: float = 30.0) -> dict[str, list[dict]]:
    """Decode messages of topic kind -> schema name until ``expected`` arrived."""
    codec = Codec()
    topics = {settings.topic(kind): name for kind, name in kinds.items()}
    consumer = kafka.consumer(settings, f"test-{uuid.uuid4().hex}")
    assign_from_start(consumer, settings, *topics)
    out: dict[str, list[dict]] = {name: [] for name in kinds.values()}
    deadline = time.monotonic() + timeout_s
    try:
        while sum(map(len, out.values())) < expected and time.monotonic() < deadline:
            for msg in consumer.consume(500, timeout=0.5):
                if msg.error():
                    continue
                record = codec.decode(msg.value(), topics[msg.topic()])
                assert msg.key() == record["request_id"].encode()
                out[topics[msg.topic()]].append(record)
    finally:
        consumer.close()
    return out


def test_round_trip_fields_and_sampling(settings: Settings) -> None:
    emitter = Emitter(settings, producer_sample_rates=("*=0.5",))
    sent: dict[str, dict] = {}
    for i in range(200):
        rid = f"req-{i}"
        features = {"amount": i * 1.5, "items": i, "country": "DE" if i % 2 else "FR",
                    "referrer": None}
        output = {"label": "fraud" if i % 3 else "ok", "probabilities": {"fraud": 0.25,
                                                                           "ok": 0.75}}
        if emitter.emit_inference(rid, features, output, model="fraud", version="3",
                                  latency_ms=0.5 + i, context={"device": "ios"},
                                  ts=1_700_000_000_000 + i, trace_id=f"t{i}"):
            sent[rid] = {"features": features, "output": output, "i": i}
        emitter.emit_feedback(rid, "ok", ts=1_700_000_100_000 + i)
    assert emitter.close(timeout=20) == 0
    stats = emitter.stats()
    assert 60 < len(sent) < 140 and stats.delivered == stats.sent == 2 * len(sent)
    assert stats.sampled_out == 2 * (200 - len(sent)) and not stats.dropped and not stats.failed
    got = consume(settings, {"inference": "InferenceEvent", "feedback": "Feedback"},
                  2 * len(sent))
    inference = {r["request_id"]: r for r in got["InferenceEvent"]}
    assert set(inference) == set(sent) == {r["request_id"] for r in got["Feedback"]}
    assert all(is_sampled(rid, 0.5) for rid in sent)
    for rid, record in inference.items():
        i = sent[rid]["i"]
        assert record == {
            "request_id": rid, "event_time": 1_700_000_000_000 + i, "model": "fraud",
            "model_version": "3", "num_features": {"amount": i * 1.5, "items": float(i)},
            "cat_features": {"country": "DE" if i % 2 else "FR"}, "null_features": ["referrer"],
            "output": {**sent[rid]["output"], "value": None}, "latency_ms": 0.5 + i,
            "context": {"device": "ios"}, "inclusion_prob": 0.5, "trace_id": f"t{i}",
        }
    feedback = got["Feedback"][0]
    assert feedback["label"] == "ok" and feedback["inclusion_prob"] == 0.5


def test_broker_absent_at_start_then_started(tmp_path: Path) -> None:
    later = Settings.load(env={
        "SHADOWPIPE_HOME": str(tmp_path),
        "SHADOWPIPE_KAFKA_BOOTSTRAP": f"127.0.0.1:{free_port()}",
        "SHADOWPIPE_REDIS_URL": f"redis://127.0.0.1:{free_port()}/0",
        "SHADOWPIPE_TOPIC_PREFIX": "late.",
    })
    emitter = Emitter(later, producer_max_buffer_bytes=1 << 20,
                      kafka_overrides={**QUIET, "reconnect.backoff.max.ms": 500})
    features = {f"f{i}": float(i) for i in range(20)}
    start = time.monotonic()
    results = [emitter.emit_inference(f"r{i}", features, "ok", model="m", version="1",
                                      latency_ms=1.0) for i in range(3000)]
    assert time.monotonic() - start < 5  # never waits for the broker
    queued = emitter.stats()
    assert queued.sent == sum(results) and queued.dropped == {"queue_full": 3000 - queued.sent}
    assert 0 < queued.sent < 3000 and queued.queued == queued.sent
    stack = EmbeddedStack(later)
    try:
        stack.up()  # the broker keeps topics in memory: up() creates them at once
        assert emitter.close(timeout=60) == 0
        stats = emitter.stats()
        assert stats.delivered == stats.sent == queued.sent and not stats.failed
        got = consume(later, {"inference": "InferenceEvent"}, stats.sent)
        assert len({r["request_id"] for r in got["InferenceEvent"]}) == stats.sent
    finally:
        stack.down()


def test_unreachable_broker_is_counted_as_failed_at_close() -> None:
    down = Settings.load(env={"SHADOWPIPE_KAFKA_BOOTSTRAP": f"127.0.0.1:{free_port()}"})
    emitter = Emitter(down, kafka_overrides=QUIET)
    for i in range(50):
        assert emitter.emit_feedback(f"r{i}", "ok")
    assert emitter.close(timeout=0.5) == 50
    stats = emitter.stats()
    assert stats.failed_total == 50 and stats.delivered == 0 and stats.queued == 0
    assert emitter.emit_feedback("late", "ok") is False
    assert emitter.stats().dropped == {"closed": 1}


anything = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(),
                     st.binary(), st.lists(st.integers(), max_size=3))
mappings = st.dictionaries(st.one_of(st.text(max_size=5), st.integers()), anything, max_size=6)


call = st.tuples(
    st.sampled_from(["inference", "feedback"]),
    st.one_of(st.none(), st.text(max_size=8), st.integers()),
    st.one_of(anything, mappings), st.one_of(anything, mappings),
    st.one_of(anything, st.sampled_from(["m", ""])), st.one_of(anything, mappings),
)


def _never_raises_and_counts(settings: Settings, emit_one: Any) -> None:
    """Arbitrary calls (``emit_one(emitter, n, *drawn)``): never a raise, all counted."""
    emitter = Emitter(settings, kafka_overrides=QUIET, producer_max_event_bytes=2048)
    made = 0

    @hsettings(max_examples=300, deadline=None)
    @given(calls=st.lists(call, min_size=1, max_size=10))
    def check(calls: list) -> None:
        nonlocal made
        for drawn in calls:
            assert emit_one(emitter, made, *drawn) in (True, False)
            made += 1
        stats = emitter.stats()
        assert stats.sent + stats.dropped_total + stats.sampled_out == made
        assert "internal_error" not in stats.dropped

    try:
        check()
    finally:
        emitter.close(timeout=10)
    stats = emitter.stats()
    assert stats.delivered == stats.sent and not stats.failed


def test_arbitrary_inputs_never_raise_and_are_counted(settings: Settings) -> None:
    def emit_one(emitter: Emitter, _: int, kind: str, rid: Any, a: Any, b: Any, c: Any,
                 d: Any) -> bool:
        if kind == "inference":
            return emitter.emit_inference(rid, a, b, model=c, version="1", latency_ms=c,
                                          context=d, ts=c)
        return emitter.emit_feedback(rid, a, ts=b, source=c, weight=d, value=a)

    _never_raises_and_counts(settings, emit_one)


def test_arbitrary_plain_calls_never_raise_and_are_counted(settings: Settings) -> None:
    """The call shape the compiled emit takes (no ts): whatever it gets, never a raise."""
    def emit_one(emitter: Emitter, n: int, _: str, rid: Any, a: Any, b: Any, c: Any,
                 d: Any) -> bool:
        # Half the calls reuse one model so that they pass the memo into the C path.
        return emitter.emit_inference(rid, a, b, model="m" if n % 2 else c, version="1",
                                      latency_ms=1.5, context=d)

    _never_raises_and_counts(settings, emit_one)


def test_plain_calls_take_the_compiled_path_and_write_the_python_bytes(
        settings: Settings) -> None:
    emitter = Emitter(settings, kafka_overrides=QUIET)
    if fast_emitter is None:
        pytest.skip("the C extension is not built here")
    assert type(emitter.emit_inference).__name__ == "FastEmit"
    before = time.time_ns() // 1_000_000
    sent = {}
    for i in range(60):
        rid = f"fast-{i}-\u00e9" if i % 5 == 0 else f"fast-{i}"
        features = {"amount": i * 1.5, "items": i, "country": "DE", "referrer": None}
        output = {"label": "ok", "probabilities": {"fraud": 0.25, "ok": 0.75}} if i % 2 \
            else "fraud"
        trace = None if i % 3 else f"t{i}"
        assert emitter.emit_inference(rid, features, output, model="fraud", version="3",
                                      latency_ms=0.5 + i, context={"device": "ios"},
                                      trace_id=trace)
        sent[rid] = (features, output, 0.5 + i, trace)
    after = time.time_ns() // 1_000_000
    assert emitter.close(timeout=20) == 0
    stats = emitter.stats()
    assert stats.sent == stats.delivered == 60 and not stats.dropped and not stats.failed
    codec, encoder = Codec(), emitter._encoder
    records = consume(settings, {"inference": "InferenceEvent"}, 60)["InferenceEvent"]
    assert {r["request_id"] for r in records} == set(sent)
    for record in records:
        features, output, latency, trace = sent[record["request_id"]]
        assert before <= record["event_time"] <= after
        python = encoder.python_inference(
            record["request_id"].encode(), features, output,
            encoder.model_version("fraud", "3"), latency, {"device": "ios"},
            record["event_time"], 1.0, trace)
        assert codec.decode(python, "InferenceEvent") == record


def _compiled_emitter(settings: Settings, **kafka: Any) -> Emitter:
    if fast_emitter is None:
        pytest.skip("the C extension is not built here")
    return Emitter(settings, kafka_overrides={**QUIET, **kafka})


def _plain(emitter: Emitter, rid: str) -> bool:
    return emitter.emit_inference(rid, {"x": 1.5, "country": "DE"}, "ok", model="m",
                                  version="1", latency_ms=2.0)


def test_staged_events_reach_the_broker_when_the_service_goes_quiet(
        settings: Settings) -> None:
    """Fewer plain events than a burst: counted as queued, handed over by the emitter's
    thread once no event comes, delivered without any further call."""
    emitter = _compiled_emitter(settings)
    rids = {f"quiet-{i}" for i in range(5)}
    assert all(_plain(emitter, rid) for rid in sorted(rids))
    stats = emitter.stats()
    # The first call of a model takes the Python path (which memoises it): staged as well.
    assert emitter._stage.staged == 5 and stats.sent == 5 and stats.queued >= 5
    got = consume(settings, {"inference": "InferenceEvent"}, 5)["InferenceEvent"]
    assert {r["request_id"] for r in got} == rids and emitter._stage.staged == 0
    assert emitter.close(timeout=10) == 0 and emitter.stats().delivered == 5


def test_staged_events_from_racing_threads_are_each_delivered_once(
        settings: Settings) -> None:
    """Threads switching inside hand-overs (a 1 us switch interval): every event is
    staged, produced and delivered exactly once."""
    import sys
    import threading

    emitter = _compiled_emitter(settings)
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        threads = [threading.Thread(target=lambda t=t: [_plain(emitter, f"race-{t}-{i}")
                                                        for i in range(500)])
                   for t in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        sys.setswitchinterval(interval)
    assert emitter.close(timeout=30) == 0
    stats = emitter.stats()
    assert stats.sent == stats.delivered == 2000 and not stats.failed and not stats.dropped
    got = consume(settings, {"inference": "InferenceEvent"}, 2000)["InferenceEvent"]
    assert sorted(r["request_id"] for r in got) == sorted(
        f"race-{t}-{i}" for t in range(4) for i in range(500))


@pytest.mark.parametrize("compiled", [True, False], ids=["compiled", "python"])
def test_a_burst_waits_for_a_request_no_slower_than_usual(
        monkeypatch: pytest.MonkeyPatch, compiled: bool) -> None:
    """Past 16 staged events the burst goes with the first request whose latency is at
    most the running mean, so it does not land on the service's slow tail; 64 staged
    events go regardless. The same with and without the compiled stage."""
    from shadowpipe.producers import emitter as emitter_module

    monkeypatch.setattr(emitter_module, "STAGE_WAIT_MS", 600_000)  # no time-based burst
    if not compiled:
        monkeypatch.setattr(emitter_module, "fast_emitter", None)
    down = Settings.load(env={"SHADOWPIPE_KAFKA_BOOTSTRAP": f"127.0.0.1:{free_port()}"})
    emitter = _compiled_emitter(down) if compiled else Emitter(down, kafka_overrides=QUIET)
    assert (type(emitter._stage).__name__ == "FastEmit") is compiled
    made = 0

    def emit(count: int, latency_ms: float) -> int:
        nonlocal made
        for _ in range(count):
            assert emitter.emit_inference(f"r{made}", {"x": 1.0}, "ok", model="m",
                                          version="1", latency_ms=latency_ms)
            made += 1
        return emitter._stage.staged

    assert emit(16, 1.0) == 0  # no mean yet: the 16th carries the first burst
    assert emit(24, 9.0) == 24  # slower than usual: the burst waits
    assert emit(1, 0.5) == 0  # a quick request carries it
    assert emit(63, 1000.0) == 63 and emit(1, 1000.0) == 0  # the cap
    stats = emitter.stats()
    assert stats.sent == made and stats.queued >= made and not stats.dropped
    emitter.close(timeout=0)


def test_outage_drops_are_counted_in_c_and_logged_once(
        caplog: pytest.LogCaptureFixture) -> None:
    """Plain calls with no room left are dropped by the compiled path itself: counted as
    queue_full like the Python path's, and the reason is still logged (once)."""
    down = Settings.load(env={"SHADOWPIPE_KAFKA_BOOTSTRAP": f"127.0.0.1:{free_port()}"})
    emitter = _compiled_emitter(down, **{"queue.buffering.max.messages": 20})
    results = [_plain(emitter, f"r{i}") for i in range(200)]
    stats = emitter.stats()
    assert 0 < stats.sent == sum(results) < 200
    assert stats.dropped == {"queue_full": 200 - stats.sent}
    assert emitter._stage.full_drops == 200 - stats.sent  # the first call was staged
    assert sum("(queue_full)" in r.getMessage() for r in caplog.records) == 1
    emitter.close(timeout=0)


def test_queue_filled_behind_the_stage_fails_staged_events_by_reason() -> None:
    """Staged events librdkafka refuses when their burst is produced (its byte bound
    filled by another producer of the process) are counted as failed, never raised."""
    down = Settings.load(env={"SHADOWPIPE_KAFKA_BOOTSTRAP": f"127.0.0.1:{free_port()}"})
    emitter = _compiled_emitter(down, **{"queue.buffering.max.kbytes": 3})
    # The first call memoises the model on the Python path, which stages it too.
    assert all(_plain(emitter, f"r{i}") for i in range(4)) and emitter._stage.staged == 4
    with pytest.raises(BufferError):  # fill the byte bound to within 64 bytes
        while True:
            emitter._producer.produce(down.topic("inference"), b"x" * 64)
    assert emitter._stage.hand_over() == 4
    stats = emitter.stats()
    assert stats.sent == 4 and stats.failed == {"queue_full": 4} and not stats.dropped
    emitter.close(timeout=0)


def test_specific_invalid_inputs_are_counted_by_reason(settings: Settings) -> None:
    with Emitter(settings, kafka_overrides=QUIET, producer_max_event_bytes=512) as emitter:
        emit = emitter.emit_inference
        assert not emit("", {"x": 1.0}, "ok", model="m", version="1", latency_ms=1.0)
        assert not emit(None, {"x": 1.0}, "ok", model="m", version="1", latency_ms=1.0)
        assert not emit("r", {"x": float("inf")}, "ok", model="m", version="1", latency_ms=1.0)
        assert not emit("r", {"x": 1.0}, "ok", model="m", version="1", latency_ms=float("nan"))
        assert not emit("r", {"x": {1, 2}}, "ok", model="m", version="1", latency_ms=1.0)
        assert not emit("r", {f"f{i}": 1.0 for i in range(60)}, "ok", model="m", version="1",
                        latency_ms=1.0)
        assert not emitter.emit_feedback("r", None)
        assert emit("r", {"x": 1.0}, "ok", model="m", version="1", latency_ms=1.0)
        assert emitter.stats().dropped == {
            "missing_request_id": 2, "non_finite": 2, "unsupported_type": 1, "too_large": 1,
            "missing_outcome": 1,
        }


def test_tracked_predictions_sync_async_and_context_manager(settings: Settings) -> None:
    emitter = Emitter(settings)

    @emitter.track(model="churn", version="7", context=lambda feats: {"plan": "pro"})
    def predict(feats: dict) -> str:
        return "stay" if feats["tenure"] > 3 else "leave"

    @emitter.track(model="churn", version="7")
    async def apredict(feats: dict) -> float:
        await asyncio.sleep(0)
        return 0.25

    @emitter.track(model="churn", version="7")
    def broken(feats: dict) -> str:
        raise RuntimeError("model bug")

    assert predict({"tenure": 5}) == "stay"
    first = current_request_id()
    assert predict({"tenure": 1}) == "leave"
    second = current_request_id()
    assert first and second and first != second
    with use_request_id("own-id"):
        assert predict({"tenure": 9}) == "stay" and current_request_id() == "own-id"

    async def handler() -> str | None:
        await apredict({"tenure": 2})
        return current_request_id()

    async_id = asyncio.run(handler())
    with pytest.raises(RuntimeError, match="model bug"):
        broken({"tenure": 1})
    with emitter.inference(model="churn", version="7", features={"tenure": 4}) as call:
        call.output = {"label": "stay", "probabilities": {"stay": 0.9, "leave": 0.1}}
    assert emitter.emit_feedback(first, "stay")
    emitter.close(timeout=20)
    assert call.sent and emitter.stats().delivered == 6
    got = consume(settings, {"inference": "InferenceEvent", "feedback": "Feedback"}, 6)
    by_id = {r["request_id"]: r for r in got["InferenceEvent"]}
    assert set(by_id) == {first, second, "own-id", async_id, call.request_id}
    assert by_id[first]["context"] == {"plan": "pro"}
    assert by_id[first]["output"]["label"] == "stay" and by_id[async_id]["output"]["value"] == 0.25
    assert by_id[call.request_id]["output"]["probabilities"] == {"stay": 0.9, "leave": 0.1}
    assert [r["request_id"] for r in got["Feedback"]] == [first]


def test_config_errors_name_the_setting(settings: Settings) -> None:
    with pytest.raises(ConfigError, match="SHADOWPIPE_PRODUCER_HASH_KEY"):
        Emitter(settings, producer_hash_fields=("user",))
    with pytest.raises(ConfigError, match="SHADOWPIPE_PRODUCER_SAMPLE_RATES"):
        Emitter(settings, producer_sample_rates=("fraud=1.5",))


def test_prometheus_metrics_expose_counters(settings: Settings) -> None:
    from prometheus_client import generate_latest

    with Emitter(settings, name=f"metrics-{uuid.uuid4().hex[:6]}") as emitter:
        emitter.emit_feedback("r1", "ok")
        emitter.emit_feedback("", "ok")
        text = generate_latest().decode()
        assert f'shadowpipe_producer_sent_total{{emitter="{emitter.name}"}} 1.0' in text
        assert (f'shadowpipe_producer_dropped_total{{emitter="{emitter.name}",'
                f'reason="missing_request_id"}} 1.0') in text


def test_sent_is_counted_exactly_from_many_threads() -> None:
    """The sent counter takes no lock: emits racing from threads still all count."""
    import threading

    down = Settings.load(env={"SHADOWPIPE_KAFKA_BOOTSTRAP": f"127.0.0.1:{free_port()}"})
    emitter = Emitter(down, kafka_overrides=QUIET)

    def emit_many(thread: int) -> None:
        for i in range(500):
            emitter.emit_feedback(f"t{thread}-{i}", "ok")

    threads = [threading.Thread(target=emit_many, args=(t,)) for t in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert emitter.stats().sent == 2000 and emitter.stats().queued == 2000
    assert emitter.close(timeout=0) == 2000
    stats = emitter.stats()
    assert (stats.sent, stats.delivered, stats.failed_total) == (2000, 0, 2000)
