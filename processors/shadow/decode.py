"""A fast InferenceEvent decoder for the worker's hot path, with the Codec as referee.

fastavro needs ~40 us per event here, mostly for the numeric-feature map. Events of one
service repeat the same feature names in the same order, so the map is read with one
precompiled ``struct`` layout (learnt from the previous event with that many features)
and checked against the expected key bytes in C. Only messages written with the *current*
InferenceEvent schema take this path (single-object, or Confluent under the id the codec
knows for it); anything else, and anything
unexpected on the way (a layout mismatch is not unexpected: it reads generically), is
handed to :meth:`Codec.decode`, which decodes it or raises the DecodeError with its reason.
Records read here pass the same :func:`~shadowpipe.schemas.validate.check` as the Codec's,
so both paths give one verdict. Tests check equality with fastavro on generated and
corrupted records.

>>> from shadowpipe.schemas.codec import Codec
>>> codec = Codec()
>>> event = {"request_id": "r1", "event_time": 5, "model": "m", "model_version": "1",
...          "num_features": {"a": 1.0, "b": 2.0}, "output": {}, "latency_ms": 1.0}
>>> data = codec.encode("InferenceEvent", event)
>>> fast = InferenceDecoder(codec)
>>> fast.decode(data) == codec.decode(data, "InferenceEvent")
True
>>> fast.decode(data)["num_features"]  # the second read uses the learnt layout
{'a': 1.0, 'b': 2.0}
"""

from __future__ import annotations

import struct
from typing import Any

from shadowpipe.schemas.codec import CONFLUENT, SINGLE_OBJECT, Codec
from shadowpipe.schemas.validate import check
from shadowpipe.schemas.wire import (
    WireError,
    read_count,
    read_double,
    read_long,
    read_optional,
    read_string,
    read_string_array,
    read_string_map,
    read_utf8,
    require_layout,
    unpack_double,
)

NAME = "InferenceEvent"
# The layout read below is this schema's; a changed .avsc refuses to import.
require_layout(NAME)
_MAX_LAYOUT = 512  # features per learnt layout
_MAX_LAYOUTS = 64


class _Layout:
    """The byte layout of one map<double> block: varint-length, key, 8-byte value..."""

    def __init__(self, keys: list[bytes]) -> None:
        self.struct = struct.Struct("<" + "".join(f"B{len(k)}sd" for k in keys))
        self.lens = tuple(2 * len(k) for k in keys)  # zig-zag varint of a length < 64
        self.keys = tuple(keys)
        self.names = tuple(k.decode() for k in keys)


class InferenceDecoder:
    """Decode InferenceEvent messages; same results and errors as ``codec.decode``."""

    def __init__(self, codec: Codec) -> None:
        self.codec = codec
        self.header = codec.header(NAME, SINGLE_OBJECT)
        try:  # Confluent framing under the current schema's id, when the codec knows it
            self.confluent: bytes | None = codec.header(NAME, CONFLUENT)
        except LookupError:
            self.confluent = None
        self._layouts: dict[int, _Layout] = {}

    def decode(self, data: bytes | None) -> dict[str, Any]:
        """The validated record, or :class:`~shadowpipe.schemas.codec.DecodeError` (or its
        subclass InvalidRecord) with the Codec's reason."""
        if data:
            if data.startswith(self.header):
                start = len(self.header)
            elif self.confluent is not None and data.startswith(self.confluent):
                start = len(self.confluent)
            else:
                return self.codec.decode(data, NAME)
            try:
                record, end = self._record(data, start)
            except (WireError, IndexError, struct.error, UnicodeDecodeError):
                pass
            else:
                if end == len(data):
                    return check(NAME, record)
        return self.codec.decode(data, NAME)

    def _record(self, data: bytes, pos: int) -> tuple[dict[str, Any], int]:
        # Empty maps/arrays and null unions are one 0x00 byte: tested inline, as calls
        # cost more than the reading itself.
        request_id, pos = read_string(data, pos)
        event_time, pos = read_long(data, pos)
        model, pos = read_string(data, pos)
        model_version, pos = read_string(data, pos)
        num_features, pos = self._double_map(data, pos)
        if data[pos] == 0:
            cat_features: dict[str, str] = {}
            pos += 1
        else:
            cat_features, pos = read_string_map(data, pos)
        if data[pos] == 0:
            null_features: list[str] = []
            pos += 1
        else:
            null_features, pos = read_string_array(data, pos)
        label, pos = (None, pos + 1) if data[pos] == 0 else read_optional(data, pos, read_string)
        probabilities, pos = self._double_map(data, pos)
        value, pos = (None, pos + 1) if data[pos] == 0 else read_optional(data, pos, read_double)
        latency_ms = unpack_double(data, pos)[0]
        pos += 8
        if data[pos] == 0:
            context: dict[str, str] = {}
            pos += 1
        else:
            context, pos = read_string_map(data, pos)
        inclusion_prob = unpack_double(data, pos)[0]
        pos += 8
        trace_id, pos = (None, pos + 1) if data[pos] == 0 else read_optional(data, pos, read_string)
        return {
            "request_id": request_id, "event_time": event_time, "model": model,
            "model_version": model_version, "num_features": num_features,
            "cat_features": cat_features, "null_features": null_features,
            "output": {"label": label, "probabilities": probabilities, "value": value},
            "latency_ms": latency_ms, "context": context, "inclusion_prob": inclusion_prob,
            "trace_id": trace_id,
        }, pos

    def _double_map(self, data: bytes, pos: int) -> tuple[dict[str, float], int]:
        count = data[pos]
        if count == 0:
            return {}, pos + 1
        count, pos = read_count(data, pos)
        layout = self._layouts.get(count)
        if layout is not None:
            end = pos + layout.struct.size
            if end < len(data) and data[end] == 0:
                t = layout.struct.unpack_from(data, pos)
                if t[1::3] == layout.keys and t[0::3] == layout.lens:
                    return dict(zip(layout.names, t[2::3], strict=True)), end + 1
        return self._double_map_generic(data, pos, count)

    def _double_map_generic(
        self, data: bytes, pos: int, count: int
    ) -> tuple[dict[str, float], int]:
        out: dict[str, float] = {}
        keys: list[bytes] = []
        first = count
        while count:
            for _ in range(count):
                key, end = read_utf8(data, pos)
                out[key.decode()] = unpack_double(data, end)[0]
                keys.append(key)
                pos = end + 8
            count, pos = read_count(data, pos)
        if len(keys) == first and first <= _MAX_LAYOUT and all(len(k) < 64 for k in keys):
            if len(self._layouts) >= _MAX_LAYOUTS:
                self._layouts.clear()
            self._layouts[first] = _Layout(keys)
        return out, pos
