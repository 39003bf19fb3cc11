"""Joined records out of ClickHouse into a file, for training and review data
(``shadowpipe export``; docs/export.md).

One query, streamed: on a ClickHouse server through clickhouse-connect's Arrow stream, on
the embedded engine through chdb's own streaming query (clickhouse-connect's chdb backend
would materialise an Arrow result whole). Each block is written as it arrives, so memory
stays flat however many rows there are. The file is written next to the target under a
temporary name and renamed at the end: an interrupted export leaves no partial file
under the final name.

Columns, with their Arrow (and Parquet) types, are :data:`COLUMNS`; JSON Lines and CSV
carry the same values (times as ISO 8601 UTC, maps and lists as JSON objects/arrays in
CSV cells).

>>> [name for name, _ in COLUMNS][:3]
['request_id', 'challenger', 'challenger_version']
>>> dict(COLUMNS)["num_features"]
'map<string, double>'
>>> "FINAL" in query("shadowpipe", Selection("disagreements"))[0]
True
"""

from __future__ import annotations

import csv
import datetime as dt
import json
import os
import queue
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import IO, Any
from urllib.parse import unquote, urlparse

from shadowpipe.config import ConfigError, Settings
from shadowpipe.processors.selection import Selection

FORMATS = ("parquet", "jsonl", "csv")
# (column, its Arrow type as pyarrow prints it); the SQL below produces exactly these.
COLUMNS: list[tuple[str, str]] = [
    ("request_id", "string"), ("challenger", "string"), ("challenger_version", "string"),
    ("event_time", "timestamp[ms, tz=UTC]"), ("model", "string"), ("model_version", "string"),
    ("context", "map<string, string>"), ("num_features", "map<string, double>"),
    ("cat_features", "map<string, string>"), ("null_features", "list<string>"),
    ("primary_label", "string"), ("primary_probabilities", "map<string, double>"),
    ("primary_value", "double"), ("shadow_label", "string"),
    ("shadow_probabilities", "map<string, double>"), ("shadow_value", "double"),
    ("shadow_error", "string"), ("label", "string"), ("label_value", "double"),
    ("label_delay_ms", "int64"), ("feedback_source", "string"), ("kind", "string"),
    ("score", "double"),
]
# LowCardinality columns as plain strings; times in UTC whatever the server's zone.
_EXPRESSIONS = {
    "challenger": "toString(challenger) AS challenger",
    "challenger_version": "toString(challenger_version) AS challenger_version",
    "model": "toString(model) AS model",
    "model_version": "toString(model_version) AS model_version",
    "event_time": "toTimeZone(event_time, 'UTC') AS event_time",
}
# The stored columns (what a plain read of the table returns, bench export's baseline),
# then why each record was selected.
STORED = ", ".join(_EXPRESSIONS.get(name, name) for name, _ in COLUMNS[:-2])
SELECT = f"{STORED}, kind, score"
# Arrow strings, not binary; one block at a time, as few threads as keep up with a writer;
# blocks not LZ4-compressed (ClickHouse's default): compressing for a reader in the same
# process, or one behind HTTP compression, costs buffers on both sides for nothing.
ARROW_SETTINGS = "max_threads = 1, output_format_arrow_string_as_string = 1, " \
                 "output_format_arrow_low_cardinality_as_dictionary = 0, " \
                 "output_format_arrow_compression_method = 'none'"
# Every version of a (challenger, request) has the request's event time, so they share a
# partition (toYYYYMM(event_time)): FINAL need not merge across partitions.
FINAL_SETTINGS = "do_not_merge_across_partitions_select_final = 1"
PROGRESS_EVERY_S = 5.0


def missing_pyarrow(command: str) -> ConfigError:
    """The one line for a missing pyarrow: it comes with the ``export`` extra."""
    return ConfigError(command, "needs pyarrow, which the export extra installs: "
                                "pip install 'shadowpipe[export]'")


def query(db: str, selection: Selection) -> tuple[str, dict[str, Any]]:
    """The export's SQL and parameters for ``selection`` in database ``db``."""
    sql, params = selection.sql(db, SELECT)
    return f"{sql} SETTINGS {ARROW_SETTINGS}, {FINAL_SETTINGS}", params


def batches(settings: Settings, db: str, sql: str, params: dict[str, Any]) -> Iterator[Any]:
    """``pyarrow.RecordBatch`` es of ``sql`` (over database ``db``) as ClickHouse produces
    its blocks."""
    url = urlparse(settings.clickhouse)
    if url.scheme == "chdb":
        yield from _chdb_batches(os.path.realpath(Path(unquote(url.path)).expanduser()),
                                 db, sql, params)
        return
    from shadowpipe.stores import check_clickhouse

    client = check_clickhouse(settings, "export")
    require_table(lambda q: int(client.command(q)), db)
    with client.query_arrow_stream(sql, parameters=params) as stream:
        for table in stream:
            yield from table.to_batches()


