"""ClickHouse: the monitor's batched, idempotent, retrying inserts into the tables of
:mod:`shadowpipe.tables` (their DDL and migrations live there).

The monitor is the only writer of its tables; each is a ``ReplacingMergeTree`` keyed on a
row's identity, so a replay after a crash inserts the same rows again and ``FINAL`` (or a
merge) keeps one.

>>> joined_columns([])["request_id"]
[]
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from operator import itemgetter
from typing import Any

from shadowpipe.config import Settings
from shadowpipe.processors.runtime.metrics import Buckets
from shadowpipe.processors.runtime.retry import retry
from shadowpipe.tables import JOINED_COLUMNS, database

log = logging.getLogger(__name__)
def _out(rec: dict[str, Any], name: str) -> dict[str, Any]:
    return rec.get(name) or {}


def joined_columns(records: list[dict[str, Any]]) -> dict[str, list[Any]]:
    """Column-oriented ``joined_records`` rows of predicted/labelled records."""
    cols: dict[str, list[Any]] = {}
    plain = ["request_id", "challenger", "challenger_version", "is_control", "version", "state",
             "model", "model_version", "context", "num_features", "cat_features",
             "null_features", "primary_latency_ms", "shadow_error", "shadow_error_kind",
             "model_time_ms", "queue_lag_ms", "label", "label_value", "label_time",
             "label_delay_ms", "feedback_source", "feedback_weight", "inclusion_prob",
             "joined_at", "trace_id"]
    if records:  # decoded records hold every schema field: transpose in C
        rows = map(itemgetter(*plain), records)
        for name, values in zip(plain, zip(*rows, strict=True), strict=True):
            cols[name] = list(values)
    else:
        cols.update((name, []) for name in plain)
    cols["event_time"] = [r.get("event_time") or r["joined_at"] for r in records]
    for arm, field in (("primary", "primary_output"), ("shadow", "shadow_output")):
        outs = [_out(r, field) for r in records]
        cols[f"{arm}_label"] = [o.get("label") for o in outs]
        cols[f"{arm}_probabilities"] = [o.get("probabilities") or {} for o in outs]
        cols[f"{arm}_value"] = [o.get("value") for o in outs]
    return cols


def _millis(expr: str) -> str:
    return f"fromUnixTimestamp64Milli({expr})"


# joined_records columns as expressions over an Avro JoinedRecord source: what
# :func:`joined_columns` computes in Python, computed by the engine that parsed the Avro.
_FROM_AVRO = {
    "state": "toString(state)",
    "event_time": _millis("if(ifNull(event_time, 0) = 0, joined_at, assumeNotNull(event_time))"),
    "label_time": _millis("label_time"),
    "joined_at": _millis("joined_at"),
    **{f"{arm}_{part}": f"{field}.{part}"
       for arm, field in (("primary", "primary_output"), ("shadow", "shadow_output"))
       for part in ("label", "probabilities", "value")},
}


def joined_from_avro_sql(db: str, source: str) -> str:
    """INSERT of the valid predicted/labelled records of an Avro ``source`` (a table
    expression such as ``file('/path', Avro)``) into ``joined_records``, without Python.

    >>> sql = joined_from_avro_sql("db", "file('/b.avro', Avro)")
    >>> sql.startswith("INSERT INTO db.joined_records (request_id, challenger")
    True
    """
    names = [line.split()[0] for line in JOINED_COLUMNS.strip().splitlines()]
    exprs = ", ".join(_FROM_AVRO.get(name, name) for name in names)
    # The pipeline dead-letters records without a request id or challenger; orphans go to
    # their own table.
    return (f"INSERT INTO {db}.joined_records ({', '.join(names)}) SELECT {exprs} "
            f"FROM {source} WHERE request_id != '' AND challenger != '' "
            "AND state IN ('predicted', 'labelled')")


def orphan_columns(records: list[dict[str, Any]]) -> dict[str, list[Any]]:
    """Column-oriented ``orphans`` rows."""
    cols = {name: [r.get(name) for r in records] for name in (
        "request_id", "challenger", "state", "version", "event_time", "joined_at", "context",
        "label", "label_value", "feedback_source")}
    outs = [_out(r, "shadow_output") for r in records]
    cols["shadow_label"] = [o.get("label") for o in outs]
    cols["shadow_value"] = [o.get("value") for o in outs]
    return cols


def rows_to_columns(rows: list[dict[str, Any]], names: list[str]) -> dict[str, list[Any]]:
    return {name: [row.get(name) for row in rows] for name in names}


class Sink:
    """Batched inserts that retry with backoff until ClickHouse takes them.

    ``client_factory`` builds a clickhouse-connect client (default: from settings); after a
    failure the client is rebuilt, so a restarted server is picked up.
    """

    def __init__(self, settings: Settings, client_factory: Callable[[], Any] | None = None,
                 max_backoff_s: float = 10.0, sleep: Callable[[float], None] = time.sleep) -> None:
        from shadowpipe.stores import clickhouse_client

        self.settings = settings
        self.db = database(settings)
        self.factory = client_factory or (lambda: clickhouse_client(settings))
        self.max_backoff_s = max_backoff_s
        self.sleep = sleep
        self.client: Any = None
        self.rows_written = 0
        self.failures = 0
        self.retrying = False  # readiness: a write is waiting for ClickHouse
        self.last_error: str | None = None
        self.insert_seconds = Buckets()  # successful attempts only, for /metrics

    def connect(self) -> Any:
        if self.client is None:
            self.client = self.factory()
        return self.client

    def write(self, tables: dict[str, dict[str, list[Any]]],
              statements: tuple[tuple[str, int], ...] = ()) -> int:
        """Insert every non-empty table batch and run each (INSERT ... SELECT, rows)
        statement; retry the whole batch until it succeeds.

        A partial success is harmless: rows are idempotent (ReplacingMergeTree keys).
        """
        batches = {t: cols for t, cols in tables.items() if cols and next(iter(cols.values()))}

        def insert() -> int:
            started = time.perf_counter()
            client = self.connect()
            for table, cols in batches.items():
                client.insert(table, list(cols.values()), column_names=list(cols),
                              database=self.db, column_oriented=True)
            for sql, _rows in statements:
                client.command(sql)
            rows = sum(len(next(iter(c.values()))) for c in batches.values())
            self.insert_seconds.observe(time.perf_counter() - started)
            return rows + sum(n for _sql, n in statements)

        def failed(exc: BaseException) -> None:
            self.failures += 1
            self.retrying = True
            self.last_error = f"ClickHouse insert: {type(exc).__name__}: " + (
                str(exc).splitlines()[0] if str(exc) else "")
            self.client = None

        # Any failure: nothing is acked until this succeeds.
        rows = retry(insert, "ClickHouse insert", errors=(Exception,), pause=self.sleep,
                     on_error=failed, logger=log, most_s=self.max_backoff_s)
        self.rows_written += rows
        self.retrying = False
        return rows

    def query(self, sql: str, parameters: dict[str, Any]) -> tuple[list[str], list[tuple]]:
        """Run a read query on the sink's client (the one allowed to open the engine)."""
        result = self.connect().query(sql, parameters=parameters)
        return list(result.column_names), result.result_rows
