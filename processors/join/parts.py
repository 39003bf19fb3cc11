"""Stored parts and JoinedRecord bytes, built by splicing pre-encoded Avro segments.

An Avro record is the concatenation of its fields' encodings, so a JoinedRecord is assembled
from slices: what the primary said (features, output) is encoded **once per request** when the
InferenceEvent arrives and kept in Redis as it will appear in every JoinedRecord of that
request; each challenger's answer and the label likewise. Emitting a record is then a few
small header fields plus concatenation, with no decoding of the features.

A stored part is ``FORMAT`` (one byte) + a small *meta* prefix (what the joiner itself needs:
times, inclusion probability, ...) + the segment(s), written by hand (a few times faster than
fastavro for these small pieces) from the primitives of :mod:`shadowpipe.schemas.wire`.
``schemas/JoinedRecord.avsc`` is checked at import against its hand layout
(``wire.LAYOUTS["JoinedRecord"]``, :func:`~shadowpipe.schemas.wire.require_layout`), so a
schema change that moves or retypes a field refuses to start instead of producing corrupt
records (then: update the encoders, the layout and ``FORMAT``).

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
import struct
from collections.abc import Callable, Sequence
from functools import lru_cache
from typing import Any

import fastavro

from shadowpipe.schemas import schema
from shadowpipe.schemas.wire import (
    JOIN_STATES,
    NULL_BRANCH,
    VALUE_BRANCH,
    cached_string_bytes,
    double_map_bytes,
    long_bytes,
    optional_double,
    optional_long,
    optional_string,
    pack_double,
    read_long,
    read_optional,
    read_string,
    require_layout,
    skip_long,
    string_array_bytes,
    string_bytes,
    string_dict_bytes,
    unpack_double,
    utf8_bytes,
)

FORMAT = b"\x01"
# Encoded defaults of each segment when its part is missing.
_NO_PRIMARY = b"\x00" * 8
_NO_SHADOW = b"\x00" * 5
_NO_LABEL = b"\x00" * 3
_NO_VERSION = b"\x00\x00"  # challenger_version "" and is_control false
_NO_SOURCE = NULL_BRANCH + pack_double(1.0)
require_layout("JoinedRecord")  # the segments below follow its field order and types
_JOINED = schema("JoinedRecord")
CACHE_SIZE = 20_000  # split primary parts kept per build cache (~0.5 KB each)
MIN_INTERNED = 4  # fewer numeric features are cheaper inline than behind a layout id


# Event times recur in a request's parts and records, lengths and counts everywhere: the
# wire encoding memoised (a C-level lookup, ~5x quicker than encoding again).
_long = lru_cache(maxsize=65536)(long_bytes)


class LayoutError(RuntimeError):
    """A stored part does not match what this joiner writes (format, feature layout)."""


def _name_bytes(name: str | bytes) -> bytes:
    """Avro string of a challenger name, as str or as the UTF-8 bytes the store returns."""
    return utf8_bytes(name) if isinstance(name, bytes) else cached_string_bytes(name)


def _double_map(m: dict[str, float]) -> bytes:
    return double_map_bytes(tuple(m), tuple(m.values()))


def _opt_output(out: dict[str, Any] | None) -> bytes:
    if out is None:
        return NULL_BRANCH
    return b"".join((VALUE_BRANCH, optional_string(out["label"]),
                     _double_map(out["probabilities"]), optional_double(out["value"])))


# -- feature layouts -------------------------------------------------------------------------


class FeatureLayouts:
    """Interned numeric-feature name lists: 8-byte id -> names, shared through Redis.

    ``unsaved`` holds layouts first seen here, to be written (before any part using them);
    ``fetch`` loads ids another joiner created. At most ``capacity`` layouts are interned,
    so sparse features (a different name set per request) fall back to inline names.

    >>> layouts = FeatureLayouts()
    >>> lid = layouts.intern(("a", "b", "c", "d"))
    >>> values = struct.pack("<4d", 1, 2, 3, 4)
    >>> layouts.map_encoder(lid)(values) == _double_map(dict(zip("abcd", (1.0, 2.0, 3.0, 4.0))))
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
        self._names[lid] = [string_bytes(n) for n in names]
        self.unsaved[lid] = payload
        return lid

    def intern_raw(self, names: tuple[bytes, ...]) -> bytes | None:
        """:meth:`intern` for names still as UTF-8 bytes (validated when first seen)."""
        lid = self._raw_ids.get(names)
        if lid is None:
            lid = self.intern(tuple(n.decode() for n in names))
            if lid is not None:
                self._raw_ids[names] = lid
                self.signatures[_long(len(names)) + b"".join(map(utf8_bytes, names))] = lid
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
                names = self._names[lid] = [string_bytes(n) for n in json.loads(payload)]
            encoder = self._encoders[lid] = _map_template(names)
        return encoder

    def resave(self) -> None:
        """Write every layout interned here again: Redis lost them (it came back empty), and
        the parts stored from now on refer to them."""
        for names, lid in self._ids.items():
            self.unsaved[lid] = json.dumps(names, separators=(",", ":")).encode()


