"""Replayed ``joined_records`` rows: the stored requests (features, primary output, label,
context, copied column by column) with the replayed challenger's outcome as the shadow part.

The shadow part comes from the shadow worker's own :class:`Result` (the Output dict the
worker encodes, its error and kind) and its ``model_time_ms`` rule (the record's share of
the batch call); ``queue_lag_ms`` stays empty: a replay has no queue. Rows are built as
columns (what the sink inserts), not as one dict per record: at a million requests the
per-record dicts cost more than the model.

>>> from shadowpipe.processors.shadow.runner import Result
>>> page = {"request_id": ["r1", "r2"], "label": ["a", None]}
>>> results = [Result({"label": "b", "probabilities": {"a": 0.4, "b": 0.6}, "value": None})]
>>> cols = columns(page, [1], results, Who("lr", "1", False), 0.5)
>>> cols["request_id"], cols["shadow_label"], cols["label"], cols["challenger"]
(['r2'], ['b'], [None], ['lr'])
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

from shadowpipe.processors.shadow.runner import Result
from shadowpipe.tables import JOINED_COLUMNS

NAMES = [line.split()[0] for line in JOINED_COLUMNS.strip().splitlines()]
# Replaced by the replay; every other column is the stored request's.
SHADOW = {"challenger", "challenger_version", "is_control", "shadow_label",
          "shadow_probabilities", "shadow_value", "shadow_error", "shadow_error_kind",
          "model_time_ms", "queue_lag_ms"}
COPIED = [name for name in NAMES if name not in SHADOW]
INPUT = ("request_id", "event_time", "num_features", "cat_features", "null_features")


class Who(NamedTuple):
    """The replayed challenger's identity as written into its rows."""

    name: str
    version: str
    is_control: bool


def inputs(page: dict[str, list[Any]]) -> list[dict[str, Any]]:
    """The challenger's input records (the InferenceEvent fields scoring reads).

    >>> inputs({"request_id": ["r"], "event_time": [1], "num_features": [{"x": 1.0}],
    ...         "cat_features": [{}], "null_features": [[]]})[0]["num_features"]
    {'x': 1.0}
    """
    return [dict(zip(INPUT, values, strict=True))
            for values in zip(*(page[name] for name in INPUT), strict=True)]


def columns(page: dict[str, list[Any]], picked: Sequence[int], results: Sequence[Result],
            who: Who, model_time_ms: float) -> dict[str, list[Any]]:
    """``joined_records`` columns of the ``picked`` rows of ``page`` scored by ``who``."""
    every = len(picked) == len(page["request_id"])
    cols = {name: (list(page[name]) if every else [page[name][i] for i in picked])
            for name in COPIED if name in page}
    n = len(picked)
    outs = [r.output or {} for r in results]
    cols.update(
        challenger=[who.name] * n, challenger_version=[who.version] * n,
        is_control=[who.is_control] * n,
        shadow_label=[o.get("label") for o in outs],
        shadow_probabilities=[o.get("probabilities") or {} for o in outs],
        shadow_value=[o.get("value") for o in outs],
        shadow_error=[r.error for r in results],
        shadow_error_kind=[r.error_kind for r in results],
        model_time_ms=[model_time_ms] * n, queue_lag_ms=[None] * n)
    return cols


def concat(parts: Sequence[dict[str, list[Any]]]) -> dict[str, list[Any]]:
    """One column dict of several with the same columns.

    >>> concat([{"a": [1]}, {"a": [2, 3]}])
    {'a': [1, 2, 3]}
    """
    out: dict[str, list[Any]] = {name: [] for name in parts[0]} if parts else {}
    for part in parts:
        for name, values in part.items():
            out[name].extend(values)
    return out
