"""The one set of Avro binary primitives behind every hand-written fast path, and the hand
layouts those fast paths assume, checked against the ``.avsc`` files.

fastavro walks the schema for every record (~25 us for an ``InferenceEvent`` with 20
features); the producer, the shadow worker, the joiner and the monitor write and read the
same bytes by hand for the few shapes they need, from these primitives, with the constant
parts (map keys, struct layouts) cached. The encoding follows the Avro specification:
``long`` as zig-zag varint, ``string`` as its UTF-8 length then bytes, ``double`` as 8
little-endian bytes, a union as its branch index then the value, a non-empty map or array
as one block (entry count, entries) followed by the 0 terminator, exactly as fastavro
writes it.

Writing:

>>> long_bytes(1), long_bytes(-1), long_bytes(64)
(b'\\x02', b'\\x01', b'\\x80\\x01')
>>> time_bytes(1700000000000) == long_bytes(1700000000000)
True
>>> string_bytes("hé")
b'\\x06h\\xc3\\xa9'
>>> double_map_bytes(("a",), (1.0,))
b'\\x02\\x02a\\x00\\x00\\x00\\x00\\x00\\x00\\xf0?\\x00'
>>> optional_string(None), optional_string("a")
(b'\\x00', b'\\x02\\x02a')

Reading (``(value, next position)``; :class:`WireError` for what is not Avro):

>>> read_long(long_bytes(-123456789), 0)
(-123456789, 4)
>>> read_string_map(string_map_bytes([(string_bytes("k"), string_bytes("v"))]), 0)
({'k': 'v'}, 6)

Hand layouts (:data:`LAYOUTS`) are compared with the schemas: a fast path calls
:func:`require_layout` at import, and ``shadowpipe schemas check`` lists every mismatch.

>>> layout_problems()
[]
"""

from __future__ import annotations

import re
import struct
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

from fastavro.schema import expand_schema, fingerprint, to_parsing_canonical_form

from shadowpipe.config import ConfigError
from shadowpipe.schemas import parse_file, schema

T = TypeVar("T")

# -- framing ---------------------------------------------------------------------------------

SINGLE_OBJECT_MARKER = b"\xc3\x01"
CONFLUENT_MAGIC = 0
_CONFLUENT = struct.Struct(">bI")


def schema_fingerprint(parsed: dict[str, Any]) -> bytes:
    """CRC-64-AVRO fingerprint of a schema's canonical form, as the 8 bytes on the wire."""
    hex_fp = fingerprint(to_parsing_canonical_form(parsed), "CRC-64-AVRO")
    return int(hex_fp, 16).to_bytes(8, "little")


def single_object_prefix(parsed: dict[str, Any]) -> bytes:
    """Avro single-object prefix of ``parsed``: marker + fingerprint (10 bytes)."""
    return SINGLE_OBJECT_MARKER + schema_fingerprint(parsed)


def confluent_prefix(schema_id: int) -> bytes:
    """Confluent wire prefix: magic byte 0 + 4-byte big-endian schema id.

    >>> confluent_prefix(42)
    b'\\x00\\x00\\x00\\x00*'
    """
    return _CONFLUENT.pack(CONFLUENT_MAGIC, schema_id)


# -- writing ---------------------------------------------------------------------------------

LONG_MIN, LONG_MAX = -(2**63), 2**63 - 1
SMALL_COUNT = 4096
# Cached encodings are bounded: a caller sending ever-new keys must not grow memory.
CACHE_LIMIT = 4096

pack_double = struct.Struct("<d").pack
NULL_BRANCH = b"\x00"  # union branch 0 (null), also an empty map or array
VALUE_BRANCH = b"\x02"  # union branch 1
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


def utf8_bytes(data: bytes) -> bytes:
    """Avro ``string`` from its UTF-8 bytes (not checked: the caller's own text)."""
    size = len(data)
    return (SMALL_LONGS[size] if size < SMALL_COUNT else long_bytes(size)) + data


def string_bytes(text: str) -> bytes:
    """Avro ``string``; raises UnicodeEncodeError for lone surrogates, as fastavro does."""
    return utf8_bytes(text.encode())


