"""The shadow worker as a child process on the real embedded stack."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import threading
import time
import urllib.request
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from shadowpipe import kafka
from shadowpipe.config import Settings
from shadowpipe.schemas.codec import Codec
from tests.conftest import assign_from_start, free_port, spawn_cli

REPO = Path(__file__).resolve().parents[1]
CODEC = Codec()
CHALLENGERS = """
[[challengers]]
name = "flaky"
version = "1.0"
kind = "callable"
location = "tests.shadow_challengers:flaky"

[[challengers]]
name = "slow"
version = "2.0"
kind = "callable"
location = "tests.shadow_challengers:slow"
timeout_ms = 150
is_control = true
"""


@pytest.fixture
def shadow_settings(
    settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Settings:
    # The worker child imports the test challengers from the repository root.
    monkeypatch.setenv("PYTHONPATH", str(REPO))
    path = tmp_path / "challengers.toml"
    path.write_text(CHALLENGERS)
    return settings.replace(challengers=str(path), shadow_batch_size=500)


def produce_events(settings: Settings, n: int, prefix: str = "r") -> list[str]:
    rng = random.Random(42)
    producer = kafka.producer(settings)
    ids = []
    now = int(time.time() * 1000)
    for i in range(n):
        rid = f"{prefix}-{i}"
        record = {
            "request_id": rid, "event_time": now, "model": "primary", "model_version": "1",
            "num_features": {f"x{j}": rng.random() for j in range(4)},
            "output": {"label": "hi", "probabilities": {"hi": 0.6, "lo": 0.4}, "value": None},
            "latency_ms": 2.0,
        }
        producer.produce(settings.topic("inference"), CODEC.encode("InferenceEvent", record), rid)
        producer.poll(0)
        ids.append(rid)
    assert producer.flush(30) == 0
    return ids


def _feed(settings: Settings, n: int, out: list[str], chunk: int = 250) -> None:
    """``n`` events in chunks with a short pause between: a stream, not a backlog."""
    for k in range(0, n, chunk):
        out += produce_events(settings, min(chunk, n - k), prefix=f"f{k}")
        time.sleep(0.1)


def stats(settings: Settings) -> dict[str, Any]:
    url = f"http://127.0.0.1:{settings.web_port}/shadowpipe/shadow/stats"
    with urllib.request.urlopen(url, timeout=5) as resp:
        return json.loads(resp.read())


def wait_consumed(settings: Settings, proc: subprocess.Popen, target: int,
                  timeout_s: float = 120) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert proc.poll() is None, "the worker died"
        try:
            snap = stats(settings)
            if snap["consumed"] >= target:
                return snap
        except OSError:
            pass
        time.sleep(0.3)
    raise AssertionError(f"worker did not consume {target} events in {timeout_s} s")


def read_topic(settings: Settings, kind: str, name: str, until: int,
               timeout_s: float = 60) -> list[dict[str, Any]]:
    consumer = kafka.consumer(settings, f"test-{uuid.uuid4().hex}")
    assign_from_start(consumer, settings, settings.topic(kind))
    out: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout_s
    idle_until = None
    try:
        while time.monotonic() < deadline:
            msgs = [m for m in consumer.consume(5000, 0.5) if m.error() is None]
            out.extend(CODEC.decode(m.value(), name) for m in msgs)
            if len(out) >= until:  # keep reading briefly: more than expected must show up
                idle_until = idle_until or time.monotonic() + 2
                if time.monotonic() > idle_until:
                    break
    finally:
        consumer.close()
    return out


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_ten_thousand_events_two_challengers(shadow_settings: Settings, tmp_path: Path) -> None:
    s = shadow_settings
    ids = produce_events(s, 10_000)
    proc = spawn_cli(s, "worker", "shadow", log=tmp_path / "worker.log")
    try:
        snap = wait_consumed(s, proc, 10_000)
        preds = read_topic(s, "predictions", "ShadowPrediction", 20_000)
        assert proc.poll() is None  # alive after errors and timeouts
    finally:
        stop(proc)
    assert len(preds) == 20_000
    pairs = Counter((p["request_id"], p["challenger"]) for p in preds)
    assert set(pairs) == {(r, c) for r in ids for c in ("flaky", "slow")}
    flaky = [p for p in preds if p["challenger"] == "flaky"]
    errors = [p for p in flaky if p["error"] is not None]
    assert 40 <= len(errors) <= 200  # ~1 % of uniform x0
    assert all(p["error_kind"] == "exception" and "flaky challenger rejects" in p["error"]
               and p["output"] is None for p in errors)
    assert all(p["output"]["label"] in ("hi", "lo") for p in flaky if p["error"] is None)
    slow = [p for p in preds if p["challenger"] == "slow"]
    timeouts = [p for p in slow if p["error_kind"] == "timeout"]
    assert timeouts and len(timeouts) < len(slow)
    assert all(p["output"] is None and p["error"].startswith("timeout") for p in timeouts)
    assert all(p["is_control"] and p["challenger_version"] == "2.0" for p in slow)
    assert all(p["queue_lag_ms"] >= 0 and p["model_time_ms"] >= 0 for p in preds)
    assert snap["challengers"]["flaky"]["errors"] == len(errors)
    assert snap["challengers"]["slow"]["timeouts"] == len(timeouts)
    assert snap["batches"]["max"] <= 500


def test_kill_9_and_restart_leaves_no_gap(shadow_settings: Settings, tmp_path: Path) -> None:
    s = shadow_settings
    ids = produce_events(s, 500)
    first = spawn_cli(s, "worker", "shadow", log=tmp_path / "first.log")
    fed: list[str] = []
    # The rest arrives while the worker runs, so the kill lands mid-stream: a worker that
    # is fast enough drained 10,000 pre-produced events before the first look.
    feeder = threading.Thread(target=_feed, args=(s, 9_500, fed))
    try:
        wait_consumed(s, first, 1)
        feeder.start()
        at_kill = wait_consumed(s, first, 2_000)["consumed"]
    finally:
        first.kill()  # SIGKILL: no commit, no flush
        first.wait()
        if feeder.ident is not None:  # started
            feeder.join()
    ids += fed
    assert at_kill < len(ids) == 10_000  # killed mid-run
    s2 = s.replace(web_port=free_port())
    second = spawn_cli(s2, "worker", "shadow", log=tmp_path / "second.log")
    try:
        preds = read_topic(s2, "predictions", "ShadowPrediction", 20_000, timeout_s=400)
    finally:
        stop(second)
    pairs = {(p["request_id"], p["challenger"]) for p in preds}
    assert pairs == {(r, c) for r in ids for c in ("flaky", "slow")}
    assert len(preds) >= 20_000  # duplicates allowed (at-least-once), gaps not


def test_poison_messages_are_dead_lettered(shadow_settings: Settings, tmp_path: Path) -> None:
    s = shadow_settings
    producer = kafka.producer(s)
    topic = s.topic("inference")
    feedback = CODEC.encode("Feedback", {"request_id": "fb", "label": "x", "event_time": 1})
    empty_id = {"request_id": "", "event_time": 5, "model": "m", "model_version": "1",
                "output": {}, "latency_ms": 1.0}
    poison = [
        (b"rand", b"\x07" + os.urandom(63)),  # 0x07 starts no accepted format
        (b"wrong-schema", feedback),
        (b"no-id", json.dumps({k: v for k, v in empty_id.items() if k != "request_id"}).encode()),
        (b"empty-id", CODEC.encode("InferenceEvent", empty_id)),
    ]
    for key, value in poison:
        producer.produce(topic, value, key, partition=0)
    assert producer.flush(10) == 0
    ids = produce_events(s, 200, prefix="after")
    proc = spawn_cli(s, "worker", "shadow", log=tmp_path / "worker.log")
    try:
        dead = read_topic(s, "deadletter", "DeadLetter", 4)
        preds = read_topic(s, "predictions", "ShadowPrediction", 400)
        assert proc.poll() is None
    finally:
        stop(proc)
    by_key = {d["key"]: d for d in dead}
    assert len(dead) == 4 and set(by_key) == {k for k, _ in poison}
    assert by_key[b"rand"]["error_kind"] == "decode"
    assert "InferenceEvent, got io.shadowpipe.Feedback" in by_key[b"wrong-schema"]["reason"]
    assert "request_id" in by_key[b"no-id"]["reason"]
    assert (by_key[b"empty-id"]["error_kind"], by_key[b"empty-id"]["reason"]) == (
        "invalid", "empty request_id")
    assert all(d["source_topic"] == topic and d["source_partition"] == 0
               and d["worker"] == "shadow" for d in dead)
    assert sorted(d["source_offset"] for d in dead) == [0, 1, 2, 3]
    assert by_key[b"wrong-schema"]["value"] == feedback
    assert {p["request_id"] for p in preds} == set(ids)  # processing went on


def test_unloadable_challenger_stops_startup(settings: Settings, tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text('[[challengers]]\nname = "ghost"\nversion = "1"\nkind = "sklearn"\n'
                    f'location = "{tmp_path / "missing.joblib"}"\n')
    log = tmp_path / "worker.log"
    proc = spawn_cli(settings.replace(challengers=str(path)), "worker", "shadow", log=log)
    assert proc.wait(60) == 2
    lines = log.read_text().strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("shadowpipe: error: SHADOWPIPE_CHALLENGERS [shadow]: "
                               "challenger 'ghost': cannot load sklearn")


def test_two_workers_share_the_partitions(shadow_settings: Settings, tmp_path: Path) -> None:
    workers = [shadow_settings.replace(web_port=free_port()) for _ in range(2)]
    procs = [spawn_cli(w, "worker", "shadow", log=tmp_path / f"w{i}.log")
             for i, w in enumerate(workers)]
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:  # wait for a settled split of the 4 partitions
            try:
                owned = [stats(w)["assigned_partitions"] for w in workers]
            except OSError:
                owned = [[], []]
            if all(owned) and sorted(owned[0] + owned[1]) == [0, 1, 2, 3]:
                break
            time.sleep(0.5)
        assert all(owned) and sorted(owned[0] + owned[1]) == [0, 1, 2, 3], owned
        ids = produce_events(shadow_settings, 2_000)
        preds = read_topic(shadow_settings, "predictions", "ShadowPrediction", 4_000)
        consumed = [stats(w)["consumed"] for w in workers]
    finally:
        for p in procs:
            stop(p)
    assert all(c > 0 for c in consumed) and sum(consumed) == 2_000
    assert {(p["request_id"], p["challenger"]) for p in preds} == {
        (r, c) for r in ids for c in ("flaky", "slow")}
