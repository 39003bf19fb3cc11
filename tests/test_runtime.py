"""The workers' shared runtime on the real embedded stack: the batch loop commits nothing
whose outputs the broker has not acknowledged, retries transient processing errors, the
monitor's checkpoint carries a format version (an unknown one refuses to start with one
line, an unversioned one is migrated), and every worker answers on the same health paths."""

from __future__ import annotations

import pickle
import socket
from pathlib import Path
from typing import Any

import pytest

from shadowpipe.config import Settings
from shadowpipe.processors.monitor import checkpoint
from shadowpipe.processors.monitor.core import MonitorState
from shadowpipe.processors.monitor.pipeline import Pipeline
from shadowpipe.processors.publisher import DeliveryError, Publisher
from shadowpipe.processors.runtime.loop import BatchLoop, Handler
from shadowpipe.processors.runtime.message import Message
from shadowpipe.processors.runtime.retry import Stopped
from shadowpipe.stores import redis_client
from tests.conftest import assign_from_start, spawn_cli
from tests.test_monitor_runtime import _get
from tests.test_shadow_worker import CHALLENGERS, REPO


class Echo(Handler):
    """Outputs each value to ``topic``; fails ``failures`` times first with OSError."""

    name = "echo"
    transient = (OSError,)

    def __init__(self, topic: str, failures: int = 0) -> None:
        self.topic, self.failures = topic, failures
        self.processed = self.settled_batches = 0
        self.retries: list[type[BaseException]] = []

    def process(self, batch: list[Message]) -> Any:
        self.processed += 1
        if self.failures:
            self.failures -= 1
            raise OSError("store away")
        return [(self.topic, [(m.key, m.value) for m in batch])]

    def settled(self, batch: list[Message]) -> None:
        self.settled_batches += 1

    def retried(self, what: str, exc: BaseException) -> None:
        self.retries.append(type(exc))


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_failed_delivery_is_retried_and_never_committed() -> None:
    closed = Settings.load(env={}).replace(kafka_bootstrap=f"127.0.0.1:{_closed_port()}")
    handler = Echo("out")
    waits: list[float] = []

    def pause(seconds: float) -> None:
        waits.append(seconds)
        if len(waits) == 3:
            raise Stopped("test stop")

    loop = BatchLoop(handler, lambda: Publisher(closed, **{"message.timeout.ms": 300,
                                                           "log_level": 0}),
                     overlap=False, pause=pause)
    with pytest.raises(Stopped):
        loop.step([Message(b"v", b"k", "in", 0, 5)])
    assert waits == [0.2, 0.4, 0.8]
    assert handler.retries == [DeliveryError] * 3
    assert loop.retrying == "Kafka delivery"
    assert handler.settled_batches == 0 and loop.positions == {}


def test_transient_processing_errors_retry_the_batch_then_commit(settings: Settings) -> None:
    from confluent_kafka import Consumer

    out = settings.topic("joined")
    handler = Echo(out, failures=2)
    loop = BatchLoop(handler, lambda: Publisher(settings), overlap=True,
                     pause=lambda seconds: None)
    batch = [Message(f"v{i}".encode(), b"k", "in", 1, 10 + i) for i in range(3)]
    loop.step(batch)
    assert (handler.processed, handler.retries) == (3, [OSError, OSError])
    assert loop.positions == {}  # overlapped: settled at the next step
    loop.step([])
    assert handler.settled_batches == 1 and loop.positions == {("in", 1): 13}
    reader = Consumer({"bootstrap.servers": settings.kafka_bootstrap, "group.id": "t",
                       "enable.auto.commit": False})
    assign_from_start(reader, settings, out)
    values: list[bytes] = []
    for _ in range(40):
        values += [m.value() for m in reader.consume(10, 0.5) if m.error() is None]
        if len(values) >= 3:
            break
    reader.close()
    assert sorted(values) == [b"v0", b"v1", b"v2"]


class Holding(Echo):
    """Settles only when ``due``; records the messages of each settled step."""

    def __init__(self, topic: str) -> None:
        super().__init__(topic)
        self.due = False
        self.settled_steps: list[list[int]] = []

    def settle_due(self) -> bool:
        return self.due

    def settled(self, batch: list[Message]) -> None:
        self.settled_steps.append([m.offset for m in batch])


