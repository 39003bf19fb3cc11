"""Pipelined challengers (``pipelined = True``: the oip kind): the Runner keeps the next
batch in flight while the previous one is scored, each batch's results stay its own, and
a hung call costs timeouts for exactly the batches it holds up. The worker's
:meth:`ShadowProcessor.start` submits a batch taken ahead only to pipelined challengers."""

from __future__ import annotations

import threading
from typing import Any

from shadowpipe.config import Settings
from shadowpipe.processors.runtime.message import Message
from shadowpipe.processors.shadow.challengers import Model, parse_specs
from shadowpipe.processors.shadow.core import ShadowProcessor
from shadowpipe.processors.shadow.runner import Result, Runner
from shadowpipe.schemas.codec import Codec
from tests.conftest import wait_for


class Remote(Model):
    """value = x. A batch whose first x is negative waits for ``release`` (a hung server);
    one whose first x is 0 waits (up to 5 s) for a second call to be running beside it.
    ``most_inside``: the most calls seen running at once; ``seen``: first x of each call."""

    vectorized = True
    normalized = True
    pipelined = True

    def __init__(self) -> None:
        self.release = threading.Event()
        self.inside = 0
        self.most_inside = 0
        self.seen: list[float] = []
        self._changed = threading.Condition()

    def predict_batch(self, records: Any) -> list[Any]:
        xs = [r["num_features"]["x"] for r in records]
        with self._changed:
            self.inside += 1
            self.most_inside = max(self.most_inside, self.inside)
            self.seen.append(xs[0])
            self._changed.notify_all()
            if xs[0] == 0 and self.pipelined:
                self._changed.wait_for(lambda: self.most_inside > 1, timeout=5)
        try:
            if xs[0] < 0:
                self.release.wait(30)
            return [{"label": None, "probabilities": {}, "value": x} for x in xs]
        finally:
            with self._changed:
                self.inside -= 1


class Local(Remote):
    pipelined = False


def batch(start: float, n: int = 5) -> list[dict[str, Any]]:
    return [{"num_features": {"x": start + i}} for i in range(n)]


def values(results: list[Result]) -> list[Any]:
    return [r.output["value"] if r.output else r.error_kind for r in results]


def test_pipelined_batches_run_together_and_come_back_in_order() -> None:
    model = Remote()
    runner = Runner("remote", model, timeout_ms=5000)
    try:
        first = runner.submit(batch(0))
        second = runner.submit(batch(10))  # the next batch, before the first is collected
        assert values(runner.collect(first)) == [0, 1, 2, 3, 4]
        assert values(runner.collect(second)) == [10, 11, 12, 13, 14]
    finally:
        runner.close()
    assert runner.depth == 2 and model.most_inside == 2


def test_a_local_model_is_never_given_two_batches_at_once() -> None:
    model = Local()
    runner = Runner("local", model, timeout_ms=5000)
    try:
        first = runner.submit(batch(-100))  # running until released
        second = runner.submit(batch(10))
        assert values(runner.collect(second)) == ["timeout"] * 5
        model.release.set()
        assert values(runner.collect(first)) == [-100, -99, -98, -97, -96]
    finally:
        model.release.set()
        runner.close()
    assert runner.depth == 1 and model.most_inside == 1


def test_a_hung_call_mid_pipeline_times_out_exactly_the_batches_it_holds_up() -> None:
    model = Remote()
    runner = Runner("remote", model, timeout_ms=300)
    try:
        hung = runner.submit(batch(-100))
        after = runner.submit(batch(10))  # in flight beside the hung call: scored
        assert values(runner.collect(hung)) == ["timeout"] * 5
        assert values(runner.collect(after)) == [10, 11, 12, 13, 14]
        # the hung call is past its deadline: the next batch fails fast, never queues
        blocked = runner.submit(batch(20, 3))
        assert values(runner.collect(blocked)) == ["timeout"] * 3
        assert "past its timeout" in runner.collect(blocked)[0].error
        model.release.set()
        wait_for("the hung call to end", lambda: hung.future.done(), 10)
        assert values(runner.collect(runner.submit(batch(30)))) == [30, 31, 32, 33, 34]
    finally:
        model.release.set()
        runner.close()
    assert model.seen == [-100, 10, 30]


