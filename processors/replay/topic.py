"""Source 2 (``--from-topic``): the inference topic's retention, read from each partition's
first retained offset by assignment (no consumer group joins or commits: the live shadow
worker's offsets are untouched), decoded by the shadow worker's decoder.

Labels (and the join's state, version and label timing) come from the live
``joined_records`` where the request is there; a request the joiner never stored (expired,
or its feedback lost) is replayed unlabelled. The trade-off against the default source: the
topic has every request the service sent (ClickHouse holds only what the joiner matched,
within its TTL), but only as far back as the topic's retention, and each page asks
ClickHouse for its labels. Events after the replay's first start (``until``) are left out,
so a restart replays the same traffic; the mark keeps the next offset of every partition.

>>> label_sql("db")[:40]
'SELECT request_id, label, label_value, t'
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

from shadowpipe import kafka
from shadowpipe.processors.replay.progress import Mark
from shadowpipe.processors.replay.records import table
from shadowpipe.processors.replay.replayer import Replayer, Show, score
from shadowpipe.schemas.codec import DecodeError
from shadowpipe.tables import database

_LABELS = ("label", "label_value", "label_time", "label_delay_ms", "feedback_source",
           "feedback_weight", "state", "version", "joined_at")


def label_sql(db: str) -> str:
    """The stored label part of each of ``{ids}`` (the labelled row first)."""
    return ("SELECT request_id, label, label_value, toUnixTimestamp64Milli(label_time), "
            "label_delay_ms, feedback_source, feedback_weight, toString(state), version, "
            f"toUnixTimestamp64Milli(joined_at) FROM {db}.joined_records FINAL "
            "WHERE request_id IN {ids:Array(String)} "
            "ORDER BY request_id, isNull(label) LIMIT 1 BY request_id")


def _messages(replayer: Replayer, mark: Mark) -> Iterator[list[Any]]:
    """Batches of messages from the mark's offsets until every partition's end.

    The end is librdkafka's end-of-partition event, not the watermarks listed up front:
    the embedded broker lists high watermarks below the offsets it then serves.
    """
    from confluent_kafka import OFFSET_BEGINNING, KafkaError, TopicPartition

    s = replayer.settings
    topic = s.topic("inference")
    consumer = kafka.consumer(s, f"{s.topic_prefix}replay-{uuid.uuid4().hex}",
                              **{"enable.auto.commit": False, "enable.partition.eof": True})
    try:
        todo = set(consumer.list_topics(topic, timeout=10).topics[topic].partitions)
        consumer.assign([TopicPartition(topic, p, mark.offsets.get(p, OFFSET_BEGINNING))
                         for p in todo])
        while todo:
            batch = []
            for m in consumer.consume(s.shadow_batch_size, 1.0):
                if m.error() is None:
                    batch.append(m)
                elif m.error().code() == KafkaError._PARTITION_EOF:
                    todo.discard(m.partition())
            yield batch
    finally:
        consumer.close()


def _page(events: list[dict[str, Any]], labels: dict[str, tuple]) -> Any:
    """Stored-request columns (as :mod:`~shadowpipe.processors.replay.stored` reads them,
    an Arrow table) of decoded InferenceEvents and their stored labels."""
    cols: dict[str, list[Any]] = {}
    for name in ("request_id", "event_time", "model", "model_version", "context",
                 "num_features", "cat_features", "null_features", "inclusion_prob", "trace_id"):
        cols[name] = [e[name] for e in events]
    outs = [e["output"] or {} for e in events]
    cols["primary_label"] = [o.get("label") for o in outs]
    cols["primary_probabilities"] = [o.get("probabilities") or {} for o in outs]
    cols["primary_value"] = [o.get("value") for o in outs]
    cols["primary_latency_ms"] = [e["latency_ms"] for e in events]
    found = [labels.get(e["request_id"]) for e in events]
    for i, name in enumerate(_LABELS):
        cols[name] = [row[i] if row else None for row in found]
    cols["feedback_weight"] = [w if w is not None else 1.0 for w in cols["feedback_weight"]]
    cols["state"] = [st or "predicted" for st in cols["state"]]
    cols["version"] = [v or 1 for v in cols["version"]]
    cols["joined_at"] = [j or e for j, e in zip(cols["joined_at"], cols["event_time"],
                                                 strict=True)]
    return table(cols)


def replay_topic(replayer: Replayer, mark: Mark, show: Show) -> None:
    """Replay the inference topic's retained events after the mark's offsets."""
    live = database(replayer.settings.replace(run=""))
    decode = replayer.processor.decoder.decode
    pending: list[Any] = []
    for batch in _messages(replayer, mark):
        pending.extend(batch)
        if len(pending) >= replayer.page_rows or not batch:
            _replay_page(replayer, mark, pending, live, decode)
            pending = []
            show(mark)
    if pending:
        _replay_page(replayer, mark, pending, live, decode)
        show(mark)


def _replay_page(replayer: Replayer, mark: Mark, msgs: list[Any], live: str, decode: Any
                 ) -> None:
    events = []
    for m in msgs:
        try:
            event = decode(m.value())
        except DecodeError:  # the worker dead-lettered it live: nothing to score
            continue
        if event["event_time"] < mark.until_ms:
            events.append(event)
    ids = [e["request_id"] for e in events]
    rows = replayer.client.query(label_sql(live), parameters={"ids": ids}).result_rows
    page = _page(events, {row[0]: row[1:] for row in rows})
    scored = score(replayer.processor, page, replayer.who, replayer.settings.shadow_batch_size)
    offsets = {**mark.offsets, **{m.partition(): m.offset() + 1 for m in msgs}}
    replayer.write(mark, len(msgs), scored, offsets=offsets)