def test_held_batches_settle_together_when_due_and_always_when_forced(
        settings: Settings) -> None:
    """A handler that is not due holds its delivered batches: nothing settled or committed
    until it is due (then all of them at once), or until a forced settle (rebalance, stop)."""
    handler = Holding(settings.topic("joined"))
    loop = BatchLoop(handler, lambda: Publisher(settings), overlap=False)
    loop.step([Message(b"a", b"k", "in", 0, 5), Message(b"b", b"k", "in", 1, 7)])
    loop.step([Message(b"c", b"k", "in", 0, 6)])
    assert handler.settled_steps == [] and loop.positions == {}
    handler.due = True
    loop.step([])  # an empty poll settles what is held once due
    assert handler.settled_steps == [[5, 7, 6]]
    assert loop.positions == {("in", 0): 7, ("in", 1): 8}
    handler.due = False
    loop.step([Message(b"d", b"k", "in", 1, 8)])
    assert loop.positions[("in", 1)] == 8
    loop.settle(asynchronous=False, force=True)
    assert handler.settled_steps == [[5, 7, 6], [8]] and loop.positions[("in", 1)] == 9


def test_checkpoint_is_versioned_and_migrates_an_unversioned_one(settings: Settings) -> None:
    redis = redis_client(settings)
    key = f"{settings.topic_prefix}monitor:state"
    redis.set(key, pickle.dumps(MonitorState(watermark=1234), protocol=5))  # format 0
    pipeline = Pipeline(settings)
    assert pipeline.monitor.state.watermark == 1234
    pipeline.checkpoint()
    blob = redis.get(key)
    assert blob.startswith(b"shadowpipe-monitor-state/1\n")
    assert checkpoint.load(blob, key).watermark == 1234


def test_unknown_checkpoint_format_refuses_to_start(settings: Settings, tmp_path: Path) -> None:
    key = f"{settings.topic_prefix}monitor:state"
    redis_client(settings).set(key, b"shadowpipe-monitor-state/7\n" + pickle.dumps({"x": 1}))
    with pytest.raises(checkpoint.CheckpointError, match="format 7"):
        Pipeline(settings)
    err = tmp_path / "err.log"
    # its own ClickHouse directory: this process may already hold the session's open
    own_ch = settings.replace(clickhouse_url=f"chdb://{tmp_path / 'ch'}")
    worker = spawn_cli(own_ch, "worker", "monitor", log=err)
    try:
        assert worker.wait(120) == 2
    finally:
        if worker.poll() is None:
            worker.kill()
    lines = err.read_text().strip().splitlines()
    assert len(lines) == 1, lines
    assert "SHADOWPIPE_REDIS_URL" in lines[0] and key in lines[0] and "format 7" in lines[0]


def test_joiner_answers_on_the_shared_health_paths(settings: Settings, tmp_path: Path) -> None:
    import time

    worker = spawn_cli(settings, "worker", "join", log=tmp_path / "join.log")
    try:
        deadline = time.monotonic() + 180
        while (reply := _get(settings, "/shadowpipe/join/ready")) is None or reply[0] != 200:
            assert worker.poll() is None, (tmp_path / "join.log").read_text()[-2000:]
            assert time.monotonic() < deadline, reply
            time.sleep(0.2)
        assert reply[1] == {"ready": True, "state": "ready", "reason": ""}
        status, stats = _get(settings, "/shadowpipe/join/stats") or (0, {})
        assert status == 200 and stats["ready"] and stats["pending"] == 0
        assert "redis_state_lost" in stats
        assert (_get(settings, "/join/stats/") or (0, {}))[1]["pending"] == 0  # older path
    finally:
        worker.terminate()
        worker.wait(60)


def test_worker_all_serves_every_worker_on_the_same_scheme(
        settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import time

    monkeypatch.setenv("PYTHONPATH", str(REPO))  # the worker imports the test challengers
    (tmp_path / "challengers.toml").write_text(CHALLENGERS)
    s = settings.replace(challengers=str(tmp_path / "challengers.toml"),
                         clickhouse_url=f"chdb://{tmp_path / 'ch'}")
    worker = spawn_cli(s, "worker", "all", log=tmp_path / "all.log")
    try:
        deadline = time.monotonic() + 240
        for name in ("shadow", "join", "monitor"):
            while (reply := _get(s, f"/shadowpipe/{name}/ready")) is None or reply[0] != 200:
                assert worker.poll() is None, (tmp_path / "all.log").read_text()[-2000:]
                assert time.monotonic() < deadline, (name, reply)
                time.sleep(0.2)
            status, stats = _get(s, f"/shadowpipe/{name}/stats") or (0, {})
            assert status == 200 and stats["state"] == "ready", (name, stats)
    finally:
        worker.terminate()
        worker.wait(60)
