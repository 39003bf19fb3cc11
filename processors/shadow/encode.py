"""A fast ShadowPrediction encoder for the worker's hot path.

fastavro walks the schema for every record (~25 us here); a challenger's output records
share most of their bytes (challenger name, version, control flag, label keys), so this
writes the same Avro binary from cached pieces. The wire prefix (single-object header or
Confluent framing) comes from the :class:`~shadowpipe.schemas.codec.Codec`, so consumers
decode it like any other record. Tests check byte equality with fastavro.

>>> from shadowpipe.schemas.codec import Codec
>>> codec = Codec()
>>> enc = PredictionEncoder(codec, "lr", "2", False)
>>> out = {"label": "1", "probabilities": {"0": 0.25, "1": 0.75}, "value": None}
>>> data = enc.encode("r1", 1700000000000, 1700000000100, out, 0.02, 100.0, None, None)
>>> rec = codec.decode(data, "ShadowPrediction")
>>> rec["challenger"], rec["output"]["probabilities"]["1"], rec["queue_lag_ms"]
('lr', 0.75, 100.0)
"""

from __future__ import annotations

import io
import struct
from typing import Any

import fastavro
from shadowpipe.producers.avro import long_bytes, string_bytes
from shadowpipe.schemas import schema
from shadowpipe.schemas.codec import Codec

NULL = b"\x00"
SOME = b"\x02"  # union branch 1
_double = struct.Struct("<d").pack
_two_doubles = struct.Struct("<dd").pack
_CACHE_LIMIT = 4096


def wire_prefix(codec: Codec, name: str, sample: dict[str, Any]) -> bytes:
    """The framing bytes ``codec`` puts before an Avro body of schema ``name``."""
    framed = codec.encode(name, sample)
    body = io.BytesIO()
    fastavro.schemaless_writer(body, schema(name), sample)
    return framed[: len(framed) - len(body.getvalue())]


class PredictionEncoder:
    """Encode the ShadowPredictions of one challenger."""

    def __init__(self, codec: Codec, challenger: str, version: str, is_control: bool) -> None:
        sample = {
            "request_id": "", "challenger": challenger, "challenger_version": version,
            "is_control": is_control, "event_time": 0, "scored_at": 0, "output": None,
            "model_time_ms": 0.0, "queue_lag_ms": 0.0,
        }
        self._head = wire_prefix(codec, "ShadowPrediction", sample)
        self._const = (
            string_bytes(challenger) + string_bytes(version) + (b"\x01" if is_control else NULL)
        )
        self._strings: dict[str, bytes] = {}

    def _str(self, s: str) -> bytes:
        cached = self._strings.get(s)
        if cached is None:
            cached = string_bytes(s)
            if len(self._strings) < _CACHE_LIMIT:
                self._strings[s] = cached
        return cached

    def _output(self, out: dict[str, Any] | None) -> bytes:
        if out is None:
            return NULL
        label, probs, value = out["label"], out["probabilities"], out["value"]
        parts = [SOME, NULL if label is None else SOME + self._str(label)]
        if probs:
            parts.append(long_bytes(len(probs)))
            for key, p in probs.items():
                parts.append(self._str(key))
                parts.append(_double(p))
        parts.append(NULL)
        parts.append(NULL if value is None else SOME + _double(value))
        return b"".join(parts)

    def encode(
        self, request_id: str, event_time: int, scored_at: int | bytes,
        output: dict[str, Any] | None, model_time_ms: float, queue_lag_ms: float,
        error: str | None, error_kind: str | None,
    ) -> bytes:
        """One framed ShadowPrediction record; ``scored_at`` may be pre-encoded
        (``long_bytes``), as it is the same for a whole batch."""
        if not isinstance(scored_at, bytes):
            scored_at = long_bytes(scored_at)
        return b"".join((
            self._head, string_bytes(request_id), self._const, long_bytes(event_time),
            scored_at, self._output(output), _two_doubles(model_time_ms, queue_lag_ms),
            NULL if error is None else SOME + string_bytes(error),
            NULL if error_kind is None else SOME + self._str(error_kind),
        ))
