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

import struct
from collections.abc import Sequence
from typing import Any

from shadowpipe.schemas.codec import Codec
from shadowpipe.schemas.wire import (
    CACHE_LIMIT,
    NULL_BRANCH,
    SMALL_COUNT,
    SMALL_LONGS,
    VALUE_BRANCH,
    double_map_plan,
    long_bytes,
    pack_double,
    require_layout,
    string_bytes,
    time_bytes,
)

# The layout written below is this schema's; a changed .avsc refuses to import.
require_layout("ShadowPrediction")
NULL, SOME = NULL_BRANCH, VALUE_BRANCH
_two_doubles = struct.Struct("<dd").pack
_NO_ERROR = NULL + NULL


class PredictionEncoder:
    """Encode the ShadowPredictions of one challenger."""

    def __init__(self, codec: Codec, challenger: str, version: str, is_control: bool,
                 framing: str | None = None) -> None:
        self._head = codec.header("ShadowPrediction", framing)  # the codec's own by default
        self._const = (
            string_bytes(challenger) + string_bytes(version) + (b"\x01" if is_control else NULL)
        )
        self._strings: dict[str, bytes] = {}
        self._plans: dict[tuple[Any, ...], tuple[Any, list[Any]]] = {}

    def _str(self, s: str) -> bytes:
        cached = self._strings.get(s)
        if cached is None:
            cached = string_bytes(s)
            if len(self._strings) < CACHE_LIMIT:
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
                parts.append(pack_double(p))
        parts.append(NULL)
        parts.append(NULL if value is None else SOME + pack_double(value))
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
            scored_at, self._tail(output, model_time_ms, queue_lag_ms, error, error_kind),
        ))

    def _tail(
        self, output: dict[str, Any] | None, model_time_ms: float, queue_lag_ms: float,
        error: str | None, error_kind: str | None,
    ) -> bytes:
        return b"".join((
            self._output(output), _two_doubles(model_time_ms, queue_lag_ms),
            NULL if error is None else SOME + string_bytes(error),
            NULL if error_kind is None else SOME + self._str(error_kind),
        ))

    def encode_many(
        self, keys: Sequence[bytes], event_times: Sequence[int], results: Sequence[Any],
        model_time_ms: float, queue_lags: Sequence[float], scored_at: bytes,
    ) -> list[bytes]:
        """:meth:`encode` for a batch: ``keys`` are the UTF-8 request ids, each result has
        ``output``, ``error`` and ``error_kind``; ``scored_at`` is pre-encoded.

        Successful classifier outputs (label, probabilities, no value) take one
        ``struct`` call per record, from a layout cached per label and class names.
        """
        head, const, plans, out = self._head, self._const, self._plans, []
        for key, event_time, res, lag in zip(keys, event_times, results, queue_lags,
                                             strict=True):
            output = res.output
            if (res.error is None and output is not None and output["value"] is None
                    and output["probabilities"]):
                probs = output["probabilities"]
                plan = plans.get((output["label"], *probs))
                if plan is None:
                    plan = self._plan(output["label"], tuple(probs))
                layout, template = plan
                args = template.copy()
                args[3:-5:2] = probs.values()
                args[-3] = model_time_ms
                args[-2] = lag
                tail = layout.pack(*args)
            else:
                tail = self._tail(output, model_time_ms, lag, res.error, res.error_kind)
            size = len(key)
            out.append(b"".join((
                head, SMALL_LONGS[size] if size < SMALL_COUNT else long_bytes(size), key,
                const, time_bytes(event_time), scored_at, tail,
            )))
        return out

    def _plan(self, label: str | None, classes: tuple[str, ...]) -> tuple[Any, list[Any]]:
        """Layout and argument template of a successful classifier output's bytes (at
        least one class) through the end of the record: probabilities at ``[3:-5:2]``, the
        two timings at -3, -2."""
        first = SOME + (NULL if label is None else SOME + self._str(label))
        probs, template = double_map_plan(classes)
        # value: null, the timings, error and error_kind: null
        plan = (struct.Struct(f"<{len(first)}s{probs.format[1:]}1sdd2s"),
                [first, *template, NULL, 0.0, 0.0, _NO_ERROR])
        if len(self._plans) >= CACHE_LIMIT:
            self._plans.clear()
        self._plans[(label, *classes)] = plan
        return plan
