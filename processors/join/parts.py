"""Stored parts and JoinedRecord bytes, built by splicing pre-encoded Avro segments.

An Avro record is the concatenation of its fields' encodings, so a JoinedRecord is assembled
from slices: what the primary said (features, output) is encoded **once per request** when the
InferenceEvent arrives and kept in Redis as it will appear in every JoinedRecord of that
request; each challenger's answer and the label likewise. Emitting a record is then a few
small header fields plus concatenation, with no decoding of the features.

A stored part is ``FORMAT`` (one byte) + a small *meta* prefix (what the joiner itself needs:
times, inclusion probability, ...) + the segment(s), written by hand (a few times faster than
fastavro for these small pieces). ``schemas/JoinedRecord.avsc`` is checked at import against
:data:`WIRE`, so a schema change that moves or retypes a field fails loudly here instead of
producing corrupt records (then: update the encoders and bump ``FORMAT``).

Numeric feature *names* repeat in every request of a model, so they are interned: the part
keeps an 8-byte layout id and the raw values; the names live once in a Redis hash
(:class:`FeatureLayouts`). That halves the state of a 20-feature request.

>>> inf = {"request_id": "r1", "event_time": 1000, "model": "m", "model_version": "1",
...        "output": {"label": "a", "probabilities": {}, "value": None}, "latency_ms": 2.0}
>>> sp = {"request_id": "r1", "challenger": "c", "challenger_version": "2", "event_time": 1000,
...       "scored_at": 1001, "output": {"label": "b", "probabilities": {}, "value": None},
...       "model_time_ms": 0.5, "queue_lag_ms": 1.0}
>>> fb = {"request_id": "r1", "label": "b", "event_time": 4000}
>>> from shadowpipe.schemas.codec import Codec
>>> codec = Codec()
>>> parts = [encode_inference(codec.decode(codec.encode("InferenceEvent", inf), "InferenceEvent")),
...          encode_shadow(codec.decode(codec.encode("ShadowPrediction", sp), "ShadowPrediction")),
...          encode_feedback(codec.decode(codec.encode("Feedback", fb), "Feedback"))]
>>> body = build_body("r1", "c", 3, *parts, joined_at=5000)
>>> rec = decode_body(body)
>>> rec["state"], rec["version"], rec["label_delay_ms"], rec["shadow_output"]["label"]
('labelled', 3, 3000, 'b')
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import struct
from collections.abc import Callable, Sequence
from functools import lru_cache
from typing import Any

import fastavro
from fastavro.schema import expand_schema
from shadowpipe.schemas import schema
from shadowpipe.schemas.wire import long_bytes

FORMAT = b"\x01"
_OUTPUT = ("record", (("label", ("null", "string")), ("probabilities", ("map", "double")),
                      ("value", ("null", "double"))))
_STATES = ("predicted", "labelled", "orphan_feedback", "orphan_prediction")
# JoinedRecord's fields in wire order with the types the encoders below write.
WIRE: tuple[tuple[str, Any], ...] = (
    ("request_id", "string"), ("challenger", "string"), ("challenger_version", "string"),
    ("is_control", "boolean"), ("version", "long"), ("state", ("enum", _STATES)),
    ("event_time", ("null", "long")),
    # primary segment (stored once per request)
    ("model", "string"), ("model_version", "string"), ("context", ("map", "string")),
    ("num_features", ("map", "double")), ("cat_features", ("map", "string")),
    ("null_features", ("array", "string")), ("primary_output", ("null", _OUTPUT)),
    ("primary_latency_ms", ("null", "double")),
    # shadow segment (one per challenger)
    ("shadow_output", ("null", _OUTPUT)), ("shadow_error", ("null", "string")),
    ("shadow_error_kind", ("null", "string")), ("model_time_ms", ("null", "double")),
    ("queue_lag_ms", ("null", "double")),
    # label segment, computed delay, source segment
    ("label", ("null", "string")), ("label_value", ("null", "double")),
    ("label_time", ("null", "long")), ("label_delay_ms", ("null", "long")),
    ("feedback_source", ("null", "string")), ("feedback_weight", "double"),
    ("inclusion_prob", "double"), ("joined_at", "long"), ("trace_id", ("null", "string")),
)
# Encoded defaults of each segment when its part is missing.
_NO_PRIMARY = b"\x00" * 8
_NO_SHADOW = b"\x00" * 5
_NO_LABEL = b"\x00" * 3
_NO_VERSION = b"\x00\x00"  # challenger_version "" and is_control false
_DOUBLE = struct.Struct("<d")
_VARINT = re.compile(rb"[\x80-\xff]{0,9}[\x00-\x7f]")  # skips one long in a single C call
_NO_SOURCE = b"\x00" + _DOUBLE.pack(1.0)
_JOINED = schema("JoinedRecord")
CACHE_SIZE = 20_000  # split primary parts kept per build cache (~0.5 KB each)
MIN_INTERNED = 4  # fewer numeric features are cheaper inline than behind a layout id


class LayoutError(RuntimeError):
    """JoinedRecord.avsc or a stored part does not match what this joiner writes."""


def _shape(t: Any) -> Any:
    if isinstance(t, str):
        return t
    if isinstance(t, list):
        return tuple(_shape(x) for x in t)
    kind = t["type"]
    if kind == "map":
        return ("map", _shape(t["values"]))
    if kind == "array":
        return ("array", _shape(t["items"]))
    if kind == "record":
        return ("record", tuple((f["name"], _shape(f["type"])) for f in t["fields"]))
    if kind == "enum":
        return ("enum", tuple(t["symbols"]))
    return _shape(kind)


def check_layout(parsed: dict[str, Any]) -> None:
    """Raise :class:`LayoutError` unless ``parsed`` (a JoinedRecord schema) matches :data:`WIRE`.

    >>> check_layout(_JOINED)
    """
    actual = tuple((f["name"], _shape(f["type"])) for f in expand_schema(parsed)["fields"])
    if actual != WIRE:
        diff = [a for a, w in zip(actual, WIRE, strict=False) if a != w] or actual[len(WIRE):]
        raise LayoutError(f"JoinedRecord.avsc changed ({diff[:1]}): update join/parts.py")


check_layout(_JOINED)

# -- Avro primitives -----------------------------------------------------------------------


@lru_cache(maxsize=65536)  # event times recur in a request's parts and records
def write_long(n: int) -> bytes:
    """Avro zig-zag varint (the producer library's encoder, memoised).

    >>> write_long(0), write_long(-1), write_long(64)
    (b'\\x00', b'\\x01', b'\\x80\\x01')
    """
    return long_bytes(n)


def read_long(data: bytes, pos: int) -> tuple[int, int]:
    """Inverse of :func:`write_long`: (value, next position).

    >>> read_long(write_long(-123456789), 0)
    (-123456789, 4)
    """
    shift = result = 0
    while True:
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return (result >> 1) ^ -(result & 1), pos
        shift += 7


@lru_cache(maxsize=16384)  # labels, model names, challengers, map keys recur
def write_string(text: str) -> bytes:
    raw = text.encode()
    return write_long(len(raw)) + raw


@lru_cache(maxsize=4096)
def _write_name(name: str | bytes) -> bytes:
    raw = name.encode() if isinstance(name, str) else name
    return write_long(len(raw)) + raw


def read_string(data: bytes, pos: int) -> tuple[str, int]:
    size, pos = read_long(data, pos)
    return data[pos:pos + size].decode(), pos + size


def _opt_string(text: str | None) -> bytes:
    return b"\x00" if text is None else b"\x02" + write_string(text)


def _read_opt_string(data: bytes, pos: int) -> tuple[str | None, int]:
    if data[pos] == 0:
        return None, pos + 1
    return read_string(data, pos + 1)


def _opt_long(n: int | None) -> bytes:
    return b"\x00" if n is None else b"\x02" + write_long(n)


def _opt_double(x: float | None) -> bytes:
    return b"\x00" if x is None else b"\x02" + _DOUBLE.pack(x)


def _block(count: int, body: bytes) -> bytes:
    return write_long(count) + body + b"\x00" if count else b"\x00"


def _map_string(m: dict[str, str]) -> bytes:
    return _block(len(m), b"".join(write_string(k) + write_string(v) for k, v in m.items()))


def _map_double(m: dict[str, float]) -> bytes:
    return _block(len(m), b"".join(write_string(k) + _DOUBLE.pack(v) for k, v in m.items()))


def _array_string(items: Sequence[str]) -> bytes:
    return _block(len(items), b"".join(write_string(x) for x in items))


def _opt_output(out: dict[str, Any] | None) -> bytes:
    if out is None:
        return b"\x00"
    return b"".join((b"\x02", _opt_string(out["label"]), _map_double(out["probabilities"]),
                     _opt_double(out["value"])))


# -- feature layouts -------------------------------------------------------------------------


class FeatureLayouts:
    """Interned numeric-feature name lists: 8-byte id -> names, shared through Redis.

    ``unsaved`` holds layouts first seen here, to be written (before any part using them);
    ``fetch`` loads ids another joiner created. At most ``capacity`` layouts are interned,
    so sparse features (a different name set per request) fall back to inline names.

    >>> layouts = FeatureLayouts()
    >>> lid = layouts.intern(("a", "b", "c", "d"))
    >>> values = struct.pack("<4d", 1, 2, 3, 4)
    >>> layouts.map_encoder(lid)(values) == _map_double(dict(zip("abcd", (1.0, 2.0, 3.0, 4.0))))
    True
    >>> len(layouts.unsaved)
    1
    """

    def __init__(self, fetch: Callable[[list[bytes]], list[bytes | None]] | None = None,
                 capacity: int = 10_000) -> None:
        self._ids: dict[tuple[str, ...], bytes] = {}
        self._raw_ids: dict[tuple[bytes, ...], bytes] = {}
        # The same ids by the names' canonical encoding (count, then each name as an Avro
        # string): what the compiled fast path (join/_fastpath.c) looks up without objects.
        self.signatures: dict[bytes, bytes] = {}
        self._names: dict[bytes, list[bytes]] = {}
        self.unsaved: dict[bytes, bytes] = {}
        self._encoders: dict[bytes, Callable[[bytes], bytes]] = {}
        self._fetch = fetch
        self.capacity = capacity

    def intern(self, names: tuple[str, ...]) -> bytes | None:
        """The id of ``names`` (registering it), or None when not worth or able to intern."""
        lid = self._ids.get(names)
        if lid is not None:
            return lid
        if len(names) < MIN_INTERNED or len(self._ids) >= self.capacity:
            return None
        payload = json.dumps(names, separators=(",", ":")).encode()
        lid = hashlib.blake2b(payload, digest_size=8).digest()
        self._ids[names] = lid
        self._names[lid] = [write_string(n) for n in names]
        self.unsaved[lid] = payload
        return lid

    def intern_raw(self, names: tuple[bytes, ...]) -> bytes | None:
        """:meth:`intern` for names still as UTF-8 bytes (validated when first seen)."""
        lid = self._raw_ids.get(names)
        if lid is None:
            lid = self.intern(tuple(n.decode() for n in names))
            if lid is not None:
                self._raw_ids[names] = lid
                self.signatures[write_long(len(names)) + b"".join(
                    write_long(len(n)) + n for n in names)] = lid
        return lid

    def map_encoder(self, lid: bytes) -> Callable[[bytes], bytes]:
        """A function turning the packed values of layout ``lid`` into the Avro map bytes
        (names fetched once if another joiner made the layout)."""
        encoder = self._encoders.get(lid)
        if encoder is None:
            names = self._names.get(lid)
            if names is None:
                payload = self._fetch([lid])[0] if self._fetch else None
                if payload is None:
                    raise LayoutError(f"unknown feature layout {lid.hex()}")
                names = self._names[lid] = [write_string(n) for n in json.loads(payload)]
            encoder = self._encoders[lid] = _map_template(names)
        return encoder

    def resave(self) -> None:
        """Write every layout interned here again: Redis lost them (it came back empty), and
        the parts stored from now on refer to them."""
        for names, lid in self._ids.items():
            self.unsaved[lid] = json.dumps(names, separators=(",", ":")).encode()


def _map_template(names: list[bytes]) -> Callable[[bytes], bytes]:
    """The map encoding as a ``bytes %`` template with a hole per value, filled per record."""
    template = b"".join((write_long(len(names)).replace(b"%", b"%%"),
                         *(name.replace(b"%", b"%%") + b"%b" for name in names), b"\x00"))
    values = struct.Struct("8s" * len(names))

    def encode(packed: bytes) -> bytes:
        return template % values.unpack(packed)

    return encode


# -- stored parts ------------------------------------------------------------------------------


def encode_inference(event: dict[str, Any], layouts: FeatureLayouts | None = None) -> bytes:
    """Stored part of an InferenceEvent: meta (event_time, inclusion_prob, trace_id) + the
    primary segment (features, context, output) with numeric feature names interned."""
    head = b"".join((write_string(event["model"]), write_string(event["model_version"]),
                     _map_string(event["context"])))
    num = event["num_features"]
    lid = layouts.intern(tuple(num)) if layouts is not None else None
    if lid is None:
        enc = _map_double(num)
        num_block = b"\x00" + write_long(len(enc)) + enc
    else:
        num_block = b"\x01" + lid + write_long(len(num)) + struct.pack(f"<{len(num)}d",
                                                                       *num.values())
    return b"".join((
        FORMAT, write_long(event["event_time"]), _DOUBLE.pack(event["inclusion_prob"]),
        _opt_string(event["trace_id"]), write_long(len(head)), head, num_block,
        _map_string(event["cat_features"]), _array_string(event["null_features"]),
        _opt_output(event["output"]), b"\x02", _DOUBLE.pack(event["latency_ms"]),
    ))


def encode_shadow(pred: dict[str, Any]) -> bytes:
    """Stored part of a ShadowPrediction: meta (event_time, challenger_version, is_control) +
    the shadow segment (output or error, timings)."""
    return b"".join((
        FORMAT, write_long(pred["event_time"]), write_string(pred["challenger_version"]),
        b"\x01" if pred["is_control"] else b"\x00", _opt_output(pred["output"]),
        _opt_string(pred["error"]), _opt_string(pred["error_kind"]),
        b"\x02", _DOUBLE.pack(pred["model_time_ms"]), b"\x02", _DOUBLE.pack(pred["queue_lag_ms"]),
    ))


def encode_feedback(fb: dict[str, Any]) -> bytes:
    """Stored part of a Feedback: meta (label time, inclusion_prob) + label and source segments."""
    label = b"".join((_opt_string(fb["label"]), _opt_double(fb["value"]),
                      b"\x02", write_long(fb["event_time"])))
    return b"".join((FORMAT, write_long(fb["event_time"]), _DOUBLE.pack(fb["inclusion_prob"]),
                     write_long(len(label)), label, _opt_string(fb["source"]),
                     _DOUBLE.pack(fb["weight"])))


def _check_format(part: bytes) -> None:
    if part[:1] != FORMAT:
        raise LayoutError(f"stored part format {part[:1]!r}, this joiner reads {FORMAT!r}")


def _split_inference(part: bytes, layouts: FeatureLayouts | None
                     ) -> tuple[int, float, str | None, bytes]:
    _check_format(part)
    event_time, pos = read_long(part, 1)
    (prob,) = _DOUBLE.unpack_from(part, pos)
    trace_id, pos = _read_opt_string(part, pos + 8)
    size, pos = read_long(part, pos)
    head, pos = part[pos:pos + size], pos + size
    if part[pos] == 0:
        size, pos = read_long(part, pos + 1)
        num, pos = part[pos:pos + size], pos + size
    else:
        if layouts is None:
            raise LayoutError("interned features need the FeatureLayouts")
        encode = layouts.map_encoder(part[pos + 1:pos + 9])
        count, pos = read_long(part, pos + 9)
        num, pos = encode(part[pos:pos + 8 * count]), pos + 8 * count
    return event_time, prob, trace_id, b"".join((head, num, part[pos:]))


def _split_feedback(part: bytes) -> tuple[int, float, bytes, bytes]:
    _check_format(part)
    label_time, pos = read_long(part, 1)
    (prob,) = _DOUBLE.unpack_from(part, pos)
    size, pos = read_long(part, pos + 8)
    return label_time, prob, part[pos:pos + size], part[pos + size:]


def join_state(challenger: str | bytes, primary: bytes | None, feedback: bytes | None) -> str:
    """The completeness state a record with these parts has.

    >>> join_state("", None, b"f"), join_state("c", None, None), join_state("c", b"i", b"f")
    ('orphan_feedback', 'orphan_prediction', 'labelled')
    """
    if not challenger:
        return "orphan_feedback"
    if primary is None:
        return "orphan_prediction"
    return "labelled" if feedback is not None else "predicted"


_STATE_CODES = {state: write_long(n) for n, state in enumerate(_STATES)}


def build_body(
    request_id: str,
    challenger: str,
    version: int,
    primary: bytes | None,
    shadow: bytes | None,
    feedback: bytes | None,
    *,
    joined_at: int,
    layouts: FeatureLayouts | None = None,
    cache: dict[bytes, Any] | None = None,
) -> bytes:
    """The Avro body of the JoinedRecord for these stored parts (any may be missing).

    ``event_time`` is the primary's, else the one the shadow prediction carries;
    ``inclusion_prob`` multiplies the inference's and the feedback's sampling probabilities
    (a labelled record exists only if both were sampled). ``cache`` (owned by one thread)
    keeps split primary parts, which every challenger of a request shares.
    """
    return build_bodies(request_id, primary, feedback, [challenger, version, shadow],
                        joined_at=joined_at, layouts=layouts, cache=cache)[0]


def build_bodies(
    request_id: str,
    primary: bytes | None,
    feedback: bytes | None,
    shadows: Sequence[Any],
    *,
    joined_at: int,
    layouts: FeatureLayouts | None = None,
    cache: dict[bytes, Any] | None = None,
    prefix: bytes = b"",
) -> list[bytes]:
    """:func:`build_body` for each challenger of one request, sharing the work on the primary
    and the label; ``shadows`` is flat, ``challenger, version, shadow`` repeated (as the merge
    script replies; challengers as str or bytes). Each body starts with ``prefix`` (framing).

    >>> a, b = build_bodies("r", None, None, ["c", 1, None, b"d", 2, None], joined_at=0)
    >>> decode_body(b)["challenger"], decode_body(b)["version"], decode_body(a)["state"]
    ('d', 2, 'orphan_prediction')
    """
    if _compiled_bodies is not None:  # join/_fastpath.c; it leaves anything unusual to Python
        bodies = _compiled_bodies(request_id, primary, feedback, shadows, joined_at, prefix,
                                  None if layouts is None else layouts._names)
        if bodies is not NotImplemented:
            return bodies
    return python_bodies(request_id, primary, feedback, shadows, joined_at=joined_at,
                         layouts=layouts, cache=cache, prefix=prefix)


def python_bodies(
    request_id: str,
    primary: bytes | None,
    feedback: bytes | None,
    shadows: Sequence[Any],
    *,
    joined_at: int,
    layouts: FeatureLayouts | None = None,
    cache: dict[bytes, Any] | None = None,
    prefix: bytes = b"",
) -> list[bytes]:
    """:func:`build_bodies` in Python: the reference for the compiled one, and its fallback."""
    event_time = trace_id = None
    prob = 1.0
    primary_seg = _NO_PRIMARY
    if primary is not None:
        split = cache.get(primary) if cache is not None else None
        if split is None:
            split = _split_inference(primary, layouts)
            if cache is not None:
                if len(cache) >= CACHE_SIZE:  # not FIFO: deleting a dict's first keys
                    cache.clear()                 # again and again makes iter() crawl
                cache[primary] = split
        event_time, prob, trace_id, primary_seg = split
    label_time = None
    label_seg, source_seg = _NO_LABEL, _NO_SOURCE
    if feedback is not None:
        label_time, fb_prob, label_seg, source_seg = _split_feedback(feedback)
        prob *= fb_prob
    rid = request_id.encode()
    head = prefix + write_long(len(rid)) + rid
    # What follows the segments of the primary and the shadow, given the event time.
    after = b"".join((_DOUBLE.pack(prob), write_long(joined_at), _opt_string(trace_id)))
    tail = None
    if event_time is not None:
        delay = label_time - event_time if label_time is not None else None
        tail = b"".join((label_seg, _opt_long(delay), source_seg, after))
    out = []
    primary_at = _opt_long(event_time)
    for n in range(0, len(shadows), 3):
        challenger, version, shadow = shadows[n], shadows[n + 1], shadows[n + 2]
        state = _STATE_CODES[join_state(challenger, primary, feedback)]
        at = primary_at
        version_seg, shadow_seg = _NO_VERSION, _NO_SHADOW
        own_time = None
        if shadow is not None:
            _check_format(shadow)
            pos = _VARINT.match(shadow, 1).end()  # type: ignore[union-attr]  # our own part
            size = shadow[pos]
            size, start = (size >> 1, pos + 1) if size < 0x80 else read_long(shadow, pos)
            version_seg, shadow_seg = shadow[pos:start + size + 1], shadow[start + size + 1:]
            if event_time is None:
                own_time = read_long(shadow, 1)[0]
                at = _opt_long(own_time)
        end = tail
        if end is None:  # no primary: the event time is the shadow prediction's, if any
            delay = label_time - own_time if label_time is not None and own_time is not None \
                else None
            end = b"".join((label_seg, _opt_long(delay), source_seg, after))
        out.append(b"".join((head, _write_name(challenger), version_seg, write_long(version),
                             state, at, primary_seg, shadow_seg, end)))
    return out


try:  # the compiled build_bodies (join/_fastpath.c); optional at install time
    from shadowpipe.processors.join._fastpath import build_bodies as _compiled_bodies
except ImportError:  # pragma: no cover - a build without a C compiler
    _compiled_bodies = None
if FORMAT != b"\x01":  # pragma: no cover - the compiled walkers read format 1 only
    _compiled_bodies = None


def decode_body(body: bytes) -> dict[str, Any]:
    """Read a JoinedRecord Avro body (no framing) back into a dict; for tests and tools."""
    return fastavro.schemaless_reader(io.BytesIO(body), _JOINED, None)
