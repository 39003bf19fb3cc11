"""Receive alerts: follow the alert topic from a service (base install: confluent-kafka and
fastavro only).

An alert condition is published when it starts (``status`` firing) and when it ends
(``status`` resolved, ``details["resolves"]`` names the firing alert). Alerts may repeat
after a monitor restart (at-least-once); a repeated alert carries the same ``alert_id``, so
:func:`follow` drops ids it has already yielded.

>>> from shadowpipe.config import Settings
>>> def on_alert(alert):
...     print(alert["kind"], alert["challenger"], alert["segment"])
>>> # subscribe(Settings.load(), on_alert)            # blocks, calling on_alert per alert
>>> # for alert in follow(Settings.load(), from_now=True): ...
>>> _start_offsets([(0, 5), (1, -1)], 0)
[5, -2]
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

from shadowpipe.config import Settings

OFFSET_BEGINNING = -2


def _start_offsets(found: list[tuple[int, int]], _now: int) -> list[int]:
    """Offset per partition from offsets_for_times; -1 (none that late) reads from the
    beginning and relies on the timestamp filter (the embedded broker's "latest" is wrong)."""
    return [offset if offset >= 0 else OFFSET_BEGINNING for _, offset in found]


def follow(settings: Settings, *, from_now: bool = False, group_id: str | None = None,
           poll_s: float = 0.5, stop: Callable[[], bool] | None = None
           ) -> Iterator[dict[str, Any]]:
    """Yield Alert records from the alert topic, oldest first, until ``stop()`` is true.

    Without ``group_id`` every partition is assigned directly (no group to join: a new
    group waits ~20 s for its first message on the embedded broker) and read from the
    start, or with ``from_now`` only alerts published from now on. With ``group_id`` the
    consumer joins that group, which keeps the partitions and offsets it commits.
    """
    from shadowpipe import kafka
    from shadowpipe.schemas.codec import Codec, DecodeError

    codec = Codec(settings.schema_registry_url)
    start_ms = int(time.time() * 1000) if from_now else 0
    topic = settings.topic("alerts")
    consumer = kafka.consumer(settings, group_id or f"{settings.topic_prefix}alerts-{uuid.uuid4()}")
    if group_id:
        consumer.subscribe([topic], on_assign=lambda c, parts: _position(
            c, parts, start_ms if from_now else None))
    else:
        _assign(consumer, topic, start_ms if from_now else None)
    seen: set[str] = set()
    try:
        while not (stop and stop()):
            msg = consumer.poll(poll_s)
            if msg is None or msg.error():
                continue
            ts_type, ts = msg.timestamp()
            if from_now and ts_type and ts < start_ms:
                continue
            try:
                alert = codec.decode(msg.value(), "Alert")
            except DecodeError:
                continue  # not an alert: nothing a subscriber can act on
            key = (alert["alert_id"], alert.get("status", "firing"))
            if key not in seen:
                seen.add(key)
                yield alert
    finally:
        consumer.close()


def _assign(consumer: Any, topic: str, start_ms: int | None) -> None:
    """Assign every partition of ``topic`` at its start (or at ``start_ms``)."""
    from confluent_kafka import TopicPartition

    meta = consumer.list_topics(topic, timeout=10).topics.get(topic)
    if meta is None or meta.error is not None or not meta.partitions:
        from shadowpipe.config import ConfigError

        raise ConfigError("topic_alerts", f"topic {topic!r} not found (shadowpipe init)")
    parts = [TopicPartition(topic, p, OFFSET_BEGINNING) for p in sorted(meta.partitions)]
    _position(consumer, parts, start_ms)


def _position(consumer: Any, partitions: list[Any], start_ms: int | None) -> None:
    """Assign ``partitions`` from the start, or from the first offset at ``start_ms``."""
    from confluent_kafka import TopicPartition

    if start_ms is not None:
        asked = [TopicPartition(p.topic, p.partition, start_ms) for p in partitions]
        found = consumer.offsets_for_times(asked, timeout=10)
        offsets = _start_offsets([(p.partition, p.offset) for p in found], start_ms)
        for p, offset in zip(partitions, offsets, strict=True):
            p.offset = offset
    consumer.assign(partitions)


def subscribe(settings: Settings, callback: Callable[[dict[str, Any]], Any], **kwargs: Any
              ) -> None:
    """Call ``callback(alert)`` for every alert (see :func:`follow` for the options)."""
    for alert in follow(settings, **kwargs):
        callback(alert)
