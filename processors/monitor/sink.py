"""ClickHouse: versioned DDL and the monitor's batched, idempotent, retrying inserts.

The monitor is the only writer. Every table is a ``ReplacingMergeTree`` whose sorting key
is the identity of a row (a (challenger, request) pair, a window, an alert id), so a replay
after a crash inserts the same rows again and ``FINAL`` (or a merge) keeps one.

Migrations are numbered; ``schema_migrations`` records the applied ones and
:func:`migrate` applies the missing ones in order, then aligns the TTL of joined records
and orphans with ``clickhouse_ttl_days`` (``shadowpipe clickhouse migrate`` or
``shadowpipe init``).

>>> [m[0] for m in MIGRATIONS]
[1, 2, 3, 4, 5, 6, 7]
>>> joined_columns([])["request_id"]
[]
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable
from operator import itemgetter
from typing import Any

from shadowpipe.config import ConfigError, Settings, env_name

log = logging.getLogger(__name__)
_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")

_JOINED_COLUMNS = """
    request_id String,
    challenger LowCardinality(String),
    challenger_version LowCardinality(String),
    is_control Bool,
    version Int64,
    state LowCardinality(String),
    event_time DateTime64(3),
    model LowCardinality(String),
    model_version LowCardinality(String),
    context Map(String, String),
    num_features Map(String, Float64),
    cat_features Map(String, String),
    null_features Array(String),
    primary_label Nullable(String),
    primary_probabilities Map(String, Float64),
    primary_value Nullable(Float64),
    primary_latency_ms Nullable(Float64),
    shadow_label Nullable(String),
    shadow_probabilities Map(String, Float64),
    shadow_value Nullable(Float64),
    shadow_error Nullable(String),
    shadow_error_kind LowCardinality(Nullable(String)),
    model_time_ms Nullable(Float64),
    queue_lag_ms Nullable(Float64),
    label Nullable(String),
    label_value Nullable(Float64),
    label_time Nullable(DateTime64(3)),
    label_delay_ms Nullable(Int64),
    feedback_source Nullable(String),
    feedback_weight Float64,
    inclusion_prob Float64,
    joined_at DateTime64(3),
    trace_id Nullable(String)
