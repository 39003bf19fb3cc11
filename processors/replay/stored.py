"""Source 1: the requests stored in the live ``joined_records``, one row per request.

Every challenger's row of a request carries the same request (features, primary output,
context); the labelled one is preferred. Pages are read in (event time, request id) order
after a cursor (keyset paging: each page is its own query, so nothing stays open while the
replay writes, and a restart continues after the last page written).

>>> "LIMIT 1 BY request_id" in page_sql("shadowpipe", 100)
True
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

# Times as epoch ms, as decoded JoinedRecords hold them (aliased apart from the columns,
# which the WHERE and ORDER BY clauses mean).
_TIMES = {"event_ms": "event_time", "label_ms": "label_time", "joined_ms": "joined_at"}
_SELECT = ("request_id, toUnixTimestamp64Milli(event_time) AS event_ms, version, "
           "toString(state) AS state, toString(model) AS model, "
           "toString(model_version) AS model_version, context, num_features, cat_features, "
           "null_features, primary_label, primary_probabilities, primary_value, "
           "primary_latency_ms, label, label_value, "
           "toUnixTimestamp64Milli(label_time) AS label_ms, label_delay_ms, feedback_source, "
           "feedback_weight, inclusion_prob, toUnixTimestamp64Milli(joined_at) AS joined_ms, "
           "trace_id")
_WINDOW = ("event_time >= fromUnixTimestamp64Milli({since:Int64}) "
           "AND event_time < fromUnixTimestamp64Milli({until:Int64})")


def page_sql(db: str, limit: int) -> str:
    """The next page of stored requests after the cursor ``(at, after)``."""
    return (f"SELECT {_SELECT} FROM {db}.joined_records FINAL WHERE {_WINDOW} "
            "AND (toUnixTimestamp64Milli(event_time), request_id) > ({at:Int64}, {after:String}) "
            "ORDER BY event_time, request_id, isNull(label) LIMIT 1 BY request_id "
            f"LIMIT {int(limit)}")


def count(client: Any, db: str, since_ms: int, until_ms: int) -> int:
    """Distinct stored requests in the window: what a complete replay scores."""
    sql = f"SELECT uniqExact(request_id) FROM {db}.joined_records FINAL WHERE {_WINDOW}"
    return int(client.command(sql, parameters={"since": since_ms, "until": until_ms}))


def pages(client: Any, db: str, since_ms: int, until_ms: int, cursor: tuple[int, str],
          size: int) -> Iterator[dict[str, list[Any]]]:
    """Pages of up to ``size`` stored requests after ``cursor``, as columns by name."""
    sql = page_sql(db, size)
    at, after = cursor
    while True:
        result = client.query(sql, parameters={"since": since_ms, "until": until_ms,
                                               "at": at, "after": after})
        names = [_TIMES.get(name, name) for name in result.column_names]
        page = dict(zip(names, result.result_columns, strict=True))
        if not page or not page["request_id"]:
            return
        yield page
        at, after = page["event_time"][-1], page["request_id"][-1]
