"""The one consumed-message type of every processor."""

from __future__ import annotations

from typing import Any, NamedTuple


class Message(NamedTuple):  # a tuple: one is built per consumed message
    """One consumed Kafka message.

    >>> Message(b"v", b"k", "shadowpipe.joined", 0, 7)
    Message(value=b'v', key=b'k', topic='shadowpipe.joined', partition=0, offset=7, timestamp=None)
    """

    value: bytes | None
    key: bytes | None = None
    topic: str = ""
    partition: int = 0
    offset: int = 0
    timestamp: int | None = None  # ms since the epoch; None when the broker gave none


def from_kafka(msgs: list[Any]) -> tuple[list[Message], list[Any]]:
    """librdkafka messages as :class:`Message`, and the errors among them (not messages).

    >>> from_kafka([])
    ([], [])
    """
    batch, errors = [], []
    append = batch.append
    for m in msgs:
        if m.error() is not None:
            errors.append(m.error())
            continue
        ts_type, ts = m.timestamp()
        append(Message(m.value(), m.key(), m.topic(), m.partition(), m.offset(),
                       ts if ts_type else None))
    return batch, errors
