"""Smoke round trip: emit events through the broker and read them back decoded.

Checks the whole wire path (encode, produce with the production producer settings,
consume, decode) against whatever stack the settings point at.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

from shadowpipe import kafka
from shadowpipe.config import Settings
from shadowpipe.schemas.codec import Codec


def sample_events(run_id: str, count: int) -> list[tuple[str, dict[str, Any]]]:
    """``count`` inference events and one feedback per even request."""
    now = int(time.time() * 1000)
    out: list[tuple[str, dict[str, Any]]] = []
    for i in range(count):
        rid = f"{run_id}-{i}"
        out.append(("InferenceEvent", {
            "request_id": rid, "event_time": now + i, "model": "smoke", "model_version": "1",
            "num_features": {f"x{j}": float(i * j) for j in range(5)},
            "output": {"label": "yes" if i % 3 else "no", "probabilities": {"yes": 0.6, "no": 0.4}},
            "latency_ms": 1.0, "context": {"segment": f"s{i % 2}"},
        }))
        if i % 2 == 0:
            out.append(("Feedback", {"request_id": rid, "label": "yes", "event_time": now + i}))
    return out


def round_trip(settings: Settings, count: int = 1000, timeout_s: float = 30.0) -> dict[str, int]:
    """Produce ``count`` inference events (and feedback for half), consume them back."""
    run_id = uuid.uuid4().hex[:12]
    codec = Codec(settings.schema_registry_url)
    topics = {"InferenceEvent": settings.topic("inference"), "Feedback": settings.topic("feedback")}
    producer = kafka.producer(settings)
    sent = {"InferenceEvent": 0, "Feedback": 0}
    for kind, record in sample_events(run_id, count):
        producer.produce(topics[kind], codec.encode(kind, record), key=record["request_id"])
        sent[kind] += 1
        producer.poll(0)
    undelivered = producer.flush(timeout_s)
    consumer = kafka.consumer(settings, f"smoke-{run_id}")
    consumer.subscribe(list(topics.values()))
    kind_of = {topic: kind for kind, topic in topics.items()}
    received = {"InferenceEvent": 0, "Feedback": 0}
    deadline = time.monotonic() + timeout_s
    try:
        while sum(received.values()) < sum(sent.values()) and time.monotonic() < deadline:
            for msg in consumer.consume(1000, timeout=0.5):
                if msg.error() or not (msg.key() or b"").startswith(run_id.encode()):
                    continue
                record = codec.decode(msg.value(), kind_of[msg.topic()])
                received[kind_of[msg.topic()]] += record["request_id"].startswith(run_id)
    finally:
        consumer.close()
    return {
        "inference_sent": sent["InferenceEvent"], "inference_received": received["InferenceEvent"],
        "feedback_sent": sent["Feedback"], "feedback_received": received["Feedback"],
        "undelivered": undelivered,
    }
