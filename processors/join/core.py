"""The join core: decode a micro-batch, merge it into Redis, build the JoinedRecords.

Both the Faust agent and ``shadowpipe bench join`` drive this class, so what the benchmark
measures is what the worker runs. It is synchronous (the agent calls it in a thread).

>>> msg = Message(b"\\x99", b"r1", "shadowpipe.feedback", 0, 7)
>>> try:
...     decode_part(Codec(), "feedback", msg)
... except DecodeError as exc:
...     exc.reason
'unrecognised framing: first byte 0x99 is not Avro or JSON'
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from shadowpipe.config import Settings
from shadowpipe.processors.dead_letter import dead_letter
from shadowpipe.processors.join.fastpath import inference_part, shadow_part
from shadowpipe.processors.join.parts import (
    FeatureLayouts,
    build_bodies,
    build_body,
    encode_feedback,
    encode_inference,
    encode_shadow,
    join_state,
)
from shadowpipe.processors.join.store import (
    CHUNK,
    CODE_NAMES,
    LATE_FEEDBACK,
    LATE_INFERENCE,
    LATE_PREDICTION,
    REDELIVERED,
    Claim,
    Emission,
    Part,
    StoreError,
    join_store,
    message_id,
)
from shadowpipe.processors.runtime.message import Message
from shadowpipe.schemas.codec import Codec, DecodeError
from shadowpipe.schemas.validate import InvalidRecord, check_answer, check_request_id

# Input topic kind -> (schema, stored-part kind).
INPUTS = {"inference": ("InferenceEvent", "i"), "predictions": ("ShadowPrediction", "s"),
          "feedback": ("Feedback", "f")}
WORKER = "join"


# A message that decodes but cannot be joined (e.g. no request id): the wire layer's verdict.
InvalidInput = InvalidRecord


@dataclass
class BatchResult:
    """What a batch produces: JoinedRecords and dead letters, each (key, encoded value)."""

    joined: list[tuple[bytes, bytes]] = field(default_factory=list)
    dead: list[tuple[bytes | None, bytes]] = field(default_factory=list)


def key_prefix(settings: Settings) -> str:
    """Redis key prefix of the joiner, derived from the topic prefix (one per deployment).

    >>> key_prefix(Settings.load(env={}))
    'shadowpipe.join:'
    """
    return f"{settings.topic_prefix}join:"


def decode_part(codec: Codec, topic_kind: str, msg: Message,
                layouts: FeatureLayouts | None = None) -> Part:
    """Decode and validate ``msg`` of input ``topic_kind`` (inference, predictions,
    feedback) into a :class:`Part`; raises DecodeError or InvalidInput.

    Current-schema single-object messages take the allocation-free :mod:`fastpath`; the rest
    (and anything it finds unusual, or would have to judge: a time that is not a positive
    epoch-ms, a non-finite feature) go through the Codec, whose validation
    (:mod:`shadowpipe.schemas.validate`) the shadow worker and the monitor share.
    """
    schema_name, kind = INPUTS[topic_kind]
    msg_id = message_id(msg.partition, msg.offset)
    value = msg.value or b""
    if kind == "s":
        if (shadow := shadow_part(value)) is not None:
            request_id, challenger, answered, blob = shadow
            check_request_id(request_id)
            check_answer(challenger, answered)
            return Part("s", request_id, challenger, blob, 0, msg_id)
    elif kind == "i" and (fast := inference_part(value, layouts)) is not None:
        return Part("i", check_request_id(fast[0]), "", fast[1], 0, msg_id)
    record = codec.decode(msg.value, schema_name)
    request_id = record["request_id"]
    if kind == "i":
        return Part("i", request_id, "", encode_inference(record, layouts), 0, msg_id)
    if kind == "s":
        return Part("s", request_id, record["challenger"], encode_shadow(record), 0, msg_id)
    return Part("f", request_id, "", encode_feedback(record), record["event_time"], msg_id)


class JoinCore:
    """Decode, merge and build for one deployment; thread-safe counters in :attr:`counters`."""

    def __init__(self, settings: Settings, client: Any | None = None, lease_s: float = 60.0):
        from shadowpipe.stores import redis_client

        self.settings = settings
        self.codec = Codec(settings.schema_registry_url)
        self.store = join_store(client or redis_client(settings), key_prefix(settings),
                                settings.feedback_horizon_s, lease_s)
        self.counters: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._cache: dict[bytes, Any] = {}  # used by process() only: one batch at a time
        # A message's topic -> its kind; the kind itself is taken too (the tests and the
        # benchmark feed the core without topics).
        self.kinds = {**{k: k for k in INPUTS}, **{settings.topic(k): k for k in INPUTS}}
        # Framing (single-object header or Confluent id) of every JoinedRecord we write.
        probe = {"request_id": "", "challenger": "", "version": 0, "joined_at": 0,
                 "state": "orphan_feedback"}
        body = build_body("", "", 0, None, None, None, joined_at=0)
        framed = self.codec.encode("JoinedRecord", probe)
        self._header = framed[:len(framed) - len(body)]

    def count(self, **increments: int) -> None:
        with self._lock:
            self.counters.update({k: v for k, v in increments.items() if v})

    def stats(self) -> dict[str, int]:
        with self._lock:
            return dict(sorted(self.counters.items()))

    def process(self, messages: list[Message], now_ms: int | None = None) -> BatchResult:
        """Decode ``messages``, merge them in order, and return what to publish.

        Raises :class:`StoreError` (counted) when Redis fails: nothing of the batch may be
        acked then; running the same batch again is safe.
        """
        result, codes = BatchResult(), Counter[str]()
        now_ms = now_ms if now_ms is not None else int(time.time() * 1000)
        chunks = self._decoded_chunks(messages, result, codes)
        try:
            for parts, replies in self.store.merge_chunks(chunks, now_ms):
                for part, (code, primary, feedback, flat) in zip(parts, replies, strict=True):
                    codes[_IN[part.kind]] += 1
                    codes[_PART[code]] += 1
                    if code in _ORPHAN:
                        codes[_ORPHAN[code]] += 1
                    if flat:
                        self._build(part.request_id, code, primary, feedback, flat, now_ms,
                                    result, codes)
        except StoreError as exc:
            self.count(redis_errors=1, redis_oom=int(exc.oom))
            raise
        self.count(**codes)
        return result

    def _build(self, request_id: str, code: int, primary: bytes | None,
               feedback: bytes | None, flat: list[Any], now_ms: int, result: BatchResult,
               codes: Counter[str]) -> None:
        """Append the records of one part: flat ``challenger, version, shadow`` triples."""
        if code != LATE_INFERENCE:
            emitted = _EMITTED[code == REDELIVERED]
            for n in range(0, len(flat), 3):
                codes[emitted[join_state(flat[n], primary, feedback)]] += 1
        bodies = build_bodies(request_id, primary, feedback, flat, joined_at=now_ms,
                              layouts=self.store.layouts, cache=self._cache,
                              prefix=self._header)
        key = request_id.encode()
        result.joined.extend([(key, body) for body in bodies])

    def _decoded_chunks(self, messages: list[Message], result: BatchResult,
                        codes: Counter[str]) -> Iterator[list[Part]]:
        for start in range(0, len(messages), CHUNK):
            parts = []
            for msg in messages[start:start + CHUNK]:
                kind = self.kinds[msg.topic]
                try:
                    parts.append(decode_part(self.codec, kind, msg, self.store.layouts))
                except DecodeError as exc:  # kind: decode, or invalid (InvalidRecord)
                    codes[f"deadletter_{exc.kind}"] += 1
                    dead = self._dead_letter(exc.kind, exc.reason, kind, msg)
                    result.dead.append((msg.key, dead))
            yield parts

    def sweep(self, now_ms: int | None = None, limit: int = 500) -> tuple[Claim, BatchResult]:
        """Claim requests past the horizon; returns the claim and the orphans to publish.

        Publish and flush the result, then call :meth:`finish` with the claim.
        """
        now_ms = now_ms if now_ms is not None else int(time.time() * 1000)
        try:
            claim = self.store.claim(now_ms, limit)
        except StoreError as exc:
            self.count(redis_errors=1, redis_oom=int(exc.oom))
            raise
        result = BatchResult(joined=[self.encode(e, now_ms) for e in claim.orphans])
        counts: Counter[str] = Counter(claim.outcomes)
        for e in claim.orphans:
            reason = "orphan_feedback_unknown" if not e.challenger else \
                "orphan_prediction_no_primary"
            counts[reason] += 1
        self.count(**counts)
        return claim, result

    def finish(self, claim: Claim) -> int:
        """Bury what ``claim`` took, once its orphans are published."""
        try:
            buried = self.store.finish(claim)
        except StoreError as exc:
            self.count(redis_errors=1, redis_oom=int(exc.oom))
            raise
        self.count(swept=buried)
        return buried

    def encode(self, e: Emission, now_ms: int, cache: dict[bytes, Any] | None = None
               ) -> tuple[bytes, bytes]:
        """(key, framed JoinedRecord) for an emission."""
        body = build_body(e.request_id, e.challenger, e.version, e.primary, e.shadow,
                          e.feedback, joined_at=now_ms, layouts=self.store.layouts, cache=cache)
        return e.request_id.encode(), self._header + body

    def _dead_letter(self, kind: str, reason: str, topic_kind: str, msg: Message) -> bytes:
        record = dead_letter(kind, reason, WORKER, self.settings.topic(topic_kind),
                             msg.partition, msg.offset, msg.key, msg.value, msg.timestamp)
        return self.codec.encode("DeadLetter", record)


_IN = {kind: f"in_{topic}" for topic, (_, kind) in INPUTS.items()}
_PART = [f"part_{name}" for name in CODE_NAMES]
_ORPHAN = {LATE_FEEDBACK: "orphan_feedback_late", LATE_PREDICTION: "orphan_prediction_late"}
_STATES = ("predicted", "labelled", "orphan_feedback", "orphan_prediction")
_EMITTED = [{s: f"emitted_{s}" for s in _STATES}, {s: f"reemitted_{s}" for s in _STATES}]
