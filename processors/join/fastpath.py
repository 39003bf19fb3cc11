"""Stored parts straight from single-object Avro, without building Python records.

Nearly every field of a stored part is a byte-for-byte copy of the input's encoding (a union,
a string, a map of strings...), so for messages written with the *current* InferenceEvent or
ShadowPrediction schema the part is assembled from slices of the message while walking it
once; only numeric feature names are looked at (to intern them). Strings are checked to be
UTF-8 and the walk must end exactly at the end of the message.

Anything unusual (another schema version, Confluent framing, JSON, multi-block maps, a bad
union index, truncation) returns ``None`` and the caller uses the general path (Codec decode
+ :mod:`~shadowpipe.processors.join.parts` encoders), which also produces the dead-letter
reason. So does anything :func:`shadowpipe.schemas.validate.check` would judge on the
bytes walked here: an ``event_time`` that is not positive, a numeric feature that is NaN
(a missing value, moved to ``null_features`` by the Codec) or infinite (refused); the
caller checks the ids it gets back. ``tests/test_join_parts.py`` checks both paths give
identical parts.

>>> from shadowpipe.schemas.codec import Codec
>>> fb = {"request_id": "r1", "label": "x", "event_time": 5}
>>> inference_part(Codec().encode("Feedback", fb), None) is None  # not an InferenceEvent
True
"""

from __future__ import annotations

import re
import struct
from collections.abc import Callable, Sequence
from math import isfinite

from shadowpipe.processors.join.parts import FORMAT, MIN_INTERNED, FeatureLayouts
from shadowpipe.schemas import schema
from shadowpipe.schemas.wire import (
    WireError,
    long_bytes,
    read_count,
    read_long,
    read_string,
    require_layout,
    single_object_prefix,
    skip_long,
)

# The walkers below assume these schemas' hand layouts (wire.LAYOUTS): checked at import.
for _name in ("InferenceEvent", "ShadowPrediction"):
    require_layout(_name)
HEADERS = {name: single_object_prefix(schema(name))
           for name in ("InferenceEvent", "ShadowPrediction")}

try:  # the compiled walkers (join/_fastpath.c); optional at install time
    from shadowpipe.processors.join import _fastpath as compiled
except ImportError:  # pragma: no cover - a build without a C compiler
    compiled = None
if compiled is not None and (
        bytes((compiled.FORMAT,)) != FORMAT or compiled.MIN_INTERNED != MIN_INTERNED):
    compiled = None  # pragma: no cover - they would disagree with the Python walkers
_compiled_inference = compiled.inference_part if compiled is not None else None
_compiled_shadow = compiled.shadow_part if compiled is not None else None
_INFERENCE_HEADER = HEADERS["InferenceEvent"]
_SHADOW_HEADER = HEADERS["ShadowPrediction"]


def _positive_time(data: bytes, pos: int) -> int:
    """The position after the event time at ``pos``, which must be a positive epoch-ms."""
    end = skip_long(data, pos)
    if read_long(data, pos)[0] <= 0:  # the Codec's validation gives the reason
        raise WireError("event time not positive")
    return end


def _finite(values: Sequence[bytes]) -> None:
    """Non-finite features (NaN is missing, infinity invalid) are the Codec's to judge."""
    if not all(map(isfinite, struct.unpack(f"<{len(values)}d", b"".join(values)))):
        raise WireError("non-finite feature")


def _string(data: bytes, pos: int) -> int:
    """The position after the string at ``pos``, checked to be UTF-8."""
    return read_string(data, pos)[1]


def _double(data: bytes, pos: int) -> int:
    if pos + 8 > len(data):
        raise WireError("double out of bounds")
    return pos + 8


def _optional(skip: Callable[[bytes, int], int]) -> Callable[[bytes, int], int]:
    """Skipper of the union ``["null", T]`` given the skipper of ``T``."""

    def skip_optional(data: bytes, pos: int) -> int:
        branch = data[pos]
        if branch == 0:
            return pos + 1
        if branch != 2:
            raise WireError("union branch out of range")
        return skip(data, pos + 1)

    return skip_optional