_STRINGS: dict[str, bytes] = {}


def cached_string_bytes(text: str) -> bytes:
    """:func:`string_bytes` memoised: map keys, model names and labels repeat."""
    data = _STRINGS.get(text)
    if data is None:
        if len(_STRINGS) >= CACHE_LIMIT:
            _STRINGS.clear()
        data = _STRINGS[text] = string_bytes(text)
    return data


def optional_string(text: str | None) -> bytes:
    """The union ``["null", "string"]``."""
    return NULL_BRANCH if text is None else VALUE_BRANCH + cached_string_bytes(text)


def optional_long(n: int | None) -> bytes:
    """The union ``["null", "long"]``."""
    return NULL_BRANCH if n is None else VALUE_BRANCH + long_bytes(n)


def optional_double(x: float | None) -> bytes:
    """The union ``["null", "double"]``."""
    return NULL_BRANCH if x is None else VALUE_BRANCH + pack_double(x)


def block_bytes(count: int, body: bytes) -> bytes:
    """A map or array of ``count`` already encoded entries: one block, then the terminator."""
    return long_bytes(count) + body + EMPTY if count else EMPTY


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


_DOUBLE_MAPS: dict[tuple[str, ...], tuple[struct.Struct, list[object]]] = {}


def double_map_bytes(keys: tuple[str, ...], values: Sequence[float]) -> bytes:
    """Avro ``map<double>`` of ``keys`` to ``values`` (same length, same order).

    Values must be real numbers (``struct.error`` otherwise); finiteness is the caller's
    concern because Avro itself carries NaN and infinities.
    """
    if not keys:
        return EMPTY
    plan = _DOUBLE_MAPS.get(keys)
    if plan is None:
        if len(_DOUBLE_MAPS) >= CACHE_LIMIT:
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


def string_dict_bytes(mapping: Mapping[str, str]) -> bytes:
    """Avro ``map<string>`` of a mapping of strings."""
    return string_map_bytes([(cached_string_bytes(k), string_bytes(v))
                             for k, v in mapping.items()])


def string_array_bytes(items: Sequence[str]) -> bytes:
    """Avro ``array<string>``."""
    if not items:
        return EMPTY
    return b"".join([long_bytes(len(items)), *map(cached_string_bytes, items), EMPTY])


# -- reading ---------------------------------------------------------------------------------

unpack_double = struct.Struct("<d").unpack_from


class WireError(ValueError):
    """Bytes a fast reader does not take (corrupt, or legal but rare, such as sized blocks):
    the caller hands the message to the Codec, which decodes it or says why not."""


def read_long(data: bytes, pos: int) -> tuple[int, int]:
    """An Avro ``long`` at ``pos``: (value, next position).

    Raises :class:`WireError` for a varint past 64 bits (fastavro would wrap it) and
    IndexError when ``data`` ends inside it.
    """
    b = data[pos]
    if b < 0x80:
        return (b >> 1) ^ -(b & 1), pos + 1
    n, shift = b & 0x7F, 7
    while True:
        pos += 1
        b = data[pos]
        n |= (b & 0x7F) << shift
        if b < 0x80:
            if n >> 64:
                raise WireError("varint beyond 64 bits")
            return (n >> 1) ^ -(n & 1), pos + 1
        shift += 7
        if shift > 63:
            raise WireError("varint too long")


_VARINT = re.compile(rb"[\x80-\xff]{0,9}[\x00-\x7f]")  # one long, in a single C call


def skip_long(data: bytes, pos: int) -> int:
    """The position after the long at ``pos``, its value not needed."""
    match = _VARINT.match(data, pos)
    if match is None:
        raise WireError("varint too long or truncated")
    return match.end()


def read_utf8(data: bytes, pos: int) -> tuple[bytes, int]:
    """An Avro ``string`` at ``pos`` as its raw UTF-8 bytes (not validated)."""
    n, pos = read_long(data, pos)
    end = pos + n
    if n < 0 or end > len(data):
        raise WireError("string out of bounds")
    return data[pos:end], end


