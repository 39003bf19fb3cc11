"""The monitor worker's runtime on the real embedded stack: retries through a paused and a
restarted Redis, exit on dead processing, readiness and stats, windows closed by an idle
wall clock and on a graceful stop, and the web port checked at start-up."""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from shadowpipe.bench import synthetic
from shadowpipe.config import Settings
from shadowpipe.kafka import producer
from shadowpipe.processors.monitor.dedup import DAY_MS
from shadowpipe.processors.monitor.pipeline import Message, Pipeline
from shadowpipe.schemas.codec import Codec
from shadowpipe.stack import _redis_binary, free_port, port_open
from shadowpipe.stores import redis_client
from tests.conftest import chdb_rows, spawn_cli

CODEC = Codec()
MINUTE = 60_000


def _wait(what: str, fn: Callable[[], Any], timeout_s: float = 180.0,
          proc: subprocess.Popen | None = None) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = fn()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"worker exited ({proc.returncode}) waiting for {what}")
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def _get(s: Settings, path: str, **params: Any) -> tuple[int, Any] | None:
    url = f"http://{s.web_host}:{s.web_port}{path}"
    if params:
        url += "?" + urllib.parse.urlencode(params)
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())
    except OSError:
        return None


def _stats(s: Settings) -> dict[str, Any]:
    reply = _get(s, "/shadowpipe/monitor/stats")
    return reply[1] if reply is not None and reply[0] == 200 else {}


def _produce(s: Settings, records: list[dict[str, Any]]) -> None:
    prod = producer(s)
    for rec in records:
        prod.produce(s.topic("joined"), CODEC.encode("JoinedRecord", rec),
                     rec["request_id"].encode())
    prod.flush(30)


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
        proc.wait(30)