_opt_string = _optional(_string)
_opt_double = _optional(_double)


def _end(data: bytes, pos: int, count: int) -> int:
    if count and data[pos] != 0:  # a second block: legal, rare; left to fastavro
        raise WireError("a second block")
    return pos + 1 if count else pos


def _map_string(data: bytes, pos: int) -> int:
    count, pos = read_count(data, pos)
    for _ in range(count):
        pos = _string(data, _string(data, pos))
    return _end(data, pos, count)


def _map_double(data: bytes, pos: int) -> int:
    count, pos = read_count(data, pos)
    for _ in range(count):
        pos = _double(data, _string(data, pos))
    return _end(data, pos, count)


def _array_string(data: bytes, pos: int) -> int:
    count, pos = read_count(data, pos)
    for _ in range(count):
        pos = _string(data, pos)
    return _end(data, pos, count)


def _output(data: bytes, pos: int) -> int:
    return _opt_double(data, _map_double(data, _opt_string(data, pos)))


# Numeric-feature maps already seen, by their first bytes (count and first name): a pattern
# with the names as literals and 8-byte holes for the values, and the raw names. Every
# request of a model repeats the same names, so one C-level match replaces walking ~40 fields.
_KNOWN_MAPS: dict[bytes, tuple[re.Pattern[bytes], tuple[bytes, ...]]] = {}
_KNOWN_LIMIT = 1024


def _features(data: bytes, pos: int, layouts: FeatureLayouts | None) -> tuple[bytes, int]:
    """The stored numeric-features block (interned when possible) and the next position."""
    if layouts is not None:
        count = data[pos]
        if 2 * MIN_INTERNED <= count < 0x80 and not count & 1:  # the usual: < 64 features
            first = data[pos + 1]
            known = _KNOWN_MAPS.get(data[pos:pos + 2 + (first >> 1)]) if first < 0x80 else None
            if known is not None and (match := known[0].match(data, pos)) is not None:
                _finite(match.groups())
                lid = layouts.intern_raw(known[1])
                if lid is not None:
                    return b"".join((b"\x01", lid, data[pos:pos + 1], *match.groups())), \
                        match.end()
    return _walk_features(data, pos, layouts)


def _walk_features(data: bytes, pos: int, layouts: FeatureLayouts | None) -> tuple[bytes, int]:
    start = pos
    count, pos = read_count(data, pos)
    names, values = [], []
    for _ in range(count):
        size, name_at = read_long(data, pos)
        pos = name_at + size
        if size < 0 or pos + 8 > len(data):
            raise WireError("feature out of bounds")
        names.append(data[name_at:pos])
        values.append(data[pos:pos + 8])
        pos += 8
    pos = _end(data, pos, count)
    _finite(values)
    lid = None
    if layouts is not None and count >= MIN_INTERNED:
        lid = layouts.intern_raw(tuple(names))  # decodes (validates) names it has not seen
    if lid is None:
        for name in names:
            name.decode()
        raw = data[start:pos]
        return b"\x00" + long_bytes(len(raw)) + raw, pos
    if count < 64:
        _remember(data[start:start + 1], tuple(names))
    return b"".join((b"\x01", lid, long_bytes(count), *values)), pos


def _remember(count: bytes, names: tuple[bytes, ...]) -> None:
    """Keep the pattern of a valid (UTF-8 checked, interned) single-block feature map."""
    key = count + long_bytes(len(names[0])) + names[0]
    if key in _KNOWN_MAPS:
        return
    if len(_KNOWN_MAPS) >= _KNOWN_LIMIT:
        _KNOWN_MAPS.clear()
    body = b"".join(re.escape(long_bytes(len(n)) + n) + b"(.{8})" for n in names)
    _KNOWN_MAPS[key] = (re.compile(re.escape(count) + body + b"\x00", re.DOTALL), names)


