"""The ClickHouse tables: versioned DDL, the column lists rows are inserted with, and
:func:`migrate`, which every process that opens ClickHouse runs first.

The monitor writes ``joined_records``, ``orphans``, ``windows``, ``alerts``,
``drift_stats`` and ``reference_profiles``; the verdict engine appends to ``verdicts``; the
read side (:mod:`shadowpipe.processors.read`) and ``shadowpipe compare`` read them. Every
table but ``verdicts`` is a ``ReplacingMergeTree`` whose sorting key is the identity of a
row (a (challenger, request) pair, a window, an alert id), so a replay after a crash
inserts the same rows again and ``FINAL`` (or a merge) keeps one.

Migrations are numbered; ``schema_migrations`` records the applied ones and
:func:`migrate` applies the missing ones in order, then aligns the TTL of joined records
and orphans with ``clickhouse_ttl_days`` (``shadowpipe clickhouse migrate`` or
``shadowpipe init``).

>>> [m[0] for m in MIGRATIONS]
[1, 2, 3, 4, 5, 6, 7]
>>> "windows" in MIGRATIONS[2][2][0]
True
"""

from __future__ import annotations

import re
import time
from typing import Any

from shadowpipe.config import ConfigError, Settings, env_name

_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_RUN_ID = re.compile(r"^[A-Za-z0-9_]{1,64}$")

JOINED_COLUMNS = """
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
        "CREATE TABLE IF NOT EXISTS {db}.joined_records (" + JOINED_COLUMNS + ") "
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
    """The validated database name (it is spliced into DDL, so it must be an identifier):
    ``clickhouse_database``, or its replay run's database when ``run`` is set (a replay's
    results never mix with the live ones, and every reader follows ``--run``).

    >>> database(Settings.load(env={"SHADOWPIPE_RUN": "june"}))
    'shadowpipe_replay_june'
    """
    name = settings.clickhouse_database
    if not _IDENTIFIER.match(name):
        raise ConfigError(env_name("clickhouse_database"), f"{name!r} is not an identifier")
    if settings.run:
        if not _RUN_ID.match(settings.run):
            raise ConfigError(env_name("run"), f"{settings.run!r} is not a run id "
                              "(letters, digits and _)")
        return f"{name}_replay_{settings.run}"
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


def ensure(settings: Settings, service: str) -> list[str]:
    """Connect (a :class:`ConfigError` naming the URL when ClickHouse is unusable), then
    :func:`migrate`; what was done (empty when up to date)."""
    from shadowpipe.stores import check_clickhouse

    return migrate(check_clickhouse(settings, service), settings)
