"""``shadowpipe worker monitor`` end to end: a child process owning its own chdb directory,
read through its query endpoint and ``shadowpipe compare``."""

from __future__ import annotations

import json
import time
import urllib.parse
import urllib.request
import uuid
from pathlib import Path
from typing import Any

from confluent_kafka import OFFSET_BEGINNING, TopicPartition

from shadowpipe.bench import synthetic
from shadowpipe.config import Settings
from shadowpipe.kafka import consumer, producer
from shadowpipe.schemas.codec import Codec
from tests.conftest import spawn_cli, wait_for


def _query(s: Settings, name: str, **params: Any) -> dict[str, Any] | None:
    url = (f"http://{s.web_host}:{s.web_port}/shadowpipe/query/?"
           + urllib.parse.urlencode({"name": name, **params}))
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            return json.loads(resp.read())
    except OSError:
        return None


def _rows(reply: dict[str, Any]) -> list[dict[str, Any]]:
    return [dict(zip(reply["columns"], r, strict=True)) for r in reply["rows"]]




def test_worker_monitor_end_to_end(settings: Settings, tmp_path: Path) -> None:
    s = settings.replace(clickhouse_url=f"chdb://{tmp_path / 'ch'}", clickhouse_database="e2e",
                         segments=("region",), monitor_batch_ms=100, log_level="WARNING")
    start = (int(time.time()) // 60 - 30) * 60_000
    records = synthetic.stream(synthetic.Spec(requests=1500, challengers=("c1", "c2"),
                                              seed=9, interval_ms=200, start_ms=start,
                                              error_rate=0.05))
    codec = Codec()
    prod = producer(s)
    for rec in records + records[:700]:  # the second copy: at-least-once redelivery
        prod.produce(s.topic("joined"), codec.encode("JoinedRecord", rec),
                     rec["request_id"].encode())
    prod.produce(s.topic("joined"), b"\x99not avro", b"bad")
    prod.flush(30)

    worker = spawn_cli(s, "worker", "monitor", log=tmp_path / "worker.log")
    try:
        predicted = [r for r in records if r["state"] == "predicted"]

        def published() -> bool:
            reply = _query(s, "arms")
            return bool(reply) and sum(r["published"] for r in _rows(reply)) == len(predicted)

        wait_for("all joined records in ClickHouse", published)
        windows = _rows(_query(s, "windows"))
        closed = [w for w in windows if w["segment"] == ""]
        assert closed
        for w in closed:
            assert w["published"] == sum(
                1 for r in predicted if r["challenger"] == w["challenger"]
                and w["window_start_ms"] <= r["event_time"] < w["window_end_ms"])
            assert w["errors"] == sum(
                1 for r in predicted if r["challenger"] == w["challenger"]
                and w["window_start_ms"] <= r["event_time"] < w["window_end_ms"]
                and r["shadow_error_kind"] == "exception")

        out = tmp_path / "compare.json"
        compare = spawn_cli(s, "compare", "--since", "2h", "--format", "json", log=out)
        assert compare.wait(60) == 0
        report = json.loads(out.read_text())
        by_challenger = {row["challenger"]: row for row in report["arms"]}
        assert set(by_challenger) == {"c1", "c2"}
        c1 = by_challenger["c1"]
        assert c1["coverage"]["published"] == len(predicted) // 2
        low, high = c1["challenger_arm"]["accuracy_ci95"]
        assert low < c1["challenger_arm"]["accuracy"] < high

        # Assigned, not subscribed: a new group waits ~20 s on the embedded broker, and
        # longer on a busy machine.
        dead = consumer(s, f"t-{uuid.uuid4()}")
        dead.assign([TopicPartition(s.topic("deadletter"), p, OFFSET_BEGINNING)
                     for p in range(s.partitions)])
        letters = []
        deadline = time.time() + 120
        while not letters and time.time() < deadline:
            msg = dead.poll(1.0)
            if msg is not None and not msg.error():
                letters.append(codec.decode(msg.value(), "DeadLetter"))
        dead.close()
        assert letters and letters[0]["worker"] == "monitor"
        assert letters[0]["error_kind"] == "decode"
    finally:
        worker.kill()
        worker.wait(10)
