"""A Redis that comes back empty is noticed: one log line and a counter, in the joiner and
the monitor; a Redis restarted with its append-only file (the embedded default) is not.

Each test runs its own embedded stack (broker and Redis on free ports) so that it can kill
and restart redis-server without disturbing the session's stack.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import signal
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from shadowpipe.config import Settings
from shadowpipe.kafka import consumer, ensure_topics
from shadowpipe.stack import EmbeddedStack, _pid_alive, free_port
from shadowpipe.stores import redis_client
from tests.conftest import spawn_cli
from tests.test_join_core import make_requests
from tests.test_join_worker import _keyed, _produce, _stop

JOIN_LINE = "Redis lost the join state"
MONITOR_LINE = "Redis lost the monitor state"


@pytest.fixture
def own(stack_settings: Settings, tmp_path: Path) -> Iterator[tuple[Settings, EmbeddedStack]]:
    """Settings on a stack of this test's own (ClickHouse stays the session's: one chdb
    path per process)."""
    s = stack_settings.replace(
        home=str(tmp_path / "home"), kafka_bootstrap=f"127.0.0.1:{free_port()}",
        redis_url=f"redis://127.0.0.1:{free_port()}/0", web_port=free_port(),
        topic_prefix=f"t{uuid.uuid4().hex[:10]}.", log_level="WARNING")
    stack = EmbeddedStack(s)
    stack.up()
    try:
        yield s, stack
    finally:
        stack.down()


def restart_redis(stack: EmbeddedStack, *, keep_data: bool) -> None:
    """kill -9 the stack's redis-server and start it again, with or without its data."""
    pid = stack._recorded()["redis"]
    os.kill(pid, signal.SIGKILL)
    _until("redis-server gone", lambda: not _pid_alive(pid))
    if not keep_data:
        shutil.rmtree(stack.home / "redis")
    stack.up()


def _until(what: str, done: Callable[[], Any], timeout_s: float = 120.0) -> Any:
    deadline = time.monotonic() + timeout_s
    while not (value := done()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)
    return value


def _join_stats(s: Settings) -> dict[str, int] | None:
    try:
        url = f"http://{s.web_host}:{s.web_port}/join/stats/"
        with urllib.request.urlopen(url, timeout=10) as resp:
            return json.loads(resp.read())
    except OSError:  # not serving yet, or Redis down while it counts the pending requests
        return None


def test_joiner_reports_redis_that_came_back_empty_once(own, tmp_path: Path) -> None:
    s, stack = own
    rng = random.Random(5)
    log = tmp_path / "join.log"
    worker = spawn_cli(s, "worker", "join", log=log)
    sent = 0

    def send(n: int) -> int:
        """Inferences and predictions of ``n`` new requests; the inference count expected."""
        reqs = make_requests(rng, n)
        _produce(s, [m for m in _keyed(reqs, rng, 0) if m[0] != "feedback"])
        return sent + n

    def counted(n: int) -> Callable[[], dict | None]:
        return lambda: (st := _join_stats(s)) and st.get("in_inference", 0) >= n and st

    try:
        sent = send(30)
        first = _until("the first requests merged", counted(sent))
        assert first["pending"] >= 30 and first["redis_state_lost"] == 0
        restart_redis(stack, keep_data=True)  # the embedded default: nothing was lost
        sent = send(10)
        kept = _until("merged after a restart with data", counted(sent))
        assert kept["pending"] >= 40 and kept["redis_state_lost"] == 0
        restart_redis(stack, keep_data=False)  # as a Redis without persistence would
        sent = send(10)
        after = _until("the loss counted", lambda: (st := counted(sent)()) and
                       st["redis_state_lost"] >= 1 and st)
        sent = send(10)
        _until("merged after the loss", counted(sent))
        assert _join_stats(s)["redis_state_lost"] == 1
        assert after["pending"] < 40  # the requests merged before the loss are gone
    finally:
        _stop(worker)
    lines = [line for line in log.read_text().splitlines() if JOIN_LINE in line]
    assert len(lines) == 1, lines
    assert "appendonly yes" in lines[0] and "requests waiting" in lines[0]


