"""Avro binary primitives, hand-written for the producer's hot path.

fastavro's generic writer walks the schema for every record (~25 us for an
``InferenceEvent`` with 20 features); these helpers write the same bytes for the few
shapes the producer needs, with the constant parts (map keys, struct layouts) cached.
The encoding follows the Avro specification: ``long`` as zig-zag varint, ``string`` as
its UTF-8 length then bytes, ``double`` as 8 little-endian bytes, a non-empty map as one
block (entry count, entries) followed by the 0 terminator, exactly as fastavro writes it.

>>> long_bytes(1), long_bytes(-1), long_bytes(64)
(b'\\x02', b'\\x01', b'\\x80\\x01')
>>> time_bytes(1700000000000) == long_bytes(1700000000000)
True
>>> string_bytes("hé")
b'\\x06h\\xc3\\xa9'
>>> double_map_bytes(("a",), (1.0,))
b'\\x02\\x02a\\x00\\x00\\x00\\x00\\x00\\x00\\xf0?\\x00'
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

LONG_MIN, LONG_MAX = -(2**63), 2**63 - 1
SMALL_COUNT = 4096
# Cached encodings are bounded: a caller sending ever-new keys must not grow memory.
_CACHE_LIMIT = 4096

pack_double = struct.Struct("<d").pack
NULL_BRANCH = b"\x00"
VALUE_BRANCH = b"\x02"
EMPTY = b"\x00"


def _varint_of_zigzag(z: int) -> bytes:
    out = bytearray()
    while z > 0x7F:
        out.append((z & 0x7F) | 0x80)
        z >>= 7
    out.append(z)
    return bytes(out)


# Encodings of the non-negative longs used as lengths and counts.
SMALL_LONGS = tuple(_varint_of_zigzag(i << 1) for i in range(SMALL_COUNT))


def long_bytes(n: int) -> bytes:
    """Avro ``long``; raises OverflowError outside the signed 64-bit range."""
    if 0 <= n < SMALL_COUNT:
        return SMALL_LONGS[n]
    if not LONG_MIN <= n <= LONG_MAX:
        raise OverflowError(f"{n} does not fit an Avro long")
    return _varint_of_zigzag(n << 1 if n >= 0 else ((-n) << 1) - 1)


_TIME_HIGH: dict[int, bytes] = {}


def time_bytes(ms: int) -> bytes:
    """:func:`long_bytes` for timestamps: the varint groups above the lowest two change
    only every ~8 s, so they are memoised and only two bytes are computed per call."""
    if ms < 1 << 13:  # fewer than three varint groups
        return long_bytes(ms)
    z = ms << 1
    high = z >> 14
    tail = _TIME_HIGH.get(high)
    if tail is None:
        tail = long_bytes(ms)[2:]
        if len(_TIME_HIGH) >= 16:
            _TIME_HIGH.clear()
        _TIME_HIGH[high] = tail
    return bytes(((z & 0x7F) | 0x80, ((z >> 7) & 0x7F) | 0x80)) + tail


def string_bytes(text: str) -> bytes:
    """Avro ``string``; raises UnicodeEncodeError for lone surrogates, as fastavro does."""
    data = text.encode()
    size = len(data)
    return (SMALL_LONGS[size] if size < SMALL_COUNT else long_bytes(size)) + data


_STRINGS: dict[str, bytes] = {}


def cached_string_bytes(text: str) -> bytes:
    """:func:`string_bytes` memoised: map keys, model names and labels repeat."""
    data = _STRINGS.get(text)
    if data is None:
        if len(_STRINGS) >= _CACHE_LIMIT:
            _STRINGS.clear()
        data = _STRINGS[text] = string_bytes(text)
    return data


_DOUBLE_MAPS: dict[tuple[str, ...], tuple[struct.Struct, list[object]]] = {}


def double_map_plan(keys: tuple[str, ...]) -> tuple[struct.Struct, list[object]]:
    """A struct packing count, every key and value, and the terminator in one call, and
    its argument template: put the values at ``template[2:-1:2]``."""
    count = long_bytes(len(keys))
    template: list[object] = [count]
    layout = [f"<{len(count)}s"]
    for key in keys:
        encoded = string_bytes(key)
        template += (encoded, 0.0)
        layout.append(f"{len(encoded)}sd")
    template.append(EMPTY)
    layout.append("1s")
    return struct.Struct("".join(layout)), template


def double_map_bytes(keys: tuple[str, ...], values: Sequence[float]) -> bytes:
    """Avro ``map<double>`` of ``keys`` to ``values`` (same length, same order).

    Values must be real numbers (``struct.error`` otherwise); finiteness is the caller's
    concern because Avro itself carries NaN and infinities.
    """
    if not keys:
        return EMPTY
    plan = _DOUBLE_MAPS.get(keys)
    if plan is None:
        if len(_DOUBLE_MAPS) >= _CACHE_LIMIT:
            _DOUBLE_MAPS.clear()
        plan = _DOUBLE_MAPS[keys] = double_map_plan(keys)
    layout, template = plan
    args = template.copy()
    args[2:-1:2] = values
    return layout.pack(*args)


def string_map_bytes(entries: Sequence[tuple[bytes, bytes]]) -> bytes:
    """Avro ``map<string>`` from already encoded (key, value) pairs."""
    if not entries:
        return EMPTY
    parts = [long_bytes(len(entries))]
    for key, value in entries:
        parts += (key, value)
    parts.append(EMPTY)
    return b"".join(parts)


def string_array_bytes(items: Sequence[str]) -> bytes:
    """Avro ``array<string>``."""
    if not items:
        return EMPTY
    return b"".join([long_bytes(len(items)), *map(cached_string_bytes, items), EMPTY])
