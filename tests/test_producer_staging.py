"""The emit policy decides the same with and without the compiled stage.

Both stages (``FastEmit`` of producers/_encode.c, and producers/staging.py's ``Stage``)
get the same calls with the same latencies against a recording stand-in for librdkafka's
producer; every decision (which call carries a burst, which burst serves reports, what
is refused) must be the same.
"""

from __future__ import annotations

import itertools
from typing import Any

import pytest
from hypothesis import given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from shadowpipe.producers.emitter import fast_emitter
from shadowpipe.producers.staging import BurstPolicy, Stage

TOPIC = "t"


class Recorder:
    """librdkafka's producer as a stage sees it, writing down every call and decision."""

    def __init__(self, capacity: int = 1_000_000) -> None:
        self.capacity = capacity
        self.queued = 0
        self.log: list[tuple[str, Any]] = []

    def produce(self, topic: str, value: bytes, key: Any) -> None:
        if self.queued >= self.capacity:
            raise BufferError("Local: Queue full")
        self.queued += 1
        self.log.append(("produce", key))

    def __len__(self) -> int:
        return self.queued

    def serve(self) -> None:
        self.log.append(("serve", None))

    def refused(self, data: bytes, key: Any, exc: BaseException) -> None:
        self.log.append(("refused", (key, type(exc).__name__)))


def python_stage(policy: BurstPolicy, producer: Recorder, max_messages: int,
                 max_queue_bytes: int) -> Any:
    return Stage(policy, producer, TOPIC, producer.serve, producer.refused,
                 itertools.count(1), max_messages, max_queue_bytes)


def compiled_stage(policy: BurstPolicy, producer: Recorder, max_messages: int,
                   max_queue_bytes: int) -> Any:
    def slow(*args: Any, **kwargs: Any) -> bool:
        raise AssertionError("only add() is called here")

    return fast_emitter(slow, {}, b"\xc3\x01" + bytes(8), 1 << 20, policy, TOPIC, producer,
                        producer.serve, producer.refused, True, itertools.count(1),
                        max_messages, max_queue_bytes)


def decisions(make: Any, latencies: list[float], max_messages: int = 1_000_000,
              capacity: int = 1_000_000) -> list[Any]:
    """Every call's answer and staged count, and everything the producer saw."""
    producer = Recorder(capacity)
    policy = BurstPolicy(max_wait_ms=600_000)  # no time-based burst in a test
    stage = make(policy, producer, max_messages, 1 << 30)
    trace: list[Any] = []
    for n, latency in enumerate(latencies):
        trace.append((stage.add(b"event-%d" % n, b"r%d" % n, latency), stage.staged))
    trace.append(("quiet", stage.hand_over(), stage.staged))
    trace.append(("closed", stage.close()))
    return trace + producer.log


needs_c = pytest.mark.skipif(fast_emitter is None, reason="the C extension is not built here")

latency_lists = st.lists(
    st.one_of(st.floats(0.01, 50.0), st.sampled_from([1.0, 2.0, 1000.0])), max_size=300)


@needs_c
@hsettings(max_examples=150, deadline=None)
@given(latency_lists)
def test_both_stages_take_the_same_decisions(latencies: list[float]) -> None:
    assert decisions(compiled_stage, latencies) == decisions(python_stage, latencies)


@needs_c
@hsettings(max_examples=50, deadline=None)
@given(latency_lists, st.integers(1, 80), st.integers(0, 80))
def test_both_stages_run_out_of_room_alike(latencies: list[float], max_messages: int,
                                           capacity: int) -> None:
    """A full queue: the same calls are refused room, the same bursts refused."""
    assert (decisions(compiled_stage, latencies, max_messages, capacity)
            == decisions(python_stage, latencies, max_messages, capacity))


@pytest.mark.parametrize("make", [
    python_stage, pytest.param(compiled_stage, marks=needs_c)], ids=["python", "compiled"])
def test_the_policy_picks_the_carrier_and_the_serving_burst(make: Any) -> None:
    """16 staged go at once the first time; later the burst waits for a call no slower
    than the mean; a burst serves reports on a quick call or every 8th burst."""
    trace = decisions(make, [1.0] * 16 + [9.0] * 24 + [0.5])
    staged = [count for _, count in trace[:41]]
    assert staged[15] == 0 and staged[16:40] == list(range(1, 25)) and staged[40] == 0
    log = trace[43:]
    assert log[:16] == [("produce", b"r%d" % n) for n in range(16)]
    # The first burst's carrier is no quicker than the others: no serving; the second
    # burst's carrier (0.5 ms) is among the quickest: served.
    assert log[16:41] == [("produce", b"r%d" % n) for n in range(16, 41)]
    assert log[41:] == [("serve", None)]

def test_reports_are_served_every_8th_burst_without_a_quick_carrier() -> None:
    policy = BurstPolicy()
    served = [policy.handed_over([1.0] * 15 + [100.0], carried=True)[0] for _ in range(16)]
    assert served == [False] * 7 + [True] + [False] * 7 + [True]