class RedisServer:
    """A redis-server of this test alone (the session's one is shared): paused, restarted."""

    def __init__(self, tmp: Path) -> None:
        self.port = free_port()
        self.dir = tmp / "redis"
        self.dir.mkdir()
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        # Persistent, as production Redis must be: a restart keeps the dedup bits and
        # the checkpoint (without them the replayed batch would count twice).
        self.proc = subprocess.Popen(
            [_redis_binary(), "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "yes", "--appendfsync", "always", "--dir", str(self.dir)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _wait("redis up", lambda: port_open("127.0.0.1", self.port), 30)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.terminate()
            self.proc.wait(30)

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path)
    server.start()
    yield server
    server.stop()


def _stream(requests: int, start_ms: int, interval_ms: float, seed: int) -> list[dict]:
    return synthetic.stream(synthetic.Spec(requests=requests, challengers=("c1",), seed=seed,
                                           interval_ms=interval_ms, start_ms=start_ms))


def _predicted(records: list[dict]) -> int:
    return sum(1 for r in records if r["state"] == "predicted")


# -- worker processes --------------------------------------------------------------------


def test_redis_paused_then_restarted_every_record_lands(
        settings: Settings, own_redis: RedisServer, tmp_path: Path) -> None:
    s = settings.replace(redis_url=own_redis.url, clickhouse_url=f"chdb://{tmp_path / 'ch'}",
                         clickhouse_database="pause", monitor_batch_ms=100,
                         monitor_idle_s=3600)  # no idle closes: records arrive late here
    start = (int(time.time() * 1000) // MINUTE - 30) * MINUTE
    records = _stream(3000, start, 100, seed=5)
    chunks = [records[i:i + 150] for i in range(0, len(records), 150)]
    worker = spawn_cli(s, "worker", "monitor", log=tmp_path / "worker.log")
    try:
        _wait("monitor ready", lambda: (_get(s, "/shadowpipe/monitor/ready") or (0,))[0] == 200,
              proc=worker)
        _produce(s, chunks[0])
        _wait("first records stored", lambda: _stats(s).get("counted"), proc=worker)

        def feed() -> None:
            for chunk in chunks[1:]:
                _produce(s, chunk)
                time.sleep(0.3)  # a steady stream, so that batches meet the pause

        feeding = threading.Thread(target=feed, daemon=True)
        own_redis.signal(signal.SIGSTOP)
        feeding.start()
        # The dedup lookup times out against the paused Redis and is retried: not ready.
        state = _wait("readiness: retrying", lambda: (
            (r := _get(s, "/shadowpipe/monitor/ready")) and r[0] == 503 and r[1]), proc=worker)
        assert state["state"] == "retrying" and "Redis" in state["reason"]
        own_redis.signal(signal.SIGCONT)
        _wait("ready again", lambda: (_get(s, "/shadowpipe/monitor/ready") or (0,))[0] == 200,
              proc=worker)

        own_redis.stop()  # a restart under traffic: ConnectionError, then back
        own_redis.start()
        feeding.join(120)
        assert not feeding.is_alive()
        # A batch is counted once ClickHouse took its joined records.
        _wait("every record counted and stored",
              lambda: _stats(s).get("counted") == len(records), timeout_s=240, proc=worker)
        stats = _stats(s)
        assert stats["ready"] and stats["state"] == "ready"
        assert stats["retries"] >= 1 and "Redis" in stats["last_error"]
        assert worker.poll() is None
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(60) == 0
    finally:
        _stop(worker)
    # Nothing counted twice: the windows (closed on stop, or stored provisionally) sum up.
    [[stored, labelled, total]] = chdb_rows(tmp_path / "ch", (
        "SELECT (SELECT count() FROM pause.joined_records FINAL), "
        "(SELECT countIf(state = 'labelled') FROM pause.joined_records FINAL), "
        "(SELECT sum(published) FROM pause.windows FINAL WHERE segment = '')"))
    assert int(stored) == len({r["request_id"] for r in records})
    assert int(labelled) == len(records) - _predicted(records)
    assert int(total) == _predicted(records)


def test_dead_processing_exits_nonzero(settings: Settings, own_redis: RedisServer,
                                       tmp_path: Path) -> None:
    s = settings.replace(redis_url=own_redis.url, clickhouse_url=f"chdb://{tmp_path / 'ch'}",
                         clickhouse_database="dead")
    start = (int(time.time() * 1000) // MINUTE - 30) * MINUTE
    records = _stream(50, start, 100, seed=6)
    # Not a transient error: the dedup hash of that day is a string (WRONGTYPE).
    redis_client(s).set(f"{s.topic_prefix}monitor:seen:{start // DAY_MS}", "not a hash")
    _produce(s, records)
    log = tmp_path / "worker.log"
    worker = spawn_cli(s, "worker", "monitor", log=log)
    try:
        assert worker.wait(180) == 1
    finally:
        _stop(worker)
    text = log.read_text()
    assert "monitor processing died" in text and "WRONGTYPE" in text


def test_idle_stream_closes_its_last_window_and_sigint_stores_the_open_one(
        settings: Settings, tmp_path: Path) -> None:
    s = settings.replace(clickhouse_url=f"chdb://{tmp_path / 'ch'}", clickhouse_database="idle",
                         window_s=2, allowed_lateness_s=7,
                         monitor_idle_s=8,  # far above the gaps inside one burst
                         monitor_batch_ms=50)
    now = int(time.time() * 1000)
    # 5 s of traffic ending 20 s ago; the lateness covers the partitions' skew (5 s + labels)
    first = _stream(200, now - 25_000, 25, seed=7)
    worker = spawn_cli(s, "worker", "monitor", log=tmp_path / "worker.log")
    try:
        _wait("monitor ready", lambda: (_get(s, "/shadowpipe/monitor/ready") or (0,))[0] == 200,
              proc=worker)
        _produce(s, first + first[:50])  # the repeat: redelivered, counted once
        last_start = max(r["event_time"] for r in first) // 2000 * 2000

        def closed() -> dict[str, Any] | None:
            reply = _get(s, "/shadowpipe/monitor/stats")
            return reply[1] if reply and reply[1]["windows_closed"] and \
                reply[1]["windows_open"] == 0 and reply[1]["records"] >= len(first) + 50 else None

        # No further traffic: only the wall clock can close the stream's last window.
        stats = _wait("idle windows closed", closed, proc=worker)
        assert stats["counted"] == len(first) and stats["duplicates"] == 50
        assert stats["clickhouse"]["rows_written"] > 0 and stats["clickhouse"]["last_write_ms"]
        assert stats["late_dropped"] == 0 and stats["lag"]["records"] == 0
        reply = _get(s, "/shadowpipe/query/", name="windows", since_ms=0, challenger="")
        assert reply is not None and reply[0] == 200
        starts = {row[reply[1]["columns"].index("window_start_ms")] for row in reply[1]["rows"]}
        assert last_start in starts

        second = _stream(40, int(time.time() * 1000), 10, seed=8)  # a window still open
        second = [{**r, "request_id": f"b-{r['request_id']}"} for r in second]
        _produce(s, second)
        _wait("second records counted", lambda: (
            (r := _get(s, "/shadowpipe/monitor/stats")) and
            r[1]["counted"] == len(first) + len(second)), proc=worker)
        worker.send_signal(signal.SIGINT)
        assert worker.wait(60) == 0
    finally:
        _stop(worker)
    rows = chdb_rows(tmp_path / "ch",
                     "SELECT toUnixTimestamp64Milli(window_start), published FROM idle.windows "
                     "FINAL WHERE segment = ''")
    assert sum(n for _start, n in rows) == _predicted(first) + _predicted(second)
    assert max(start for start, _n in rows) >= max(r["event_time"] for r in second) // 2000 * 2000


def test_taken_web_port_is_one_line_and_exit_2(settings: Settings, tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind((settings.web_host, settings.web_port))
        taken.listen()
        err = tmp_path / "err.log"
        worker = spawn_cli(settings, "worker", "monitor", log=err)
        try:
            assert worker.wait(60) == 2
        finally:
            _stop(worker)
    lines = err.read_text().strip().splitlines()
    assert len(lines) == 1 and "SHADOWPIPE_WEB_PORT" in lines[0], lines
    assert str(settings.web_port) in lines[0]


# -- the pipeline with an injected clock -----------------------------------------------------


def _messages(records: list[dict]) -> list[Message]:
    return [Message(CODEC.encode("JoinedRecord", r), r["request_id"].encode(), "joined", 0, i)
            for i, r in enumerate(records)]


def _pipeline(settings: Settings, clock: list[int]) -> Pipeline:
    s = settings.replace(clickhouse_database=f"r{uuid.uuid4().hex[:10]}", window_s=60,
                         allowed_lateness_s=60, monitor_idle_s=30)
    pipeline = Pipeline(s, clock=lambda: clock[0])
    pipeline.migrate()
    return pipeline


def _window_rows(pipeline: Pipeline) -> dict[int, int]:
    db = pipeline.settings.clickhouse_database
    rows = pipeline.sink.connect().query(
        f"SELECT toUnixTimestamp64Milli(window_start), published FROM {db}.windows FINAL "
        "WHERE segment = ''").result_rows
    return dict(rows)


def test_close_idle_waits_for_idleness_and_the_wall_clock(settings: Settings) -> None:
    t0 = (int(time.time() * 1000) // MINUTE - 10) * MINUTE
    clock = [t0 + 150_000]
    pipeline = _pipeline(settings, clock)
    records = _stream(300, t0, 500, seed=9)  # 150 s: windows t0, t0+1m, t0+2m
    pipeline.process(_messages(records))
    assert _window_rows(pipeline) == {t0: 120}  # the watermark (t0+150 s) closed the first

    clock[0] += 29_000
    assert pipeline.close_idle().windows == []  # 29 s without records: not idle yet
    clock[0] += 2_000  # idle, and the wall clock (t0+181 s) is past t0+1m's end + lateness
    assert [w["window_start"] for w in pipeline.close_idle().windows] == [t0 + MINUTE]
    clock[0] = t0 + 240_000
    assert [w["window_start"] for w in pipeline.close_idle().windows] == [t0 + 2 * MINUTE]
    assert _window_rows(pipeline) == {t0: 120, t0 + MINUTE: 120, t0 + 2 * MINUTE: 60}

    # The watermark went only as far as those windows: a later window still counts.
    later = [{**r, "request_id": f"l-{r['request_id']}", "event_time": t0 + 200_000}
             for r in records[:10] if r["state"] == "predicted"]
    result = pipeline.process(_messages(later))
    assert result.counted == len(later)
    assert pipeline.close_idle().windows == []  # records just arrived: not idle


def test_close_on_stop_stores_open_windows_that_their_final_row_replaces(
        settings: Settings) -> None:
    t0 = (int(time.time() * 1000) // MINUTE - 10) * MINUTE
    clock = [t0 + 50_000]
    pipeline = _pipeline(settings, clock)
    records = _stream(100, t0, 500, seed=10)  # 50 s: one window, open
    pipeline.process(_messages(records[:100]))
    result = pipeline.close_on_stop()
    assert result.windows == []  # nothing due: stored provisionally, not closed
    assert _window_rows(pipeline) == {t0: _predicted(records[:100])}
    pipeline.checkpoint()

    restarted = Pipeline(pipeline.settings, clock=lambda: clock[0])
    restarted.process(_messages(records[100:]))
    clock[0] = t0 + 121_000
    restarted.last_record_ms = 0  # idle since long
    assert [w["window_start"] for w in restarted.close_idle().windows] == [t0]
    assert _window_rows(restarted) == {t0: _predicted(records)}


def test_close_on_stop_all_closes_every_window(settings: Settings) -> None:
    t0 = (int(time.time() * 1000) // MINUTE - 10) * MINUTE
    clock = [t0 + 50_000]
    pipeline = _pipeline(settings, clock)
    pipeline.settings = pipeline.settings.replace(monitor_close_on_stop="all")
    records = _stream(100, t0, 500, seed=11)
    pipeline.process(_messages(records))
    result = pipeline.close_on_stop()
    assert [w["window_start"] for w in result.windows if not w["segment"]] == [t0]
    assert pipeline.windows_open() == 0


def test_stop_does_not_wait_without_bound_behind_a_busy_executor(
        settings: Settings, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """The stop's close queues behind the executor's job (a slow query, the verdict): the
    stop gives it up after its bound; the windows close after the restart instead."""
    from shadowpipe.processors.monitor import runtime as rt

    t0 = (int(time.time() * 1000) // MINUTE - 10) * MINUTE
    pipeline = _pipeline(settings, [t0 + 50_000])
    pipeline.process(_messages(_stream(100, t0, 500, seed=12)))  # one open window
    runtime = rt.Runtime(pipeline.settings, pipeline)
    monkeypatch.setattr(rt, "STOP_FLUSH_S", 0.2)
    busy = threading.Event()
    runtime.executor.submit(busy.wait, 30)  # holds the executor's one thread
    try:
        asyncio.run(runtime.stop())
        assert "did not start or end within" in caplog.text
        assert _window_rows(pipeline) == {}  # nothing stored by the abandoned close
    finally:
        busy.set()
        runtime.executor.shutdown(wait=True)
