"""Validate, redact and encode inference and feedback events into wire bytes.

Input rules (anything else is rejected with :class:`Invalid` and a reason):

* **features**: a mapping of ``str`` names to real numbers (``float``, ``int``, ``bool``,
  numpy scalars; sent as doubles in ``num_features``), ``str`` (``cat_features``) or
  ``None`` (listed in ``null_features``). A NaN number counts as missing (``None``), as in
  pandas; an infinite one is rejected (``non_finite``).
* **output**: ``str``, ``bool`` or an integer (a class label; bools as ``"true"``/``"false"``,
  integers in decimal), a ``float`` (a regression value), or a mapping with any of
  ``label``, ``probabilities`` (``str`` -> finite number) and ``value``.
* **context**: a mapping of ``str`` to ``str``.
* every other number (latency, weight) must be finite.

Privacy is applied before encoding: a field named in ``drop`` disappears from features and
context; one named in ``hash`` is replaced by ``HMAC-SHA256(key, text)``, first 16 bytes as
32 hex digits, where ``text`` is the string itself or, for a number, Python's
``repr(float(x))`` (``"42.0"``); a hashed feature is therefore categorical.

>>> from shadowpipe.schemas.codec import Codec
>>> codec = Codec()
>>> enc = EventEncoder(codec.header("InferenceEvent"), codec.header("Feedback"))
>>> data = enc.inference(b"r1", {"amount": 12.5, "country": "DE", "ref": None}, "ok",
...                      model="m", version="1", latency_ms=0.5, context=None,
...                      event_time=1700000000000, inclusion_prob=1.0, trace_id=None)
>>> record = codec.decode(data, "InferenceEvent")
>>> record["num_features"], record["cat_features"], record["null_features"]
({'amount': 12.5}, {'country': 'DE'}, ['ref'])
>>> enc.inference(b"r1", {"x": float("inf")}, "ok", model="m", version="1", latency_ms=0.5,
...               context=None, event_time=0, inclusion_prob=1.0, trace_id=None)
Traceback (most recent call last):
...
shadowpipe.producers.events.Invalid: non_finite
"""

from __future__ import annotations

import hmac
import math
import numbers
import struct
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from operator import itemgetter
from typing import Any

from shadowpipe.schemas.wire import (
    CACHE_LIMIT,
    EMPTY,
    NULL_BRANCH,
    SMALL_COUNT,
    SMALL_LONGS,
    VALUE_BRANCH,
    cached_string_bytes,
    double_map_bytes,
    double_map_plan,
    pack_double,
    require_layout,
    string_array_bytes,
    string_bytes,
    string_map_bytes,
    time_bytes,
    utf8_bytes,
)

# The hand layouts below are those of these schemas; a changed .avsc refuses to import.
require_layout("InferenceEvent")
require_layout("Feedback")

try:  # the compiled common case (producers/_encode.c); optional at install time
    from shadowpipe.producers._encode import encode_inference as compiled_inference
except ImportError:  # pragma: no cover - a build without a C compiler
    compiled_inference = None

_SOURCES = {"explicit": b"\x00", "implicit": b"\x02", "human": b"\x04"}  # zigzag index
_OUTPUT_FIELDS = frozenset(("label", "probabilities", "value"))
_NUM, _CAT, _NULL = "num", "cat", "null"