"""

_METRIC_COLUMNS = [
    "agreement", "kappa", "mean_abs_delta_probability", "mean_abs_delta_value",
    "error_rate", "timeout_rate",
    *[f"{arm}_{m}" for arm in ("primary", "challenger")
      for m in ("accuracy", "precision", "recall", "f1", "mae", "rmse")],
    *[f"{lat}_p{q}" for lat in ("primary_latency", "model_time", "queue_lag")
      for q in (50, 95, 99)],
]
_COUNT_COLUMNS = ["published", "scored", "joined", "labelled", "orphaned", "errors",
                  "timeouts", "late_dropped"]
WINDOW_COLUMNS = ["challenger", "segment", "window_start", "window_end", *_COUNT_COLUMNS,
                  *_METRIC_COLUMNS, "version"]
ALERT_COLUMNS = ["alert_id", "kind", "detector", "metric", "challenger", "arm", "segment",
                 "window_start", "window_end", "value", "threshold", "severity", "time",
                 "details", "status"]
DRIFT_COLUMNS = ["model", "challenger", "metric", "window_start", "window_end", "statistic",
                 "value", "threshold", "records", "compared", "reference", "reference_version",
                 "firing"]

MIGRATIONS: list[tuple[int, str, list[str]]] = [
    (1, "joined records", [
        "CREATE TABLE IF NOT EXISTS {db}.joined_records (" + _JOINED_COLUMNS + ") "
        "ENGINE = ReplacingMergeTree(version) PARTITION BY toYYYYMM(event_time) "
        "ORDER BY (challenger, request_id) TTL toDateTime(event_time) + INTERVAL {ttl} DAY",
    ]),
    (2, "orphans", [
        "CREATE TABLE IF NOT EXISTS {db}.orphans (request_id String, "
        "challenger LowCardinality(String), state LowCardinality(String), version Int64, "
        "event_time Nullable(DateTime64(3)), joined_at DateTime64(3), "
        "context Map(String, String), shadow_label Nullable(String), "
        "shadow_value Nullable(Float64), label Nullable(String), label_value Nullable(Float64), "
        "feedback_source Nullable(String)) "
        "ENGINE = ReplacingMergeTree(version) ORDER BY (state, challenger, request_id) "
        "TTL toDateTime(joined_at) + INTERVAL {ttl} DAY",
    ]),
    (3, "windows", [
        "CREATE TABLE IF NOT EXISTS {db}.windows (challenger LowCardinality(String), "
        "segment LowCardinality(String), window_start DateTime64(3), window_end DateTime64(3), "
        + ", ".join(f"{c} UInt64" for c in _COUNT_COLUMNS) + ", "
        + ", ".join(f"{c} Nullable(Float64)" for c in _METRIC_COLUMNS)
        + ", version UInt64) ENGINE = ReplacingMergeTree(version) "
        "ORDER BY (challenger, segment, window_start)",
    ]),
    (4, "alerts and drift events", [
        "CREATE TABLE IF NOT EXISTS {db}.alerts (alert_id String, kind LowCardinality(String), "
        "detector LowCardinality(String), metric LowCardinality(String), "
        "challenger LowCardinality(String), arm LowCardinality(Nullable(String)), "
        "segment Nullable(String), window_start Nullable(DateTime64(3)), "
        "window_end Nullable(DateTime64(3)), value Float64, threshold Nullable(Float64), "
        "severity LowCardinality(String), time DateTime64(3), details Map(String, String)) "
        "ENGINE = ReplacingMergeTree ORDER BY alert_id",
    ]),
    (5, "reference profiles and drift statistics", [
        "CREATE TABLE IF NOT EXISTS {db}.reference_profiles (model String, feature String, "
        "kind LowCardinality(String), edges Array(Float64), categories Array(String), "
        "counts Array(UInt64), total UInt64, source String, version UInt64) "
        "ENGINE = ReplacingMergeTree ORDER BY (model, version, feature)",
        "CREATE TABLE IF NOT EXISTS {db}.drift_stats (model String, "
        "challenger LowCardinality(String), metric String, window_start DateTime64(3), "
        "window_end DateTime64(3), statistic LowCardinality(String), value Nullable(Float64), "
        "threshold Float64, records UInt64, compared UInt64, reference LowCardinality(String), "
        "reference_version UInt64, firing Bool) "
        "ENGINE = ReplacingMergeTree ORDER BY (model, challenger, metric, window_start)",
    ]),
    (6, "alert status", [
        "ALTER TABLE {db}.alerts ADD COLUMN IF NOT EXISTS "
        "status LowCardinality(String) DEFAULT 'firing'",
    ]),
    (7, "verdicts", [
        # Append-only: one row per change of a challenger's verdict (or a user's reset);
        # the latest row per challenger is the latched state (processors/verdict/store.py).
        "CREATE TABLE IF NOT EXISTS {db}.verdicts (time DateTime64(3), "
        "challenger LowCardinality(String), verdict LowCardinality(String), "
        "previous Nullable(String), latched Bool, policy_hash String, reasons Array(String), "
        "warnings Array(String), flagged Array(String), suspects Array(String), "
        "criterion Array(String), decision Array(String), estimate Array(Nullable(Float64)), "
        "lo Array(Nullable(Float64)), hi Array(Nullable(Float64)), "
        "margin Array(Nullable(Float64)), pairs Array(UInt64), document String) "
        "ENGINE = MergeTree ORDER BY (challenger, time)",
    ]),
]
_TTL_TABLES = {"joined_records": "toDateTime(event_time)", "orphans": "toDateTime(joined_at)"}


def database(settings: Settings) -> str:
    """The validated database name (it is spliced into DDL, so it must be an identifier)."""
    name = settings.clickhouse_database
    if not _IDENTIFIER.match(name):
        raise ConfigError(env_name("clickhouse_database"), f"{name!r} is not an identifier")
    return name


def migrate(client: Any, settings: Settings) -> list[str]:
    """Create or migrate every monitor table; return what was done (empty = up to date)."""
    db = database(settings)
    client.command(f"CREATE DATABASE IF NOT EXISTS {db}")
    client.command(f"CREATE TABLE IF NOT EXISTS {db}.schema_migrations (version UInt32, "
                   "description String, applied_at DateTime64(3)) "
                   "ENGINE = ReplacingMergeTree ORDER BY version")
    applied = {row[0] for row in client.query(
        f"SELECT version FROM {db}.schema_migrations").result_rows}
    done = []
    for version, description, statements in MIGRATIONS:
        if version in applied:
            continue
        for sql in statements:
            client.command(sql.format(db=db, ttl=settings.clickhouse_ttl_days))
        client.insert("schema_migrations", [[version, description, int(time.time() * 1000)]],
                      column_names=["version", "description", "applied_at"], database=db)
        done.append(f"migration {version}: {description}")
    return done + _align_ttl(client, db, settings.clickhouse_ttl_days)


def _align_ttl(client: Any, db: str, days: int) -> list[str]:
    done = []
    for table, expr in _TTL_TABLES.items():
        engine = client.command(
            "SELECT engine_full FROM system.tables WHERE database = {db:String} "
            "AND name = {table:String}", parameters={"db": db, "table": table})
        if f"toIntervalDay({days})" not in str(engine):
            client.command(f"ALTER TABLE {db}.{table} MODIFY TTL {expr} + INTERVAL {days} DAY")
            done.append(f"{table}: TTL set to {days} days")
    return done


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
    names = [line.split()[0] for line in _JOINED_COLUMNS.strip().splitlines()]
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
        backoff = 0.2
        while True:
            try:
                client = self.connect()
                for table, cols in batches.items():
                    client.insert(table, list(cols.values()), column_names=list(cols),
                                  database=self.db, column_oriented=True)
                for sql, _rows in statements:
                    client.command(sql)
                rows = sum(len(next(iter(c.values()))) for c in batches.values())
                rows += sum(n for _sql, n in statements)
                self.rows_written += rows
                self.retrying = False
                return rows
            except Exception as exc:  # any failure: nothing is acked until this succeeds
                self.failures += 1
                self.retrying = True
                self.last_error = f"ClickHouse insert: {type(exc).__name__}: " + (
                    str(exc).splitlines()[0] if str(exc) else "")
                log.warning("ClickHouse insert failed (retry in %.1fs): %s", backoff,
                            str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
                self.client = None
                self.sleep(backoff)
                backoff = min(backoff * 2, self.max_backoff_s)

    def query(self, sql: str, parameters: dict[str, Any]) -> tuple[list[str], list[tuple]]:
        """Run a read query on the sink's client (the one allowed to open the engine)."""
        result = self.connect().query(sql, parameters=parameters)
        return list(result.column_names), result.result_rows