def _chdb_batches(path: str, db: str, sql: str, params: dict[str, Any]) -> Iterator[Any]:
    import chdb
    import pyarrow as pa

    try:
        conn = chdb.connect(path)
    except RuntimeError as exc:  # another process owns the directory (a running monitor)
        raise ConfigError("SHADOWPIPE_CLICKHOUSE_URL", f"ClickHouse at chdb://{path} "
                          f"unusable: {str(exc).splitlines()[0]}", "export") from None
    try:
        require_table(lambda q: int(conn.query(q, "CSV").bytes() or 0), db)
    except ConfigError:
        conn.close()
        raise
    stream = conn.send_query(sql, "Arrow", params=params)
    try:
        for chunk in stream:  # one ClickHouse block: a complete Arrow file
            reader = pa.ipc.open_file(chunk.bytes(), memory_pool=_pool())
            for i in range(reader.num_record_batches):
                yield reader.get_batch(i)
    finally:
        stream.close()
        conn.close()


def require_table(count: Callable[[str], int], db: str) -> None:
    """A :class:`ConfigError` naming the database setting when it has no joined records
    table (``count`` runs a ``SELECT count()``)."""
    if not count("SELECT count() FROM system.tables WHERE database = "
                 f"'{db}' AND name = 'joined_records'"):
        raise ConfigError("SHADOWPIPE_CLICKHOUSE_DATABASE", f"no table {db}.joined_records "
                          "(nothing joined yet here; shadowpipe init creates it)", "export")


def type_name(arrow_type: Any) -> str:
    """How :data:`COLUMNS` names an Arrow type (field names and nullability left out).

    >>> import pyarrow as pa
    >>> type_name(pa.map_(pa.string(), pa.float64())), type_name(pa.list_(pa.string()))
    ('map<string, double>', 'list<string>')
    """
    import pyarrow as pa

    if pa.types.is_map(arrow_type):
        return f"map<{type_name(arrow_type.key_type)}, {type_name(arrow_type.item_type)}>"
    if pa.types.is_list(arrow_type):
        return f"list<{type_name(arrow_type.value_type)}>"
    return str(arrow_type)


def schema() -> Any:
    """The Arrow schema of :data:`COLUMNS` (what an export with no rows is written with)."""
    import pyarrow as pa

    types = {"string": pa.string(), "double": pa.float64(), "int64": pa.int64(),
             "timestamp[ms, tz=UTC]": pa.timestamp("ms", tz="UTC"),
             "map<string, string>": pa.map_(pa.string(), pa.string()),
             "map<string, double>": pa.map_(pa.string(), pa.float64()),
             "list<string>": pa.list_(pa.string())}
    return pa.schema([(name, types[kind]) for name, kind in COLUMNS])


# Dictionary-encoded Parquet columns: the repetitive ones. Dictionaries on unique ids and
# float values cost a third of the export's time for a larger file (measured on bench data).
_MAP_COLUMNS = ("context", "num_features", "cat_features", "primary_probabilities",
                "shadow_probabilities")
DICTIONARY = ["challenger", "challenger_version", "model", "model_version", "primary_label",
              "shadow_label", "label", "feedback_source", "kind", "null_features.list.element",
              "context.key_value.value", "cat_features.key_value.value",
              *[f"{c}.key_value.key" for c in _MAP_COLUMNS]]


def _pool() -> Any:
    """The system allocator: it gives freed blocks back, where pyarrow's default one keeps
    them (~60 MB more resident at 5M records)."""
    import pyarrow as pa

    return pa.system_memory_pool()


class _Parquet:
    def __init__(self, out: IO[bytes]) -> None:
        self.out, self.writer = out, None

    def _open(self, arrow_schema: Any) -> None:
        import pyarrow.parquet as pq

        self.writer = pq.ParquetWriter(self.out, arrow_schema, compression="snappy",
                                       use_dictionary=DICTIONARY, write_statistics=False,
                                       memory_pool=_pool())

    def write(self, batch: Any) -> None:
        if self.writer is None:
            self._open(batch.schema)
        self.writer.write_batch(batch)

    def close(self) -> None:
        if self.writer is None:  # no rows: still a readable file with the columns
            self._open(schema())
        self.writer.close()


def _plain(value: Any) -> Any:
    """An Arrow value as JSON: maps as objects, times as ISO 8601."""
    if isinstance(value, dt.datetime):
        return value.isoformat(timespec="milliseconds").replace("+00:00", "Z")
    if isinstance(value, list) and value and isinstance(value[0], tuple):
        return dict(value)
    return value


