"""``follow`` / ``alerts tail``: partitions are assigned, no consumer group is joined (a new
group waits ~20 s for its first message on the embedded broker), firing and resolved are
both delivered."""

from __future__ import annotations

import time

import pytest
from confluent_kafka import Consumer

from shadowpipe import kafka
from shadowpipe.config import Settings
from shadowpipe.kafka import producer
from shadowpipe.processors.monitor.alerts import follow
from shadowpipe.schemas.codec import Codec


def _alert(status: str, alert_id: str) -> dict:
    return {"alert_id": alert_id, "kind": "drift", "detector": "PSI", "metric": "score",
            "challenger": "", "arm": "primary", "segment": None, "window_start": 0,
            "window_end": 60_000, "value": 0.4, "threshold": 0.25, "severity": "warning",
            "time": int(time.time() * 1000), "details": {"model": "m"}, "status": status}


def test_follow_assigns_partitions_and_yields_firing_and_resolved(
        settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    codec, prod = Codec(), producer(settings)
    for status, aid in (("firing", "a-1"), ("resolved", "a-2"), ("firing", "a-1")):
        prod.produce(settings.topic("alerts"), codec.encode("Alert", _alert(status, aid)), b"")
    prod.flush(30)
    subscribed: list = []

    class Spied(Consumer):  # the real consumer; records whether it joins a group
        def subscribe(self, *args: object, **kwargs: object) -> None:
            subscribed.append(args)
            super().subscribe(*args, **kwargs)

    monkeypatch.setattr(kafka, "Consumer", Spied)

    got: list[dict] = []
    deadline = time.time() + 120
    for alert in follow(settings, stop=lambda: time.time() > deadline):
        got.append(alert)
        if len(got) == 2:
            break
    assert [(a["alert_id"], a["status"]) for a in got] == [("a-1", "firing"), ("a-2", "resolved")]
    assert subscribed == []  # partitions assigned: no group to join