def _map_template(names: list[bytes]) -> Callable[[bytes], bytes]:
    """The map encoding as a ``bytes %`` template with a hole per value, filled per record."""
    template = b"".join((_long(len(names)).replace(b"%", b"%%"),
                         *(name.replace(b"%", b"%%") + b"%b" for name in names), b"\x00"))
    values = struct.Struct("8s" * len(names))

    def encode(packed: bytes) -> bytes:
        return template % values.unpack(packed)

    return encode


# -- stored parts ------------------------------------------------------------------------------


def encode_inference(event: dict[str, Any], layouts: FeatureLayouts | None = None) -> bytes:
    """Stored part of an InferenceEvent: meta (event_time, inclusion_prob, trace_id) + the
    primary segment (features, context, output) with numeric feature names interned."""
    head = b"".join((cached_string_bytes(event["model"]),
                     cached_string_bytes(event["model_version"]),
                     string_dict_bytes(event["context"])))
    num = event["num_features"]
    lid = layouts.intern(tuple(num)) if layouts is not None else None
    if lid is None:
        enc = _double_map(num)
        num_block = b"\x00" + _long(len(enc)) + enc
    else:
        num_block = b"\x01" + lid + _long(len(num)) + struct.pack(f"<{len(num)}d",
                                                                       *num.values())
    return b"".join((
        FORMAT, _long(event["event_time"]), pack_double(event["inclusion_prob"]),
        optional_string(event["trace_id"]), _long(len(head)), head, num_block,
        string_dict_bytes(event["cat_features"]), string_array_bytes(event["null_features"]),
        _opt_output(event["output"]), optional_double(event["latency_ms"]),
    ))


def encode_shadow(pred: dict[str, Any]) -> bytes:
    """Stored part of a ShadowPrediction: meta (event_time, challenger_version, is_control) +
    the shadow segment (output or error, timings)."""
    return b"".join((
        FORMAT, _long(pred["event_time"]), cached_string_bytes(pred["challenger_version"]),
        b"\x01" if pred["is_control"] else b"\x00", _opt_output(pred["output"]),
        optional_string(pred["error"]), optional_string(pred["error_kind"]),
        optional_double(pred["model_time_ms"]), optional_double(pred["queue_lag_ms"]),
    ))


def encode_feedback(fb: dict[str, Any]) -> bytes:
    """Stored part of a Feedback: meta (label time, inclusion_prob) + label and source segments."""
    label = b"".join((optional_string(fb["label"]), optional_double(fb["value"]),
                      VALUE_BRANCH, _long(fb["event_time"])))
    return b"".join((FORMAT, _long(fb["event_time"]), pack_double(fb["inclusion_prob"]),
                     _long(len(label)), label, optional_string(fb["source"]),
                     pack_double(fb["weight"])))


def _check_format(part: bytes) -> None:
    if part[:1] != FORMAT:
        raise LayoutError(f"stored part format {part[:1]!r}, this joiner reads {FORMAT!r}")


def _split_inference(part: bytes, layouts: FeatureLayouts | None
                     ) -> tuple[int, float, str | None, bytes]:
    _check_format(part)
    event_time, pos = read_long(part, 1)
    (prob,) = unpack_double(part, pos)
    trace_id, pos = read_optional(part, pos + 8, read_string)
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
    (prob,) = unpack_double(part, pos)
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


_STATE_CODES = {state: _long(n) for n, state in enumerate(JOIN_STATES)}


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
    head = prefix + string_bytes(request_id)
    # What follows the segments of the primary and the shadow, given the event time.
    after = b"".join((pack_double(prob), _long(joined_at), optional_string(trace_id)))
    tail = None
    if event_time is not None:
        delay = label_time - event_time if label_time is not None else None
        tail = b"".join((label_seg, optional_long(delay), source_seg, after))
    out = []
    primary_at = optional_long(event_time)
    for n in range(0, len(shadows), 3):
        challenger, version, shadow = shadows[n], shadows[n + 1], shadows[n + 2]
        state = _STATE_CODES[join_state(challenger, primary, feedback)]
        at = primary_at
        version_seg, shadow_seg = _NO_VERSION, _NO_SHADOW
        own_time = None
        if shadow is not None:
            _check_format(shadow)
            pos = skip_long(shadow, 1)
            size, start = read_long(shadow, pos)  # challenger_version; is_control follows
            if size < 0:
                raise LayoutError("stored shadow part with a negative string size")
            version_seg, shadow_seg = shadow[pos:start + size + 1], shadow[start + size + 1:]
            if event_time is None:
                own_time = read_long(shadow, 1)[0]
                at = optional_long(own_time)
        end = tail
        if end is None:  # no primary: the event time is the shadow prediction's, if any
            delay = label_time - own_time if label_time is not None and own_time is not None \
                else None
            end = b"".join((label_seg, optional_long(delay), source_seg, after))
        out.append(b"".join((head, _name_bytes(challenger), version_seg, _long(version),
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
