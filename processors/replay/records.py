"""Replayed ``joined_records`` rows as Arrow tables: the stored requests (features, primary
output, label, context) copied column by column, never converted to Python, with the
replayed challenger's outcome as the shadow part.

The shadow part comes from the shadow worker's own :class:`Result` (the Output dict the
worker encodes, its error and kind) and its ``model_time_ms`` rule (the record's share of
the batch call); ``queue_lag_ms`` stays empty: a replay has no queue. Only what the
challenger reads (:data:`INPUT`) becomes Python objects: at a million requests, Python
values for every stored cell cost more than the model.

>>> import pyarrow as pa
>>> from shadowpipe.processors.shadow.runner import Result
>>> page = table({"request_id": ["r1", "r2"], "label": ["a", None]})
>>> results = [Result({"label": "b", "probabilities": {"a": 0.4, "b": 0.6}, "value": None})]
>>> out = rows(page, [1], results, [0.5], Who("lr", "1", False)).to_pydict()
>>> out["request_id"], out["shadow_label"], out["label"], out["challenger"]
(['r2'], ['b'], [None], ['lr'])
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

from shadowpipe.processors.shadow.runner import Result
from shadowpipe.tables import JOINED_COLUMNS

TYPES = dict(line.strip().rstrip(",").split(maxsplit=1)
             for line in JOINED_COLUMNS.strip().splitlines())
NAMES = list(TYPES)
# Replaced by the replay; every other column is the stored request's.
SHADOW = {"challenger", "challenger_version", "is_control", "shadow_label",
          "shadow_probabilities", "shadow_value", "shadow_error", "shadow_error_kind",
          "model_time_ms", "queue_lag_ms"}
COPIED = [name for name in NAMES if name not in SHADOW]
INPUT = ("request_id", "event_time", "num_features", "cat_features", "null_features")
# What a Result without output stores (the worker's rule: no label, no probabilities).
_NO_OUTPUT = {"label": None, "probabilities": {}, "value": None}


class Who(NamedTuple):
    """The replayed challenger's identity as written into its rows."""

    name: str
    version: str
    is_control: bool


def arrow_type(ch_type: str) -> Any:
    """The Arrow type a ClickHouse column type of ``joined_records`` is written from.

    >>> str(arrow_type("LowCardinality(Nullable(String))")), str(arrow_type("DateTime64(3)"))
    ('string', 'timestamp[ms, tz=UTC]')
    """
    import pyarrow as pa

    for wrapper in ("LowCardinality(", "Nullable("):
        if ch_type.startswith(wrapper):
            return arrow_type(ch_type[len(wrapper):-1])
    if ch_type.startswith("Map(String, "):
        return pa.map_(pa.string(), arrow_type(ch_type[len("Map(String, "):-1]))
    if ch_type.startswith("Array("):
        return pa.list_(arrow_type(ch_type[len("Array("):-1]))
    return {"String": pa.string(), "Bool": pa.bool_(), "Int64": pa.int64(),
            "Float64": pa.float64(), "DateTime64(3)": pa.timestamp("ms", tz="UTC")}[ch_type]


def table(cols: dict[str, list[Any]]) -> Any:
    """An Arrow table of ``joined_records`` columns given as Python lists (times as epoch
    ms, maps as dicts), typed as the table's columns."""
    import pyarrow as pa

    return pa.table({name: pa.array(values, arrow_type(TYPES[name]))
                     for name, values in cols.items()})


def _maps(column: Any) -> list[dict[str, Any]]:
    """A map column as one dict per row, in the stored key order.

    Stored features usually repeat the same keys in the same order in every row: then the
    values are cut into rows by NumPy and the keys are shared (the general path slices
    Python lists per row).
    """
    import numpy as np
    import pyarrow as pa

    maps = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    n, offsets = len(maps), maps.offsets.to_numpy()
    width = int(offsets[1] - offsets[0]) if n else 0
    keys, items = maps.keys, maps.items
    if width == 0 and offsets[-1] == offsets[0]:
        return [{} for _ in range(n)]
    first = keys.slice(0, width)
    if (np.diff(offsets) == width).all() and keys.equals(
            first.take(np.tile(np.arange(width), n))):
        names = tuple(first.to_pylist())
        values = items.to_numpy(zero_copy_only=False).reshape(n, width).tolist()
        return [dict(zip(names, row, strict=True)) for row in values]
    names, values, bounds = keys.to_pylist(), items.to_pylist(), offsets.tolist()
    return [dict(zip(names[a:b], values[a:b], strict=True))
            for a, b in zip(bounds, bounds[1:], strict=False)]


def inputs(page: Any) -> list[dict[str, Any]]:
    """The challenger's input records (the InferenceEvent fields scoring reads) of a page.

    >>> inputs(table({"request_id": ["r"], "event_time": [1], "num_features": [{"x": 1.0}],
    ...               "cat_features": [{}], "null_features": [[]]}))[0]["num_features"]
    {'x': 1.0}
    """
    import pyarrow as pa

    ids = page.column("request_id").to_pylist()
    times = page.column("event_time").cast(pa.int64()).to_pylist()
    nums, cats = _maps(page.column("num_features")), _maps(page.column("cat_features"))
    nulls = page.column("null_features").to_pylist()
    return [{"request_id": r, "event_time": t, "num_features": x, "cat_features": c,
             "null_features": z}
            for r, t, x, c, z in zip(ids, times, nums, cats, nulls, strict=True)]


def rows(page: Any, picked: Sequence[int], results: Sequence[Result], model_time_ms:
         Sequence[float], who: Who) -> Any:
    """``joined_records`` rows (an Arrow table) of the ``picked`` requests of ``page``
    scored by ``who``: one Result and one model time per picked request."""
    import pyarrow as pa

    n = len(picked)
    copied = page.select([name for name in COPIED if name in page.column_names])
    if n != page.num_rows:
        copied = copied.take(pa.array(picked, pa.int64()))
    out = pa.array([r.output or _NO_OUTPUT for r in results],
                   pa.struct([("label", pa.string()),
                              ("probabilities", arrow_type(TYPES["shadow_probabilities"])),
                              ("value", pa.float64())]))
    shadow = {
        "challenger": pa.repeat(pa.scalar(who.name), n),
        "challenger_version": pa.repeat(pa.scalar(who.version), n),
        "is_control": pa.repeat(pa.scalar(who.is_control), n),
        "shadow_label": out.field("label"), "shadow_probabilities": out.field("probabilities"),
        "shadow_value": out.field("value"),
        "shadow_error": pa.array([r.error for r in results], pa.string()),
        "shadow_error_kind": pa.array([r.error_kind for r in results], pa.string()),
        "model_time_ms": pa.array(model_time_ms, pa.float64()),
        "queue_lag_ms": pa.nulls(n, pa.float64()),
    }
    for name, values in shadow.items():
        copied = copied.append_column(name, values)
    return copied
