"""``delivered`` counts the broker's acknowledgements (issue 15), read from librdkafka's
statistics rather than inferred as sent - failed - queued: the accounting on statistics
as librdkafka writes them, then emitters against the real embedded broker."""

from __future__ import annotations

import json
import time

from shadowpipe.config import Settings
from shadowpipe.producers import Emitter
from shadowpipe.producers.acks import Acks

QUIET = {"log_level": 0}


def stats(partitions: dict[int, tuple[int, int]], in_queue: int = 0) -> str:
    """librdkafka statistics (the fields read) with (acked_msgid, msgs) per partition."""
    return json.dumps({"msg_cnt": in_queue, "topics": {"t": {"partitions": {
        str(p): {"acked_msgid": acked, "msgs": msgs, "txmsgs": msgs}
        for p, (acked, msgs) in {**partitions, -1: (0, 3)}.items()}}}})


def test_failures_after_the_last_acknowledgement_are_not_subtracted() -> None:
    """Events purged at close (or lost at the end of an outage) after others were
    acknowledged: delivered is what the broker acknowledged, not acked - failed."""
    acks = Acks()
    acks.snapshot(stats({0: (40, 40), 1: (35, 38)}))
    for _ in range(3):
        acks.failed("t", 1)  # messages 36-38 of partition 1 purged
    acks.failed("t", None)  # never assigned a partition: never acknowledged either
    acks.snapshot(stats({0: (40, 40), 1: (35, 38)}))
    assert acks.delivered() == 75


def test_failures_below_later_acknowledgements_are_subtracted() -> None:
    """An outage whose messages time out, then recovery: the partition's acknowledged id
    passes the failed ones, which must not count as delivered."""
    acks = Acks()
    acks.snapshot(stats({0: (10, 20)}, in_queue=10))
    for _ in range(4):
        acks.failed("t", 0)  # 4 of messages 11-20 timed out
    acks.snapshot(stats({0: (10, 20)}, in_queue=6))
    assert acks.delivered() == 10
    acks.snapshot(stats({0: (15, 20)}, in_queue=3))  # some of 11-15 may be the failed
    assert acks.delivered() == 11  # conservative: may lag, never run ahead
    acks.snapshot(stats({0: (20, 20)}))
    assert acks.delivered() == 16 and acks.settled_since(0)


def test_delivered_follows_acknowledgements_while_running(settings: Settings) -> None:
    emitter = Emitter(settings, kafka_overrides={**QUIET, "linger.ms": 50})
    try:
        for i in range(300):
            assert emitter.emit_feedback(f"r{i}", "ok")
        deadline = time.monotonic() + 30
        while emitter.stats().delivered < 300 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert emitter.stats().delivered == 300  # from statistics, before any close
    finally:
        emitter.close(timeout=20)
    final = emitter.stats()
    assert (final.sent, final.delivered, final.failed_total, final.queued) == (300, 300, 0, 0)


def test_without_idempotence_successes_are_counted_one_by_one(settings: Settings) -> None:
    emitter = Emitter(settings, kafka_overrides={**QUIET, "enable.idempotence": False})
    for i in range(50):
        assert emitter.emit_feedback(f"r{i}", "ok")
    assert emitter.close(timeout=20) == 0
    assert (emitter.stats().sent, emitter.stats().delivered) == (50, 50)


def test_own_statistics_settings_fall_back_to_counted_reports(settings: Settings) -> None:
    seen: list[str] = []
    emitter = Emitter(settings, kafka_overrides={**QUIET, "stats_cb": seen.append})
    for i in range(20):
        assert emitter.emit_feedback(f"r{i}", "ok")
    assert emitter.close(timeout=20) == 0
    assert (emitter.stats().sent, emitter.stats().delivered) == (20, 20)
