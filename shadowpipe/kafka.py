"""Kafka clients built from :class:`~shadowpipe.config.Settings`, and topic creation.

Producers use ``murmur2_random`` so keys land on the same partitions as with the Java
client and aiokafka (Faust); consumers use a short session timeout because the embedded
broker answers JoinGroup only after half of it.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

from confluent_kafka import Consumer, KafkaException, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

from shadowpipe.config import TOPIC_KINDS, ConfigError, Settings, env_name

PRODUCER_DEFAULTS: dict[str, Any] = {
    "enable.idempotence": True,
    "acks": "all",
    "compression.type": "lz4",
    "partitioner": "murmur2_random",
    "linger.ms": 5,
}
CONSUMER_DEFAULTS: dict[str, Any] = {
    "enable.auto.commit": False,
    "auto.offset.reset": "earliest",
    "session.timeout.ms": 6000,
    "heartbeat.interval.ms": 1000,
}


def producer(settings: Settings, **overrides: Any) -> Producer:
    """An idempotent, acks=all, key-compatible producer."""
    return Producer(settings.kafka_config(**{**PRODUCER_DEFAULTS, **overrides}))


def consumer(settings: Settings, group_id: str, **overrides: Any) -> Consumer:
    """A manually committing consumer in ``group_id``."""
    conf = {**CONSUMER_DEFAULTS, "group.id": group_id, **overrides}
    return Consumer(settings.kafka_config(**conf))


def admin(settings: Settings, **overrides: Any) -> AdminClient:
    return AdminClient(settings.kafka_config(**overrides))


def ensure_topics(settings: Settings, timeout_s: float = 10.0) -> list[str]:
    """Create every shadowpipe topic that does not exist yet; return the ones created."""
    client = admin(settings)
    existing = set(client.list_topics(timeout=timeout_s).topics)
    wanted = [settings.topic(kind) for kind in TOPIC_KINDS]
    new = [
        NewTopic(name, settings.partitions, settings.replication_factor)
        for name in wanted
        if name not in existing
    ]
    if not new:
        return []
    for _name, future in client.create_topics(new, operation_timeout=timeout_s).items():
        try:
            future.result()
        except KafkaException as exc:
            if "TOPIC_ALREADY_EXISTS" not in str(exc):
                raise
    return [t.topic for t in new]


def check_reachable(settings: Settings, service: str, timeout_s: float = 5.0) -> None:
    """Raise :class:`ConfigError` naming the bootstrap setting if no broker answers."""
    try:
        # Quiet: the one-line error below says it all; librdkafka would log every retry.
        admin(settings, log_level=0).list_topics(timeout=timeout_s)
    except KafkaException as exc:
        raise ConfigError(
            env_name("kafka_bootstrap"),
            f"no Kafka broker answers at {settings.kafka_bootstrap} ({exc.args[0].str()})",
            service,
        ) from None


class EndOffsets:
    """Each partition's end offset (where its next record will be written), right on every
    broker: the embedded tansu answers ListOffsets "latest" with the base offset of the
    partition's last batch + 1, short of the end by the rest of that batch. So the listed
    offset is checked with one fetch from the offset before it, whose high watermark is
    right (on Kafka the listed offset already is).

    One instance per thread: it owns a consumer that it assigns.

    >>> from shadowpipe.config import Settings
    >>> ends = EndOffsets(Settings())  # no broker contacted until asked
    >>> ends({})
    {}
    >>> ends.close()
    """

    def __init__(self, settings: Settings, timeout_s: float = 10.0) -> None:
        self.timeout_s = timeout_s
        # A fetch answers with the partition's high watermark, right on every broker: one
        # small fetch per partition (the batch at the listed offset) is all it takes.
        self.consumer = consumer(settings, f"shadowpipe-ends-{uuid.uuid4().hex[:8]}",
                                 **{"enable.partition.eof": True, "fetch.wait.max.ms": 10,
                                    "max.partition.fetch.bytes": 1, "queued.min.messages": 1,
                                    "fetch.queue.backoff.ms": 10})
        self._known: dict[tuple[str, int], tuple[int, int]] = {}  # listed -> true end

    def __call__(self, tps: Any) -> dict[tuple[str, int], int]:
        """``{(topic, partition): end}`` for the ``TopicPartition`` objects ``tps``."""
        ends, check = {}, []
        for tp in tps:
            key = (tp.topic, tp.partition)
            low, listed = self.consumer.get_watermark_offsets(tp, timeout=self.timeout_s,
                                                              cached=False)
            known = self._known.get(key)
            if known and known[0] == listed:  # no new batch since: the same end
                ends[key] = known[1]
            elif listed > low:
                check.append((key, listed))
            else:
                ends[key] = listed  # empty
        if check:
            ends.update(self._fetched_ends(check))
            self._known.update({key: (listed, ends[key]) for key, listed in check})
        return ends

    def _fetched_ends(self, check: list[tuple[tuple[str, int], int]]) -> dict[tuple[str, int], int]:
        """Fetch from the offset before each listed end; the first answer (a record, or
        end-of-partition) updates librdkafka's cached high watermark, the true end."""
        tps = {key: TopicPartition(*key, listed - 1) for key, listed in check}
        self.consumer.assign(list(tps.values()))
        waiting = dict(check)
        ends: dict[tuple[str, int], int] = {}
        deadline = time.monotonic() + self.timeout_s
        while waiting and time.monotonic() < deadline:
            for msg in self.consumer.consume(1000, 0.02):
                if (key := (msg.topic(), msg.partition())) in waiting:
                    high = self.consumer.get_watermark_offsets(tps[key], cached=True)[1]
                    ends[key] = max(high, waiting.pop(key))
        self.consumer.unassign()
        if waiting:
            raise KafkaException(f"no fetch answered in {self.timeout_s:.0f} s: "
                                 f"{sorted(waiting)}")
        return ends

    def close(self) -> None:
        self.consumer.close()
