"""A replayed JoinedRecord: the stored request (features, primary output, label, context)
with the replayed challenger's outcome in place of the shadow part.

The shadow part comes from the shadow worker's own :class:`Result` (the Output dict the
worker encodes, its error and kind) and its ``model_time_ms`` rule (the record's share of
the batch call). ``queue_lag_ms`` is left empty: a replay has no queue.

>>> from shadowpipe.processors.shadow.runner import Result
>>> stored = {"request_id": "r1", "event_time": 1000, "version": 2, "state": "labelled",
...           "primary_label": "a", "primary_probabilities": {}, "primary_value": None,
...           "label": "a"}
>>> rec = joined(stored, Who("lr", "1", False), Result({"label": "b", "probabilities": {},
...              "value": None}), 0.5)
>>> rec["challenger"], rec["shadow_output"]["label"], rec["primary_output"]["label"], rec["label"]
('lr', 'b', 'a', 'a')
"""

from __future__ import annotations

from typing import Any, NamedTuple

from shadowpipe.processors.shadow.runner import Result

# Stored joined_records columns copied as they are (the rest: outputs, the challenger).
COPIED = ("request_id", "event_time", "version", "state", "model", "model_version", "context",
          "num_features", "cat_features", "null_features", "primary_latency_ms", "label",
          "label_value", "label_time", "label_delay_ms", "feedback_source", "feedback_weight",
          "inclusion_prob", "joined_at", "trace_id")
DEFAULTS: dict[str, Any] = {"model": "", "model_version": "", "context": {}, "num_features": {},
                            "cat_features": {}, "null_features": [], "feedback_weight": 1.0,
                            "inclusion_prob": 1.0, "version": 1, "state": "predicted"}


class Who(NamedTuple):
    """The replayed challenger's identity as written into its records."""

    name: str
    version: str
    is_control: bool


def joined(stored: dict[str, Any], who: Who, result: Result, model_time_ms: float
           ) -> dict[str, Any]:
    """The JoinedRecord (as :func:`~shadowpipe.processors.monitor.sink.joined_columns`
    takes it) of ``stored`` scored by ``who`` with ``result``."""
    rec = {name: stored.get(name, DEFAULTS.get(name)) for name in COPIED}
    rec["joined_at"] = rec["joined_at"] or rec["event_time"]
    rec["primary_output"] = {"label": stored.get("primary_label"),
                             "probabilities": stored.get("primary_probabilities") or {},
                             "value": stored.get("primary_value")}
    rec.update(challenger=who.name, challenger_version=who.version, is_control=who.is_control,
               shadow_output=result.output, shadow_error=result.error,
               shadow_error_kind=result.error_kind, model_time_ms=model_time_ms,
               queue_lag_ms=None)
    return rec