def message(codec: Codec, x: float, offset: int) -> Message:
    event = {"request_id": f"r{offset}", "event_time": 1000, "model": "m",
             "model_version": "1", "num_features": {"x": x}, "output": {},
             "latency_ms": 1.0}
    return Message(codec.encode("InferenceEvent", event), b"k", "t", 0, offset)


def test_a_batch_started_ahead_goes_only_to_pipelined_challengers_until_finished() -> None:
    codec = Codec()
    specs = parse_specs([{"name": n, "version": "1", "kind": "callable",
                          "location": "shadowpipe.processors.shadow.challengers:echo_label"}
                         for n in ("remote", "local")], 5000)
    remote, local = Remote(), Local()
    proc = ShadowProcessor(Settings.load(env={}), specs, models=[remote, local], codec=codec)
    try:
        assert proc.pipelined
        first = proc.start([message(codec, float(i), i) for i in range(3)], 2000)
        ahead = proc.start([message(codec, 10.0 + i, 3 + i) for i in range(3)], 2000,
                           ahead=True)
        wait_for("the remote challenger to take the batch ahead",
                 lambda: remote.seen == [0.0, 10.0], 10)
        assert local.seen == [0.0]
        out_first, out_ahead = proc.finish(first), proc.finish(ahead)
    finally:
        proc.close()
    assert local.seen == [0.0, 10.0]
    for out, xs in ((out_first, [0.0, 1.0, 2.0]), (out_ahead, [10.0, 11.0, 12.0])):
        preds = [codec.decode(v, "ShadowPrediction") for _k, v in out.predictions]
        for name in ("remote", "local"):
            assert [p["output"]["value"] for p in preds if p["challenger"] == name] == xs
    assert proc.stats.consumed == 6


def test_lookahead_source_hands_every_message_to_the_loop_once_in_order(
        settings: Settings) -> None:
    from shadowpipe import kafka
    from shadowpipe.processors.shadow.service import (
        CONSUMER_OVERRIDES,
        LookaheadSource,
        group_id,
    )

    topic = settings.topic("inference")
    producer = kafka.producer(settings)

    def produce(first: int, n: int) -> None:
        for i in range(first, first + n):
            producer.produce(topic, b"v%d" % i, b"one-partition")
        assert producer.flush(30) == 0

    produce(0, 1100)
    source = LookaheadSource(settings, group_id(settings), [topic], 500, 0.2,
                             **CONSUMER_OVERRIDES)
    source.open(lambda: None, lambda: None)
    seen: list[Message] = []
    try:
        wait_for("the first batch", lambda: seen.extend(source.poll()) or seen, 60)
        ahead = wait_for("a full batch taken ahead", source.peek, 30)
        assert len(ahead) == 500
        assert source.poll() is ahead  # the loop gets the very batch already started
        seen += ahead
        wait_for("the rest", lambda: seen.extend(source.poll()) or len(seen) >= 1100, 30)
        # fewer than a batch fetched: not taken ahead, kept for the next poll
        produce(1100, 10)
        wait_for("10 more fetched", lambda: source.peek() == [] and len(source._ahead) == 10,
                 30)
        seen += source.poll()
    finally:
        source.close()
    assert [m.value for m in seen] == [b"v%d" % i for i in range(1110)]


class Serial(Model):
    """A server that answers one call at a time; the first call waits for ``release``."""

    vectorized = True
    normalized = True
    pipelined = True

    def __init__(self) -> None:
        self.release = threading.Event()
        self.turn = threading.Lock()
        self.calls = 0

    def predict_batch(self, records: Any) -> list[Any]:
        with self.turn:
            self.calls += 1
            if self.calls == 1:
                self.release.wait(30)
            return [{"label": None, "probabilities": {}, "value": 1.0} for _ in records]


def test_a_pipelined_call_is_timed_from_when_the_call_ahead_of_it_ended() -> None:
    model = Serial()
    runner = Runner("serial", model, timeout_ms=30_000)
    try:
        first = runner.submit(batch(0))
        second = runner.submit(batch(10))  # sent while the first one is held at the server
        model.release.set()
        runner.collect(first)
        runner.collect(second)
    finally:
        runner.close()
    assert first.finished is not None and second.finished is not None
    assert first.finished > second.started  # the second waited behind the first...
    assert second.begun == first.finished  # ...and that wait is not its own time
    assert second.elapsed_s() == second.finished - first.finished
    assert first.elapsed_s() == first.finished - first.started
