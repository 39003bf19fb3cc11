"""Source 1: the requests stored in the live ``joined_records``, one row per request.

Every challenger's row of a request carries the same request (features, primary output,
context); the labelled one is preferred. The requests after a cursor are read by one
streamed query in (event time, request id) order, as Arrow blocks (no Python value per
cell: only the challenger's inputs become Python objects, see
:func:`~shadowpipe.processors.replay.records.inputs`), and cut into pages; a restart
queries again after the cursor of the last page written. One query, not one per page:
each query of ``FINAL`` rescans the live table (20 pages of 50,000 requests scanned it 20
times, 0.8 s each at a million stored requests).

>>> "LIMIT 1 BY request_id" in stream_sql("shadowpipe")
True
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from shadowpipe.config import Settings
from shadowpipe.processors.replay.records import COPIED

_WINDOW = ("event_time >= fromUnixTimestamp64Milli({since:Int64}) "
           "AND event_time < fromUnixTimestamp64Milli({until:Int64})")
# Beyond this the sort of a long window spills to disk instead of holding every row.
SORT_MEMORY = 256 * 2**20


def stream_sql(db: str) -> str:
    """Every stored request after the cursor ``(at, after)``, the labelled row first."""
    from shadowpipe.processors.export import ARROW_SETTINGS, FINAL_SETTINGS

    return (f"SELECT {', '.join(COPIED)} FROM {db}.joined_records FINAL WHERE {_WINDOW} "
            "AND (toUnixTimestamp64Milli(event_time), request_id) > ({at:Int64}, {after:String}) "
            "ORDER BY event_time, request_id, isNull(label) LIMIT 1 BY request_id "
            f"SETTINGS {ARROW_SETTINGS}, {FINAL_SETTINGS}, "
            f"max_bytes_before_external_sort = {SORT_MEMORY}")


def count(client: Any, db: str, since_ms: int, until_ms: int) -> int:
    """Distinct stored requests in the window: what a complete replay scores."""
    sql = f"SELECT uniqExact(request_id) FROM {db}.joined_records FINAL WHERE {_WINDOW}"
    return int(client.command(sql, parameters={"since": since_ms, "until": until_ms}))


def pages(settings: Settings, db: str, since_ms: int, until_ms: int, cursor: tuple[int, str],
          size: int) -> Iterator[Any]:
    """``pyarrow.Table`` s of ``size`` stored requests (the last one shorter) after
    ``cursor``, with the columns :data:`~shadowpipe.processors.replay.records.COPIED`."""
    import pyarrow as pa

    from shadowpipe.processors.export import batches

    at, after = cursor
    params = {"since": since_ms, "until": until_ms, "at": at, "after": after}
    held: list[Any] = []
    rows = 0
    for batch in batches(settings, db, stream_sql(db), params):
        while batch.num_rows:
            take = batch.slice(0, size - rows)
            held.append(take)
            rows += take.num_rows
            batch = batch.slice(take.num_rows)
            if rows == size:
                yield pa.Table.from_batches(held)
                held, rows = [], 0
    if rows:
        yield pa.Table.from_batches(held)
