"""The one validation of decoded records, shared by every decoder and every processor.

A message can be well-formed Avro (or JSON) and still not be processable: an inference
without a request id, a time that is not an epoch-ms, a feedback with neither label nor
value. :meth:`Codec.decode <shadowpipe.schemas.codec.Codec.decode>` applies :func:`check`
to every record it returns, and the hand-written fast paths (the shadow worker's decoder,
the joiner's walkers, compiled or not) either call it too or hand any record they would
have to judge back to the Codec. So the shadow worker, the joiner and the monitor give the
same verdict, with the same reason, on the same message.

Numeric features that are NaN are *missing values* (as the producer library treats them,
and as pandas does): they are moved from ``num_features`` to ``null_features``. An infinite
numeric feature is refused.

>>> event = {"request_id": "r1", "event_time": -5, "num_features": {}, "null_features": []}
>>> check("InferenceEvent", event)
Traceback (most recent call last):
...
shadowpipe.schemas.validate.InvalidRecord: event_time -5 is not a positive epoch-ms
>>> event = {"request_id": "r1", "event_time": 5, "num_features": {"a": float("nan"), "b": 1.0},
...          "null_features": []}
>>> fixed = check("InferenceEvent", event)
>>> fixed["num_features"], fixed["null_features"]
({'b': 1.0}, ['a'])
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

Record = dict[str, Any]


class DecodeError(ValueError):
    """A message that is not a valid record of the expected kind; ``reason`` says why.

    ``kind`` is the dead-letter error kind: ``decode`` (not a record of that schema) or
    ``invalid`` (a record, but one that cannot be processed: :class:`InvalidRecord`).
    """

    kind = "decode"

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class InvalidRecord(DecodeError):
    """A record that decodes but cannot be processed (no request id, a negative time...)."""

    kind = "invalid"


def check_request_id(request_id: str) -> str:
    """``request_id`` if it names a request (not empty, not only blanks)."""
    if not request_id or request_id.isspace():
        raise InvalidRecord("empty request_id")
    return request_id


def check_answer(challenger: str, answered: bool) -> None:
    """A ShadowPrediction names its challenger and carries an output or an error."""
    if not challenger:
        raise InvalidRecord("ShadowPrediction without challenger")
    if not answered:
        raise InvalidRecord("ShadowPrediction with neither output nor error")


def _positive_time(record: Record, field: str = "event_time") -> None:
    t = record[field]
    if t <= 0:
        raise InvalidRecord(f"{field} {t} is not a positive epoch-ms")


def _inference(record: Record) -> Record:
    # Inlined: this runs for every event on the shadow worker's hot path.
    request_id = record["request_id"]
    if not request_id or request_id.isspace():
        raise InvalidRecord("empty request_id")
    if record["event_time"] <= 0:
        raise InvalidRecord(f"event_time {record['event_time']} is not a positive epoch-ms")
    total = sum(record["num_features"].values())
    if total - total != 0.0:  # a NaN or an infinity (or a sum overflowing): look closer
        return _nan_is_missing(record)
    return record


def _nan_is_missing(record: Record) -> Record:
    """``record`` with NaN numeric features listed as null; an infinite one is refused."""
    features = record["num_features"]
    if all(map(math.isfinite, features.values())):
        return record
    kept: dict[str, float] = {}
    missing = list(record["null_features"])
    for name, value in features.items():
        if math.isnan(value):
            if name not in missing:
                missing.append(name)
        elif math.isinf(value):
            raise InvalidRecord(f"numeric feature {name!r} is {value} (not finite)")
        else:
            kept[name] = value
    return {**record, "num_features": kept, "null_features": missing}


def _prediction(record: Record) -> Record:
    check_request_id(record["request_id"])
    check_answer(record["challenger"], record["output"] is not None or record["error"] is not None)
    _positive_time(record)
    return record


def _feedback(record: Record) -> Record:
    check_request_id(record["request_id"])
    if record["label"] is None and record["value"] is None:
        raise InvalidRecord("Feedback with neither label nor value")
    _positive_time(record)
    return record


def _joined(record: Record) -> Record:
    check_request_id(record["request_id"])
    if not record["challenger"] and record["state"] != "orphan_feedback":
        raise InvalidRecord("JoinedRecord without challenger")
    t = record["event_time"]
    if t is not None and t < 0:  # 0 and null both mean "unknown" (orphans)
        raise InvalidRecord(f"event_time {t} is not a positive epoch-ms")
    return record


_CHECKS: dict[str, Callable[[Record], Record]] = {
    "InferenceEvent": _inference, "ShadowPrediction": _prediction, "Feedback": _feedback,
    "JoinedRecord": _joined,
}


def check(name: str, record: Record) -> Record:
    """``record`` (NaN features moved to ``null_features``) if it can be processed as a
    ``name``; raises :class:`InvalidRecord` with the reason otherwise. Schemas without
    rules (Alert, DeadLetter) pass unchanged.

    >>> check("Feedback", {"request_id": "r", "label": None, "value": None, "event_time": 1})
    Traceback (most recent call last):
    ...
    shadowpipe.schemas.validate.InvalidRecord: Feedback with neither label nor value
    """
    rule = _CHECKS.get(name)
    return record if rule is None else rule(record)
