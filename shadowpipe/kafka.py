"""Kafka clients built from :class:`~shadowpipe.config.Settings`, and topic creation.

Producers use ``murmur2_random`` so keys land on the same partitions as with the Java
client and aiokafka (Faust); consumers use a short session timeout because the embedded
broker answers JoinGroup only after half of it.
"""

from __future__ import annotations

from typing import Any

from confluent_kafka import Consumer, KafkaException, Producer
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