def test_joiner_restarted_on_an_empty_redis_reports_it_at_start(own, tmp_path: Path) -> None:
    """The audit's case: the joiner died with Redis and was restarted on an empty one."""
    s, stack = own
    rng = random.Random(6)
    log = tmp_path / "join.log"
    worker = spawn_cli(s, "worker", "join", log=log)
    try:
        _produce(s, [m for m in _keyed(make_requests(rng, 20), rng, 0) if m[0] == "inference"])
        _until("committed offsets", lambda: _committed(s, f"{s.topic_prefix}join", "inference"))
    finally:
        _stop(worker)
    restart_redis(stack, keep_data=False)
    worker = spawn_cli(s, "worker", "join", log=log)
    try:
        _until("the loss counted", lambda: (st := _join_stats(s)) and st["redis_state_lost"])
        _produce(s, [m for m in _keyed(make_requests(rng, 5), rng, 0) if m[0] == "inference"])
        stats = _until("merged after the loss",
                       lambda: (st := _join_stats(s)) and st.get("in_inference") == 5 and st)
        assert stats["redis_state_lost"] == 1
    finally:
        _stop(worker)
    assert sum(JOIN_LINE in line for line in log.read_text().splitlines()) == 1


def _committed(s: Settings, group: str, kind: str) -> bool:
    from shadowpipe.processors.state_marker import has_committed_offsets

    return has_committed_offsets(s, [group], [s.topic(kind)])


def _commit_joined(s: Settings, group: str) -> None:
    """Commit an offset on the joined topic as the monitor's Faust consumer would."""
    from confluent_kafka import TopicPartition

    c = consumer(s, group)
    c.commit(offsets=[TopicPartition(s.topic("joined"), 0, 0)], asynchronous=False)
    c.close()


def test_monitor_reports_a_lost_checkpoint_once(own, caplog: pytest.LogCaptureFixture) -> None:
    from shadowpipe.processors.monitor.pipeline import Pipeline

    s, stack = own
    ensure_topics(s)
    caplog.set_level(logging.ERROR, logger="shadowpipe.state")
    pipeline = Pipeline(s)  # a new deployment: no marker and no offsets, nothing lost
    pipeline.marker.every_s = 0.0
    pipeline.checkpoint()
    assert redis_client(s).exists(pipeline.state_key, pipeline.marker.key) == 2
    restart_redis(stack, keep_data=True)
    pipeline.checkpoint()
    assert pipeline.marker.lost == 0
    restart_redis(stack, keep_data=False)
    pipeline.checkpoint()
    pipeline.checkpoint()
    assert pipeline.marker.lost == 1
    from shadowpipe.processors.monitor.runtime import Runtime

    assert Runtime(s, pipeline).stats(lambda topic, partition: None)["redis_state_lost"] == 1
    lines = [r.getMessage() for r in caplog.records if MONITOR_LINE in r.getMessage()]
    assert len(lines) == 1 and "open windows" in lines[0]

    # A monitor starting on an emptied Redis while its group has committed offsets.
    _commit_joined(s, f"{s.topic_prefix}worker-monitor")
    assert Pipeline(s).marker.lost == 0  # the checkpoint above is still there: not lost
    restart_redis(stack, keep_data=False)
    assert Pipeline(s).marker.lost == 1


def test_join_store_reloads_its_script_after_a_script_cache_flush(own) -> None:
    """A restarted Redis 7 (or SCRIPT FLUSH) forgets the merge script: one failed batch,
    then the retry works (it used to fail with NOSCRIPT forever)."""
    from shadowpipe.processors.join.store import JoinStore, Part, StoreError

    s, _ = own
    client = redis_client(s)
    store = JoinStore(client, f"{s.topic_prefix}join:", 3600)
    part = Part("f", "r1", "", b"label", 5, 1)
    assert store.merge([part], 1000)[0][0] == 1  # stored
    client.script_flush()
    other = Part("f", "r2", "", b"label", 5, 2)
    with pytest.raises(StoreError):
        store.merge([other], 1000)
    assert store.merge([other], 1000)[0][0] == 1