def read_string(data: bytes, pos: int) -> tuple[str, int]:
    """An Avro ``string`` at ``pos`` (UnicodeDecodeError if it is not UTF-8)."""
    n, pos = read_long(data, pos)  # read_utf8 inlined: strings are most of a record
    end = pos + n
    if n < 0 or end > len(data):
        raise WireError("string out of bounds")
    return data[pos:end].decode(), end


def read_double(data: bytes, pos: int) -> tuple[float, int]:
    """An Avro ``double`` at ``pos``."""
    return unpack_double(data, pos)[0], pos + 8


def read_count(data: bytes, pos: int) -> tuple[int, int]:
    """A block count; a negative one (a block with its byte size) is left to fastavro."""
    count, pos = read_long(data, pos)
    if count < 0:
        raise WireError("negative block count")
    return count, pos


def read_optional(data: bytes, pos: int,
                  read: Callable[[bytes, int], tuple[T, int]]) -> tuple[T | None, int]:
    """The union ``["null", T]`` given the reader of ``T``."""
    branch, pos = read_long(data, pos)
    if branch == 0:
        return None, pos
    if branch != 1:
        raise WireError("union branch out of range")
    return read(data, pos)


def read_string_map(data: bytes, pos: int) -> tuple[dict[str, str], int]:
    """An Avro ``map<string>`` (any number of blocks)."""
    out: dict[str, str] = {}
    count, pos = read_count(data, pos)
    while count:
        for _ in range(count):
            key, pos = read_string(data, pos)
            out[key], pos = read_string(data, pos)
        count, pos = read_count(data, pos)
    return out, pos


def read_string_array(data: bytes, pos: int) -> tuple[list[str], int]:
    """An Avro ``array<string>`` (any number of blocks)."""
    out: list[str] = []
    count, pos = read_count(data, pos)
    while count:
        for _ in range(count):
            item, pos = read_string(data, pos)
            out.append(item)
        count, pos = read_count(data, pos)
    return out, pos


# -- hand layouts ----------------------------------------------------------------------------

OUTPUT = ("record", (("label", ("null", "string")), ("probabilities", ("map", "double")),
                     ("value", ("null", "double"))))
JOIN_STATES = ("predicted", "labelled", "orphan_feedback", "orphan_prediction")
# Each schema with a hand-written fast path: its fields in wire order with the types the
# fast paths write and read, and who they are. A schema change must change this table and
# the code named here together: the table is checked against the .avsc files at import
# and by ``shadowpipe schemas check``, the code against fastavro by the property tests.
LAYOUTS: dict[str, tuple[tuple[tuple[str, Any], ...], str]] = {
    "InferenceEvent": ((
        ("request_id", "string"), ("event_time", "long"), ("model", "string"),
        ("model_version", "string"), ("num_features", ("map", "double")),
        ("cat_features", ("map", "string")), ("null_features", ("array", "string")),
        ("output", OUTPUT), ("latency_ms", "double"), ("context", ("map", "string")),
        ("inclusion_prob", "double"), ("trace_id", ("null", "string")),
    ), "producers/events.py, producers/_encode.c, processors/shadow/decode.py, "
       "processors/join/fastpath.py"),
    "Feedback": ((
        ("request_id", "string"), ("label", ("null", "string")), ("value", ("null", "double")),
        ("event_time", "long"), ("source", ("enum", ("explicit", "implicit", "human"))),
        ("weight", "double"), ("inclusion_prob", "double"),
    ), "producers/events.py"),
    "ShadowPrediction": ((
        ("request_id", "string"), ("challenger", "string"), ("challenger_version", "string"),
        ("is_control", "boolean"), ("event_time", "long"), ("scored_at", "long"),
        ("output", ("null", OUTPUT)), ("model_time_ms", "double"), ("queue_lag_ms", "double"),
        ("error", ("null", "string")), ("error_kind", ("null", "string")),
    ), "processors/shadow/encode.py, processors/join/fastpath.py"),
    "JoinedRecord": ((
        ("request_id", "string"), ("challenger", "string"), ("challenger_version", "string"),
        ("is_control", "boolean"), ("version", "long"), ("state", ("enum", JOIN_STATES)),
        ("event_time", ("null", "long")),
        ("model", "string"), ("model_version", "string"), ("context", ("map", "string")),
        ("num_features", ("map", "double")), ("cat_features", ("map", "string")),
        ("null_features", ("array", "string")), ("primary_output", ("null", OUTPUT)),
        ("primary_latency_ms", ("null", "double")),
        ("shadow_output", ("null", OUTPUT)), ("shadow_error", ("null", "string")),
        ("shadow_error_kind", ("null", "string")), ("model_time_ms", ("null", "double")),
        ("queue_lag_ms", ("null", "double")),
        ("label", ("null", "string")), ("label_value", ("null", "double")),
        ("label_time", ("null", "long")), ("label_delay_ms", ("null", "long")),
        ("feedback_source", ("null", "string")), ("feedback_weight", "double"),
        ("inclusion_prob", "double"), ("joined_at", "long"), ("trace_id", ("null", "string")),
    ), "processors/join/parts.py, processors/join/_fastpath.c"),
}