class Invalid(Exception):
    """An input that is not sent; ``reason`` is the counter it is reported under."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def reason_of(exc: Exception) -> str:
    """The counter reason of any exception raised while encoding an input.

    The encoder lets Python's own errors through on rare inputs (a string where a number
    belongs fails in arithmetic or ``struct``) rather than type-checking every value.

    >>> reason_of(Invalid("too_large")), reason_of(TypeError()), reason_of(OverflowError())
    ('too_large', 'unsupported_type', 'out_of_range')
    """
    if isinstance(exc, Invalid):
        return exc.reason
    if isinstance(exc, UnicodeError):
        return "invalid_string"
    if isinstance(exc, OverflowError):
        return "out_of_range"
    if isinstance(exc, TypeError | ValueError | AttributeError | ArithmeticError | struct.error):
        return "unsupported_type"
    return "internal_error"


@dataclass(frozen=True)
class Privacy:
    """Field names to drop or replace by a keyed hash, in features and context alike."""

    drop: frozenset[str] = frozenset()
    hash: frozenset[str] = frozenset()
    key: bytes = b""

    def digest(self, value: Any) -> str:
        """The documented keyed hash of a string or number."""
        text = value if isinstance(value, str) else repr(float(value))
        return hmac.digest(self.key, text.encode(), "sha256")[:16].hex()


def _getter(indexes: Sequence[int]) -> Callable[[Sequence[Any]], tuple[Any, ...]]:
    """Picks positions as a tuple (itemgetter alone returns a bare value for one index)."""
    if len(indexes) == 1:
        (only,) = indexes
        return lambda values: (values[only],)
    return itemgetter(*indexes) if indexes else lambda values: ()


def _feature_kind(tp: type) -> str:
    if tp is float or tp is int or tp is bool or issubclass(tp, numbers.Real):
        return _NUM
    if issubclass(tp, str):
        return _CAT
    if tp is type(None):
        return _NULL
    raise Invalid("unsupported_type")


@dataclass(frozen=True)
class _FeaturePlan:
    """How one (names, value types) shape of features is split and encoded."""

    num_get: Callable[[Sequence[Any]], tuple[Any, ...]] | None  # None: all, in order
    num_map: tuple[struct.Struct, list[object]] | None  # double_map_plan of the numbers
    cats: tuple[tuple[int, bytes, bool], ...]  # position, encoded name, hashed
    nulls: bytes


def _double(x: Any) -> bytes:
    if x - x != 0:
        raise Invalid("non_finite")
    return pack_double(x)


def _label(label: Any) -> bytes:
    """The ``["null", "string"]`` union of a label (see the module rules)."""
    if label is None:
        return NULL_BRANCH
    if type(label) is str:
        return VALUE_BRANCH + cached_string_bytes(label)
    if type(label) is bool:
        return VALUE_BRANCH + cached_string_bytes("true" if label else "false")
    if isinstance(label, numbers.Integral):
        return VALUE_BRANCH + cached_string_bytes(str(int(label)))
    raise Invalid("unsupported_type")


def _nan_to_none(features: Mapping[str, Any]) -> dict[str, Any]:
    """Slow path when a numeric feature is not finite: NaN is missing, infinity invalid."""
    out = {}
    for name, value in features.items():
        if value is not None and type(value) is not str and not math.isfinite(value):
            if not math.isnan(value):
                raise Invalid("non_finite")
            value = None
        out[name] = value
    return out


class EventEncoder:
    """Builds the wire bytes (header + Avro body) of both event kinds.

    ``inference_header`` / ``feedback_header`` are the framing prefixes (single-object
    marker and fingerprint, or Confluent magic byte and schema id). Shapes of features and
    context are planned once and cached (bounded), so steady traffic pays no planning.
    Plain inference events (dicts of str, float, int, None; no privacy rules) are written
    by the compiled encoder when it was built (``compiled=False`` forces Python); it
    writes the same bytes and leaves every other input to the Python code.
    """

    def __init__(
        self,
        inference_header: bytes,
        feedback_header: bytes,
        privacy: Privacy | None = None,
        max_bytes: int = 1 << 20,
        compiled: bool = True,
    ) -> None:
        self.inference_header = inference_header
        self.feedback_header = feedback_header
        self.privacy = privacy or Privacy()
        self.max_bytes = max_bytes
        self._feature_plans: dict[tuple[Any, ...], _FeaturePlan] = {}
        self._contexts: dict[tuple[Any, ...], bytes] = {}
        self._model_versions: dict[tuple[Any, Any], bytes] = {}
        self._labels: dict[Any, bytes] = {}
        self._output_plans: dict[tuple[str, ...], tuple[struct.Struct, list[Any]]] = {}
        self._context_plans: dict[tuple[Any, ...], tuple[tuple[int, bytes, bool], ...]] = {}
        # The compiled encoder knows no privacy rules: with any, every event takes Python.
        plain = compiled and not (self.privacy.drop or self.privacy.hash)
        self.compiled = compiled_inference if plain else None

    # -- events ---------------------------------------------------------------------------

    def inference(
        self,
        request_id: bytes,
        features: Mapping[str, Any] | None,
        output: Any,
        *,
        model: str,
        version: str,
        latency_ms: float,
        context: Mapping[str, str] | None,
        event_time: int,
        inclusion_prob: float,
        trace_id: str | None,
    ) -> bytes:
        """An ``InferenceEvent``; ``request_id`` is the id's UTF-8 bytes."""
        return self.encoded_model_inference(
            request_id, features, output, self.model_version(model, version), latency_ms,
            context, event_time, inclusion_prob, trace_id,
        )

    def encoded_model_inference(
        self,
        request_id: bytes,
        features: Mapping[str, Any] | None,
        output: Any,
        model_version: bytes,
        latency_ms: float,
        context: Mapping[str, str] | None,
        event_time: int,
        inclusion_prob: float,
        trace_id: str | None,
    ) -> bytes:
        """:meth:`inference` with the model fields already encoded (:meth:`model_version`):
        the compiled encoder when it takes the inputs, else the Python one."""
        # The arguments are spelt out, not passed as *args: 0.2 us less per event.
        data = None if self.compiled is None else self.compiled(
            self.inference_header, request_id, features, output, model_version,
            latency_ms, context, event_time, inclusion_prob, trace_id,
        )
        if data is None:  # not the plain case: Python writes it or says why not
            return self.python_inference(
                request_id, features, output, model_version, latency_ms, context,
                event_time, inclusion_prob, trace_id,
            )
        if len(data) > self.max_bytes:
            raise Invalid("too_large")
        return data

    def python_inference(
        self,
        request_id: bytes,
        features: Mapping[str, Any] | None,
        output: Any,
        model_version: bytes,
        latency_ms: float,
        context: Mapping[str, str] | None,
        event_time: int,
        inclusion_prob: float,
        trace_id: str | None,
    ) -> bytes:
        """:meth:`inference` by the Python encoder alone (every input, any rule), with
        the model fields already encoded (:meth:`model_version`)."""
        num, cat, null = self._features(features)
        if latency_ms - latency_ms != 0:
            raise Invalid("non_finite")
        size = len(request_id)
        data = b"".join((
            self.inference_header,
            SMALL_LONGS[size] + request_id if size < SMALL_COUNT else utf8_bytes(request_id),
            time_bytes(event_time),
            model_version,
            num,
            cat,
            null,
            self._output(output),
            pack_double(latency_ms),
            self._context(context),
            pack_double(inclusion_prob),
            NULL_BRANCH if trace_id is None else VALUE_BRANCH + _string(trace_id),
        ))
        if len(data) > self.max_bytes:
            raise Invalid("too_large")
        return data

    def model_version(self, model: Any, version: Any) -> bytes:
        """The encoded ``model`` and ``version`` fields (memoised), or Invalid."""
        encoded = self._model_versions.get((model, version))
        return encoded if encoded is not None else self._model_version(model, version)

    def _model_version(self, model: Any, version: Any) -> bytes:
        if type(model) is not str or type(version) is not str:
            raise Invalid("unsupported_type")
        if not model:
            raise Invalid("missing_model")
        encoded = string_bytes(model) + string_bytes(version)
        if len(self._model_versions) >= CACHE_LIMIT:
            self._model_versions.clear()
        self._model_versions[model, version] = encoded
        return encoded

    def feedback(
        self,
        request_id: bytes,
        label: Any,
        *,
        value: Any,
        event_time: int,
        source: str,
        weight: float,
        inclusion_prob: float,
    ) -> bytes:
        """A ``Feedback``: a float ``label`` is the regression ``value`` (module rules)."""
        if isinstance(label, numbers.Real) and not isinstance(label, numbers.Integral):
            if value is not None:
                raise Invalid("unsupported_type")
            label, value = None, label
        if label is None and value is None:
            raise Invalid("missing_outcome")
        source_bytes = _SOURCES.get(source) if type(source) is str else None
        if source_bytes is None:
            raise Invalid("invalid_source")
        parts = [
            self.feedback_header,
            utf8_bytes(request_id),
            _label(label),
            NULL_BRANCH if value is None else VALUE_BRANCH + _double(value),
            time_bytes(event_time),
            source_bytes,
            _double(weight),
            pack_double(inclusion_prob),
        ]
        data = b"".join(parts)
        if len(data) > self.max_bytes:
            raise Invalid("too_large")
        return data

    # -- parts ----------------------------------------------------------------------------

    def _features(self, features: Mapping[str, Any] | None) -> tuple[bytes, bytes, bytes]:
        """(num_features, cat_features, null_features) encodings."""
        if not features:
            if features is None or isinstance(features, Mapping):
                return EMPTY, EMPTY, EMPTY
            raise Invalid("unsupported_type")
        if type(features) is not dict and not isinstance(features, Mapping):
            raise Invalid("unsupported_type")
        values = tuple(features.values())
        shape = (tuple(features), tuple(map(type, values)))
        plan = self._feature_plans.get(shape) or self._plan_features(shape)
        nums = values if plan.num_get is None else plan.num_get(values)
        total = sum(nums)
        # One subtraction proves every number finite (a sum overflow takes the slow check).
        if total - total != 0 and not all(map(math.isfinite, nums)):
            return self._features(_nan_to_none(features))
        num = EMPTY
        if plan.num_map is not None:
            layout, template = plan.num_map
            args = template.copy()
            args[2:-1:2] = nums
            num = layout.pack(*args)
        cats = EMPTY
        if plan.cats:
            entries = []
            for position, name, hashed in plan.cats:
                value = values[position]
                entries.append((name, self._redacted(value, hashed)))
            cats = string_map_bytes(entries)
        return num, cats, plan.nulls

    def _redacted(self, value: Any, hashed: bool) -> bytes:
        return string_bytes(self.privacy.digest(value) if hashed else value)

    def _plan_features(self, shape: tuple[tuple[Any, ...], tuple[type, ...]]) -> _FeaturePlan:
        names, types = shape
        num_at, num_keys, cats, nulls = [], [], [], []
        for position, (name, tp) in enumerate(zip(names, types, strict=True)):
            if type(name) is not str:
                raise Invalid("unsupported_type")
            kind = _feature_kind(tp)
            if name in self.privacy.drop:
                continue
            if kind == _NULL:
                nulls.append(name)
            elif kind == _CAT or name in self.privacy.hash:
                cats.append((position, string_bytes(name), name in self.privacy.hash))
            else:
                num_at.append(position)
                num_keys.append(name)
        plan = _FeaturePlan(
            None if len(num_at) == len(names) else _getter(num_at),
            double_map_plan(tuple(num_keys)) if num_keys else None,
            tuple(cats),
            string_array_bytes(nulls),
        )
        if len(self._feature_plans) >= CACHE_LIMIT:
            self._feature_plans.clear()
        self._feature_plans[shape] = plan
        return plan

    def _output(self, output: Any) -> bytes:
        """The ``Output`` record: label union, probabilities map, value union."""
        if type(output) is dict and len(output) == 2:
            label, probs = output.get("label"), output.get("probabilities")
            if type(label) is str and type(probs) is dict and probs:
                # A classifier's output, the common case: one struct call per event (the
                # general path below costs three Python calls, ~4 us after a predict).
                values = tuple(probs.values())
                total = sum(values)
                if total - total != 0 and not all(map(math.isfinite, values)):
                    raise Invalid("non_finite")
                plan = self._output_plans.get((label, *probs)) or self._plan_output(label, probs)
                layout, template = plan
                args = template.copy()
                args[3:-2:2] = values
                return layout.pack(*args)
        if output is None:
            raise Invalid("missing_output")
        if type(output) is float:
            return NULL_BRANCH + EMPTY + VALUE_BRANCH + _double(output)
        if type(output) is dict or isinstance(output, Mapping):
            if not output.keys() <= _OUTPUT_FIELDS:
                raise Invalid("unsupported_type")
            label = output.get("label")
            label_bytes = self._labels.get(label) if type(label) is str else None
            if label_bytes is None:
                label_bytes = self._label_bytes(label)
            probs = output.get("probabilities")
            value = output.get("value")
            return b"".join((
                label_bytes,
                EMPTY if not probs else self._probabilities(probs),
                NULL_BRANCH if value is None else VALUE_BRANCH + _double(value),
            ))
        if isinstance(output, numbers.Integral | str):
            return _label(output) + EMPTY + NULL_BRANCH
        if isinstance(output, numbers.Real):
            return NULL_BRANCH + EMPTY + VALUE_BRANCH + _double(output)
        raise Invalid("unsupported_type")

    def _plan_output(self, label: str, probs: dict[str, Any]) -> tuple[struct.Struct, list[Any]]:
        """Struct and arguments template of an output with ``label`` and these classes:
        label bytes, the probabilities map (values at ``template[3:-2:2]``), null value."""
        label_bytes = self._label_bytes(label)
        layout, template = double_map_plan(tuple(probs))
        plan = (struct.Struct(f"<{len(label_bytes)}s{layout.format[1:]}1s"),
                [label_bytes, *template, NULL_BRANCH])
        if len(self._output_plans) >= CACHE_LIMIT:
            self._output_plans.clear()
        self._output_plans[(label, *probs)] = plan
        return plan

    def _label_bytes(self, label: Any) -> bytes:
        encoded = _label(label)
        if type(label) is str:
            if len(self._labels) >= CACHE_LIMIT:
                self._labels.clear()
            self._labels[label] = encoded
        return encoded

    @staticmethod
    def _probabilities(probs: Mapping[str, Any]) -> bytes:
        if type(probs) is not dict and not isinstance(probs, Mapping):
            raise Invalid("unsupported_type")
        values = tuple(probs.values())
        total = sum(values)
        if total - total != 0 and not all(map(math.isfinite, values)):
            raise Invalid("non_finite")
        return double_map_bytes(tuple(probs), values)

    def _context(self, context: Mapping[str, str] | None) -> bytes:
        if not context:
            if context is None or isinstance(context, Mapping):
                return EMPTY
            raise Invalid("unsupported_type")
        if type(context) is not dict and not isinstance(context, Mapping):
            raise Invalid("unsupported_type")
        # Contexts repeat (a few countries x devices): whole encodings are memoised.
        items = tuple(context.items())
        encoded = self._contexts.get(items)
        if encoded is None:
            encoded = self._encode_context(context)
            if len(self._contexts) >= CACHE_LIMIT:
                self._contexts.clear()
            self._contexts[items] = encoded
        return encoded

    def _encode_context(self, context: Mapping[str, str]) -> bytes:
        names = tuple(context)
        plan = self._context_plans.get(names) or self._plan_context(names)
        values = tuple(context.values())
        entries = []
        for position, name, hashed in plan:
            value = values[position]
            if not isinstance(value, str):
                raise Invalid("unsupported_type")
            entries.append((name, self._redacted(value, hashed)))
        return string_map_bytes(entries)

    def _plan_context(self, names: tuple[Any, ...]) -> tuple[tuple[int, bytes, bool], ...]:
        if not all(type(name) is str for name in names):
            raise Invalid("unsupported_type")
        plan = tuple(
            (position, string_bytes(name), name in self.privacy.hash)
            for position, name in enumerate(names)
            if name not in self.privacy.drop
        )
        if len(self._context_plans) >= CACHE_LIMIT:
            self._context_plans.clear()
        self._context_plans[names] = plan
        return plan


def _string(text: Any) -> bytes:
    if type(text) is not str:
        raise Invalid("unsupported_type")
    return string_bytes(text)
