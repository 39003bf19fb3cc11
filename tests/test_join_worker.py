"""``shadowpipe worker join`` end to end: a child worker process, the real broker and Redis."""

from __future__ import annotations

import json
import os
import random
import signal
import time
import urllib.request
from pathlib import Path
from typing import Any

from shadowpipe.config import Settings
from shadowpipe.kafka import consumer, producer
from shadowpipe.schemas.codec import Codec
from tests.conftest import assign_from_start, spawn_cli
from tests.test_join_core import expected_records, latest, make_requests, messages_of

CODEC = Codec()


def _produce(s: Settings, msgs: list[tuple[str, str, bytes]]) -> None:
    prod = producer(s)
    for kind, key, value in msgs:
        prod.produce(s.topic(kind), value, key.encode())
    assert prod.flush(30) == 0


class Joined:
    """Reads the joined topic from the start, accumulating decoded records."""

    def __init__(self, s: Settings) -> None:
        self.consumer = consumer(s, f"test-{s.topic_prefix}", **{"auto.offset.reset": "earliest"})
        assign_from_start(self.consumer, s, s.topic("joined"))
        self.records: list[dict[str, Any]] = []

    def wait(self, what: str, done: Any, timeout_s: float = 90.0) -> None:
        deadline = time.time() + timeout_s
        while not done(self.records):
            assert time.time() < deadline, f"timed out waiting for {what}: {len(self.records)}"
            for msg in self.consumer.consume(1000, timeout=0.5):
                if msg.error() is None:
                    self.records.append(CODEC.decode(msg.value(), "JoinedRecord"))

    def close(self) -> None:
        self.consumer.close()


def _stats(s: Settings) -> dict[str, int]:
    url = f"http://{s.web_host}:{s.web_port}/join/stats/"
    with urllib.request.urlopen(url, timeout=10) as resp:
        return json.loads(resp.read())


def _keyed(reqs: list[dict[str, Any]], rng: random.Random, dup_rate: float
           ) -> list[tuple[str, str, bytes]]:
    msgs = [(kind, req["id"], value) for req in reqs for kind, value in messages_of(req)]
    msgs += [m for m in msgs if rng.random() < dup_rate]
    rng.shuffle(msgs)
    return msgs


def _expected(reqs: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
    return {k: v for req in reqs for k, v in expected_records(req).items()}


def _stop(worker: Any) -> None:
    if worker.poll() is None:
        worker.send_signal(signal.SIGTERM)
        try:
            worker.wait(20)
        except Exception:  # noqa: BLE001 - a stuck worker must not hang the suite
            worker.kill()
            worker.wait()


def test_worker_joins_any_order_with_duplicates(settings: Settings, tmp_path: Path) -> None:
    s = settings.replace(log_level="WARNING")
    rng = random.Random(11)
    warmup, *reqs = make_requests(rng, 81)
    joined = Joined(s)
    worker = spawn_cli(s, "worker", "join", log=tmp_path / "worker.log")
    try:
        # Once the warm-up request joins, partitions are assigned: no rebalance replays later.
        _produce(s, _keyed([warmup], rng, 0))
        joined.wait("the warm-up join", lambda recs: len(latest(recs)) == 2)
        _produce(s, _keyed(reqs, rng, dup_rate=0.3) + [("inference", "bad", b"\x99x")])
        want = _expected([warmup, *reqs])
        joined.wait("every request joined", lambda recs: latest(recs) == want)
        keys = [(r["request_id"], r["challenger"], r["version"]) for r in joined.records]
        assert len(keys) == len(set(keys)), "a (request, challenger, version) was emitted twice"
        stats = _stats(s)
        assert stats["deadletter_decode"] == 1
        assert stats["part_duplicate"] > 0
    finally:
        _stop(worker)
        joined.close()


def test_worker_kill_9_and_restart_loses_and_doubles_nothing(
    settings: Settings, tmp_path: Path
) -> None:
    s = settings.replace(log_level="WARNING")
    rng = random.Random(12)
    reqs = make_requests(rng, 400)
    msgs = _keyed(reqs, rng, dup_rate=0.1)
    joined = Joined(s)
    log = tmp_path / "worker.log"
    _produce(s, msgs[: len(msgs) // 2])
    worker = spawn_cli(s, "worker", "join", log=log)
    try:
        joined.wait("first outputs", lambda recs: len(recs) >= 50)
        os.kill(worker.pid, signal.SIGKILL)
        worker.wait()
        _produce(s, msgs[len(msgs) // 2:])
        worker = spawn_cli(s, "worker", "join", log=log)
        want = _expected(reqs)
        joined.wait("every request joined after the restart", lambda recs: latest(recs) == want)
        final = latest(joined.records)
        assert sum(r["state"] == "labelled" for r in final.values()) == sum(
            len(q["predictions"]) for q in reqs if q["feedback"])
        # Replays re-emit identical versions: one content per (request, challenger, version).
        by_version: dict[tuple[str, str, int], dict[str, Any]] = {}
        for rec in joined.records:
            key = (rec["request_id"], rec["challenger"], rec["version"])
            content = {k: v for k, v in rec.items() if k != "joined_at"}
            assert by_version.setdefault(key, content) == content
    finally:
        _stop(worker)
        joined.close()


def test_worker_feedback_after_horizon_is_an_orphan(settings: Settings, tmp_path: Path) -> None:
    s = settings.replace(feedback_horizon_s=2, log_level="WARNING")
    complete, no_primary, no_request = make_requests(random.Random(13), 3, challengers=1)
    for req in (complete, no_primary, no_request):
        req["feedback"] = []
    joined = Joined(s)
    worker = spawn_cli(s, "worker", "join", log=tmp_path / "worker.log")
    try:
        stray = {"request_id": no_request["id"], "label": "a", "event_time": 1}
        _produce(s, [(k, complete["id"], v) for k, v in messages_of(complete)] + [
            ("predictions", no_primary["id"],
             CODEC.encode("ShadowPrediction", no_primary["predictions"][0])),
            ("feedback", no_request["id"], CODEC.encode("Feedback", stray)),
        ])
        joined.wait("the join and both orphans", lambda recs: {
            (r["request_id"], r["state"]) for r in recs} >= {
            (complete["id"], "predicted"), (no_primary["id"], "orphan_prediction"),
            (no_request["id"], "orphan_feedback")})
        # The complete request is swept at its horizon too; then its label arrives.
        deadline = time.time() + 120
        while _stats(s)["pending"]:
            assert time.time() < deadline, "the complete request was never swept"
            time.sleep(0.5)
        late = {"request_id": complete["id"], "label": "b", "event_time": 2}
        _produce(s, [("feedback", complete["id"], CODEC.encode("Feedback", late))])
        joined.wait("the late feedback orphan", lambda recs: any(
            r["request_id"] == complete["id"] and r["state"] == "orphan_feedback" for r in recs))
        stats = _stats(s)
        assert stats["orphan_feedback_late"] == 1
        assert stats["orphan_feedback_unknown"] == 1
        assert stats["orphan_prediction_no_primary"] == 1
        assert worker.poll() is None, "the worker died"
    finally:
        _stop(worker)
        joined.close()


def test_worker_join_without_redis_names_the_setting(settings: Settings, tmp_path: Path) -> None:
    log = tmp_path / "worker.log"
    worker = spawn_cli(settings.replace(redis_url="redis://127.0.0.1:1/0"), "worker", "join",
                       log=log)
    assert worker.wait(60) == 2
    lines = [line for line in log.read_text().splitlines() if "error" in line]
    assert lines and "SHADOWPIPE_REDIS_URL" in lines[-1]