class _Jsonl:
    def __init__(self, out: IO[bytes]) -> None:
        self.out = out

    def write(self, batch: Any) -> None:
        lines = [json.dumps({k: _plain(v) for k, v in row.items()}, ensure_ascii=False)
                 for row in batch.to_pylist()]
        self.out.write(("\n".join(lines) + "\n").encode())

    def close(self) -> None:
        pass


class _Csv:
    def __init__(self, out: IO[bytes]) -> None:
        import io

        self.text = io.TextIOWrapper(out, encoding="utf-8", newline="", write_through=True)
        self.writer = csv.writer(self.text)
        self.writer.writerow([name for name, _ in COLUMNS])

    def write(self, batch: Any) -> None:
        for row in batch.to_pylist():
            self.writer.writerow([_cell(_plain(row[name])) for name, _ in COLUMNS])

    def close(self) -> None:
        self.text.flush()
        self.text.detach()  # the caller closes the file


def _cell(value: Any) -> Any:
    return json.dumps(value, ensure_ascii=False) if isinstance(value, dict | list) else value


SINKS: dict[str, Callable[[IO[bytes]], Any]] = {"parquet": _Parquet, "jsonl": _Jsonl,
                                                "csv": _Csv}


def temp_path(out: Path) -> Path:
    """Where the export is written before it is renamed to ``out`` (same directory, so the
    rename is atomic)."""
    fd, name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent)
    os.close(fd)
    return Path(name)


def write(rows: Iterable[Any], fmt: str, out: Path,
          progress: Callable[[int], None] | None = None) -> int:
    """Write Arrow batches ``rows`` to ``out`` in ``fmt``; the number of rows. Nothing
    appears under ``out`` unless every batch was written (the previous file, if any, stays
    until then)."""
    if fmt not in FORMATS:
        raise ConfigError("--format", f"{fmt!r} is not one of {', '.join(FORMATS)}")
    if not out.parent.is_dir():
        raise ConfigError("--out", f"{out.parent} is not a directory")
    tmp = temp_path(out)
    total = 0
    try:
        with open(tmp, "wb") as f:
            sink = SINKS[fmt](f)
            try:
                for batch in rows:
                    sink.write(batch)
                    total += batch.num_rows
                    if progress:
                        progress(total)
            finally:  # before the file closes, even when interrupted (the temp file goes)
                sink.close()
        os.replace(tmp, out)
    except BaseException:  # KeyboardInterrupt too: never leave the partial file behind
        tmp.unlink(missing_ok=True)
        raise
    return total


class Progress:
    """Rows exported so far and the rate, on stderr every few seconds."""

    def __init__(self, every_s: float = PROGRESS_EVERY_S, stream: IO[str] | None = None) -> None:
        self.every_s, self.stream = every_s, stream or sys.stderr
        self.start = self.last = time.monotonic()

    def __call__(self, rows: int) -> None:
        now = time.monotonic()
        if now - self.last >= self.every_s:
            self.last = now
            rate = rows / max(now - self.start, 1e-9)
            print(f"export: {rows:,} rows, {rate:,.0f} rows/s", file=self.stream, flush=True)


_END = object()


class _Failed:
    def __init__(self, error: BaseException) -> None:
        self.error = error


def prefetched(items: Iterable[Any], depth: int = 2) -> Iterator[Any]:
    """``items``, produced on a thread up to ``depth`` ahead: reading the next block overlaps
    writing this one (chdb and the Parquet encoder both release the GIL). An error while
    producing is raised here; stopping early stops the thread.

    >>> list(prefetched(range(5)))
    [0, 1, 2, 3, 4]
    """
    ready: queue.Queue[Any] = queue.Queue(depth)
    stop = threading.Event()

    def put(item: Any) -> bool:
        while not stop.is_set():
            try:
                ready.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put(item):
                    return
            put(_END)
        except BaseException as exc:  # handed to the consumer, raised there
            put(_Failed(exc))

    thread = threading.Thread(target=produce, name="export-read", daemon=True)
    thread.start()
    try:
        while (item := ready.get()) is not _END:
            if isinstance(item, _Failed):
                raise item.error
            yield item
    finally:
        stop.set()


def export(settings: Settings, db: str, selection: Selection, fmt: str, out: Path,
           progress: Callable[[int], None] | None = None) -> int:
    """Export the records ``selection`` picks from database ``db`` to ``out``; row count."""
    try:
        import pyarrow  # noqa: F401 - the stream and every sink need it
    except ModuleNotFoundError:
        raise missing_pyarrow("shadowpipe export") from None
    sql, params = query(db, selection)
    return write(prefetched(batches(settings, db, sql, params)), fmt, out, progress)