def inference_part(data: bytes, layouts: FeatureLayouts | None) -> tuple[str, bytes] | None:
    """(request_id, stored part) of a current-schema single-object InferenceEvent, else None.

    Same bytes as ``encode_inference(Codec().decode(data, "InferenceEvent"), layouts)``.
    The compiled walker answers unless the numeric feature names are new (then
    :func:`walk_inference` interns them) or the extension is not built.
    """
    if _compiled_inference is not None:
        part = _compiled_inference(data, _INFERENCE_HEADER,
                                   None if layouts is None else layouts.signatures)
        if part is not NotImplemented:
            return part
    return walk_inference(data, layouts)


def shadow_part(data: bytes) -> tuple[str, str, bool, bytes] | None:
    """(request_id, challenger, has_output_or_error, stored part) of a current-schema
    single-object ShadowPrediction, else None. Same part as ``encode_shadow(decoded)``."""
    if _compiled_shadow is not None:
        part = _compiled_shadow(data, _SHADOW_HEADER)
        if part is not NotImplemented:
            return part
    return walk_shadow(data)


def walk_inference(data: bytes, layouts: FeatureLayouts | None) -> tuple[str, bytes] | None:
    """:func:`inference_part` in Python: the reference for the compiled walker."""
    if data[:10] != HEADERS["InferenceEvent"]:
        return None
    try:
        request_id, time_at = read_string(data, 10)
        pos = _positive_time(data, time_at)
        event_time, head_at = data[time_at:pos], pos
        pos = _string(data, _string(data, pos))
        head = data[head_at:pos]
        num_block, pos = _features(data, pos, layouts)
        rest_at = pos
        out_at = _array_string(data, _map_string(data, pos))
        pos = _output(data, out_at)
        latency_at, pos = pos, _double(data, pos)
        context_at, pos = pos, _map_string(data, pos)
        prob_at, pos = pos, _double(data, pos)
        trace_at, pos = pos, _opt_string(data, pos)
    except (IndexError, ValueError):  # WireError and UnicodeDecodeError are ValueErrors
        return None
    if pos != len(data):
        return None
    head += data[context_at:prob_at]
    return request_id, b"".join((
        FORMAT, event_time, data[prob_at:trace_at], data[trace_at:], long_bytes(len(head)),
        head, num_block, data[rest_at:out_at], b"\x02", data[out_at:latency_at], b"\x02",
        data[latency_at:context_at],
    ))


def walk_shadow(data: bytes) -> tuple[str, str, bool, bytes] | None:
    """:func:`shadow_part` in Python: the reference for the compiled walker."""
    if data[:10] != HEADERS["ShadowPrediction"]:
        return None
    try:
        request_id, pos = read_string(data, 10)
        challenger, version_at = read_string(data, pos)
        control_at = _string(data, version_at)
        if data[control_at] > 1:
            raise WireError("boolean out of range")
        time_at = control_at + 1
        time_end = pos = _positive_time(data, time_at)
        pos = skip_long(data, pos)  # scored_at
        out_at, has_output = pos, data[pos] != 0
        if data[pos] > 2 or data[pos] == 1:
            raise WireError("union branch out of range")
        timings_at = _output(data, pos + 1) if has_output else pos + 1
        pos = _double(data, _double(data, timings_at))
        error_at = pos
        has_error = data[pos] != 0
        pos = _opt_string(data, _opt_string(data, pos))
    except (IndexError, ValueError):  # WireError and UnicodeDecodeError are ValueErrors
        return None
    if pos != len(data):
        return None
    return request_id, challenger, has_output or has_error, b"".join((
        FORMAT, data[time_at:time_end], data[version_at:control_at],
        data[control_at:control_at + 1], data[out_at:timings_at], data[error_at:],
        b"\x02", data[timings_at:timings_at + 8], b"\x02", data[timings_at + 8:error_at],
    ))