class LayoutMismatch(ConfigError):
    """A ``.avsc`` no longer matches the hand layout of its fast paths: refuse to start.

    ``str()`` is one line naming the schema file and the field.
    """

    def __init__(self, name: str, problem: str) -> None:
        super().__init__(f"schemas/{name}.avsc", problem)
        self.name = name


def shape(t: Any) -> Any:
    """The structure of a parsed (expanded) Avro type as nested tuples, names dropped.

    >>> shape({"type": "map", "values": "double"}), shape(["null", "string"])
    (('map', 'double'), ('null', 'string'))
    """
    if isinstance(t, str):
        return t
    if isinstance(t, list):
        return tuple(shape(x) for x in t)
    kind = t["type"]
    if kind in ("map", "array"):
        return (kind, shape(t["values" if kind == "map" else "items"]))
    if kind == "record":
        return ("record", tuple((f["name"], shape(f["type"])) for f in t["fields"]))
    if kind == "enum":
        return ("enum", tuple(t["symbols"]))
    return shape(kind)


def fields_of(parsed: dict[str, Any]) -> tuple[tuple[str, Any], ...]:
    """A record schema's fields in wire order as ``(name, shape)`` pairs."""
    return tuple((f["name"], shape(f["type"])) for f in expand_schema(parsed)["fields"])


def layout_problem(name: str, parsed: dict[str, Any]) -> str | None:
    """The first difference between ``parsed`` and the hand layout of ``name`` as one line
    naming the field, or None when they match."""
    expected, owners = LAYOUTS[name]
    actual = fields_of(parsed)
    if actual == expected:
        return None
    want, have = dict(expected), dict(actual)
    for i, (field, t) in enumerate(actual):
        if field not in want:
            what = f"field {field!r} is not in the hand layout (added or renamed)"
        elif want[field] != t:
            what = f"field {field!r} is {_text(t)}, the hand layout has {_text(want[field])}"
        elif i >= len(expected) or expected[i][0] != field:
            what = f"field {field!r} moved to position {i}"
        else:
            continue
        return f"{what}: update {owners} and LAYOUTS in schemas/wire.py"
    missing = next(f for f, _t in expected if f not in have)
    return (f"field {missing!r} is gone from the schema (removed or renamed): update {owners}"
            " and LAYOUTS in schemas/wire.py")


def _text(t: Any) -> str:
    return t if isinstance(t, str) else repr(t)


def require_layout(name: str) -> None:
    """Raise :class:`LayoutMismatch` unless the current ``name`` schema has its hand layout;
    every fast path calls it at import, so a stale one refuses to start.

    >>> require_layout("InferenceEvent")
    """
    problem = layout_problem(name, schema(name))
    if problem is not None:
        raise LayoutMismatch(name, problem)


def layout_problems(schema_dir: Path | None = None) -> list[str]:
    """Every hand layout that no longer matches its schema (read from ``schema_dir``, by
    default the installed schemas), one line each."""
    problems = []
    for name in LAYOUTS:
        parsed = schema(name) if schema_dir is None else parse_file(schema_dir / f"{name}.avsc")
        problem = layout_problem(name, parsed)
        if problem is not None:
            problems.append(str(LayoutMismatch(name, problem)))
    return problems
