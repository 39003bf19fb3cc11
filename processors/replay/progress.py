"""The replay's progress mark, kept in the replay run's database next to its results.

One row per challenger (``ReplacingMergeTree(step)``: the highest step is the mark): the
fixed bounds of the replayed traffic, the cursor after the last page fully written, and the
counts. A page's records are written before its mark, so a kill between the two only
re-scores that page, and the ``(challenger, request_id)`` key of ``joined_records``
keeps one row per request after ``FINAL``.

>>> Mark("lr", "clickhouse", 0, 10).cursor
(0, '')
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

TABLE = "replay_progress"
DDL = ("CREATE TABLE IF NOT EXISTS {db}.replay_progress (challenger String, source String, "
       "since_ms Int64, until_ms Int64, cursor_time Int64, cursor_id String, "
       "offsets Map(UInt32, Int64), total UInt64, seen UInt64, scored UInt64, done Bool, "
       "step UInt64, updated DateTime64(3)) ENGINE = ReplacingMergeTree(step) ORDER BY challenger")
COLUMNS = ["challenger", "source", "since_ms", "until_ms", "cursor_time", "cursor_id",
           "offsets", "total", "seen", "scored", "done", "step", "updated"]


@dataclass
class Mark:
    """Where a replay of one challenger stands."""

    challenger: str
    source: str  # "clickhouse" | "topic"
    since_ms: int
    until_ms: int
    cursor_time: int = 0
    cursor_id: str = ""
    offsets: dict[int, int] = field(default_factory=dict)  # topic: next offset per partition
    total: int = 0  # distinct requests in the source
    seen: int = 0  # of those, replayed (scored or outside the sample)
    scored: int = 0
    done: bool = False
    step: int = 0

    @property
    def cursor(self) -> tuple[int, str]:
        """(event time ms, request id) of the last stored request replayed."""
        return self.cursor_time, self.cursor_id


def ensure(client: Any, db: str) -> None:
    """Create the progress table in the replay database."""
    client.command(DDL.format(db=db))


def load(client: Any, db: str, challenger: str) -> Mark | None:
    """The latest mark of ``challenger``'s replay in ``db``, or None if it never started."""
    rows = client.query(f"SELECT {', '.join(COLUMNS[:-1])} FROM {db}.{TABLE} FINAL "
                        "WHERE challenger = {c:String}", parameters={"c": challenger}).result_rows
    if not rows:
        return None
    values = dict(zip(COLUMNS, rows[0], strict=False))
    values["offsets"] = {int(k): int(v) for k, v in values["offsets"].items()}
    return Mark(**values)


def save(client: Any, db: str, mark: Mark) -> None:
    """Record ``mark`` as the new latest (its step goes up by one)."""
    mark.step += 1
    row = [getattr(mark, name) for name in COLUMNS[:-1]] + [int(time.time() * 1000)]
    client.insert(TABLE, [row], column_names=COLUMNS, database=db)
