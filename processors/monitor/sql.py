"""Read-only SQL on the embedded engine, over the ClickHouse HTTP interface.

With the embedded default only one process may open the chdb data directory: the monitor.
So the monitor also serves, on ``127.0.0.1:<sql_port>`` (``SHADOWPIPE_SQL_PORT``, default
18123, ``0`` = off; off whenever ``SHADOWPIPE_CLICKHOUSE_URL`` names a server), enough of
ClickHouse's HTTP interface for ``clickhouse_connect.get_client(host=..., port=...)``,
``curl``, pandas and Grafana's ClickHouse plugin (HTTP protocol) to read the tables:

* ``GET /?query=...`` or ``POST /`` (the query in the body, in the ``query`` parameter, or
  both: parameter, newline, body; or multipart form fields), ``GET /ping``;
* ``database`` / ``X-ClickHouse-Database`` (default: the pipeline's database),
  ``default_format`` / ``X-ClickHouse-Format`` (default ``TabSeparated``) or a ``FORMAT``
  clause, whose bytes chdb produces itself (Native, RowBinaryWithNamesAndTypes, JSON...),
  ``param_<name>`` for ``{name:Type}`` placeholders, ``query_id``; ``session_id``, HTTP
  compression and credentials are accepted and ignored (it binds to 127.0.0.1 only; answers
  are not compressed), ``compress=1`` (ClickHouse's compressed blocks) is refused;
* errors as ClickHouse sends them: HTTP 4xx/5xx, ``X-ClickHouse-Exception-Code`` and a
  ``Code: NNN. DB::Exception: ...`` body, so clickhouse-connect raises ``DatabaseError``.

**Read-only, twice.** :func:`classify` reads the statement as ClickHouse's lexer does
(comments, strings, quoted names, heredocs) and lets through one statement of kind
SELECT, WITH, SHOW, DESCRIBE/DESC, EXPLAIN or EXISTS, without ``INTO OUTFILE``
or a call of ``file()`` (neither of which chdb's ``readonly`` stops: ``file()`` reads any
file the process may read); anything else is refused with code 164
(READONLY) before it reaches the engine. Then the engine runs it on its own chdb handle
with ``readonly=1``, which refuses writes, DDL, ``SYSTEM``, ``SET``, table functions that
reach outside (``file``, ``url``, ``remote``, ``s3``) and any change of settings.

**Limits.** Each query gets ``max_execution_time`` (``SHADOWPIPE_SQL_MAX_EXECUTION_S``)
and ``max_result_rows`` with ``result_overflow_mode='throw'`` (``SHADOWPIPE_SQL_MAX_ROWS``);
and, fixed, :data:`MAX_RESULT_BYTES` and :data:`MAX_MEMORY_BYTES` (the pipeline shares the
process); they are set on the handle before ``readonly=1``, so a query cannot raise them.
Limit settings a client sends (Grafana sends ``max_execution_time``) are ignored; any other
setting is refused unless it equals the current value.

**Threads.** The handle is the endpoint's own (chdb serves any number of handles on the
process's one engine), used on one thread of its own: a slow query waits for nothing of
the pipeline's and the pipeline's inserts do not wait for it. Queries run one at a time.

Run it on any chdb directory (the monitor does this with its settings, :func:`attach`)::

    import asyncio, clickhouse_connect
    from shadowpipe.processors.monitor.sql import Limits, SqlEndpoint

    def read() -> list[tuple]:  # a blocking client: on its own thread, not the server's loop
        client = clickhouse_connect.get_client(host="127.0.0.1", port=18123)
        return client.query("SELECT number FROM numbers(3)").result_rows

    async def main() -> None:
        endpoint = SqlEndpoint("/tmp/chdb-demo", "default", Limits(), port=18123)
        await endpoint.start()
        print(await asyncio.to_thread(read))  # [(0,), (1,), (2,)]
        await endpoint.stop()

    asyncio.run(main())

>>> classify("/* hi */ select 1 FORMAT JSON;")
Statement(kind='SELECT', format='JSON')
>>> try:
...     classify("SELECT 1; DROP TABLE t")
... except Refused as refused:
...     print(refused.code, refused.name)
62 SYNTAX_ERROR
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from shadowpipe.config import ConfigError, Settings, env_name
from shadowpipe.tables import database

log = logging.getLogger(__name__)
HOST = "127.0.0.1"  # never another interface: the endpoint has no authentication
ALLOWED = ("SELECT", "WITH", "SHOW", "DESCRIBE", "DESC", "EXPLAIN", "EXISTS")
READONLY, SYNTAX_ERROR, UNKNOWN_SETTING, NOT_IMPLEMENTED = 164, 62, 115, 48
# Fixed guards of the monitor's memory (the pipeline shares the process): a result's bytes
# and a query's working memory.
MAX_RESULT_BYTES = 1 << 30
MAX_MEMORY_BYTES = 4 << 30

# Request parameters that are the HTTP transport's, not ClickHouse settings.
_TRANSPORT = frozenset({
    "query", "database", "default_format", "user", "password", "quota_key", "query_id",
    "session_id", "session_timeout", "session_check", "compress", "decompress",
    "enable_http_compression", "wait_end_of_query", "buffer_size", "client_protocol_version",
    "role", "send_progress_in_http_headers", "http_headers_progress_interval_ms",
    "cancel_http_readonly_queries_on_client_close", "add_http_cors_header",
    "http_response_buffer_size", "output_format_write_statistics"})
# The endpoint's own limits: a client's value is ignored, the endpoint's applies.
_LIMIT_SETTINGS = frozenset({"readonly", "max_execution_time", "max_result_rows",
                             "max_result_bytes", "max_memory_usage", "result_overflow_mode",
                             "timeout_overflow_mode"})
_CONTENT_TYPES = {
    "TabSeparated": "text/tab-separated-values", "TSV": "text/tab-separated-values",
    "CSV": "text/csv", "CSVWithNames": "text/csv", "JSON": "application/json",
    "JSONCompact": "application/json", "JSONEachRow": "application/x-ndjson",
}


class Refused(Exception):
    """A request refused, or a query failed; ``str()`` is ClickHouse's error text."""

    def __init__(self, code: int, name: str, message: str) -> None:
        self.code, self.name = code, name
        super().__init__(f"Code: {code}. DB::Exception: {message}. ({name})")


@dataclass(frozen=True)
class Statement:
    """The kind (first keyword) of an accepted statement and its ``FORMAT``, if any."""

    kind: str
    format: str | None


@dataclass(frozen=True)
class Limits:
    """Per-query limits: seconds of execution, rows of result."""

    max_execution_s: int = 10
    max_rows: int = 1_000_000


# -- the statement classifier ------------------------------------------------------------

_WORD = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_HEREDOC = re.compile(r"\$([A-Za-z0-9_]*)\$")
_QUOTED = "\x00"  # prefix of a string literal or quoted name: never a keyword


def _skip_quoted(sql: str, i: int) -> int:
    """Index after the literal opened by ``sql[i]`` (backslash escapes, doubled quotes)."""
    quote, i = sql[i], i + 1
    while i < len(sql):
        if sql[i] == "\\":
            i += 2
        elif sql[i] == quote:
            if i + 1 < len(sql) and sql[i + 1] == quote:
                i += 2
            else:
                return i + 1
        else:
            i += 1
    raise _syntax("an unterminated quoted string or name")


def _skip_comment(sql: str, i: int) -> int:
    """Index after the ``/* */`` comment at ``i``; one nesting level is read differently by
    ClickHouse versions, so a nested comment is refused rather than guessed."""
    end = sql.find("*/", i + 2)
    if end < 0:
        raise _syntax("an unterminated /* comment")
    if "/*" in sql[i + 2:end]:
        raise _syntax("a nested /* comment")
    return end + 2


def _syntax(what: str) -> Refused:
    return Refused(SYNTAX_ERROR, "SYNTAX_ERROR", f"the query has {what}")


def tokens(sql: str) -> list[str]:
    """The words, quoted items and punctuation of ``sql``, without whitespace and comments
    (``--``, ``#``, ``/* */``).

    >>> tokens("select `a;b`, 'x''y' -- c;\\n FROM t;")
    ['select', '\\x00`', ',', "\\x00'", 'FROM', 't', ';']
    """
    out: list[str] = []
    i = 0
    while i < len(sql):
        ch = sql[i]
        if ch.isspace():
            i += 1
        elif sql.startswith("--", i) or ch == "#":
            end = sql.find("\n", i)
            i = len(sql) if end < 0 else end + 1
        elif sql.startswith("/*", i):
            i = _skip_comment(sql, i)
        elif ch in "'\"`":
            out.append(_QUOTED + ch)
            i = _skip_quoted(sql, i)
        elif ch == "$" and (doc := _HEREDOC.match(sql, i)):
            end = sql.find(doc.group(0), doc.end())
            if end < 0:
                raise _syntax("an unterminated heredoc")
            out.append(_QUOTED + "$")
            i = end + len(doc.group(0))
        elif word := _WORD.match(sql, i):
            out.append(word.group(0))
            i = word.end()
        else:
            out.append(ch)
            i += 1
    return out


def classify(sql: str) -> Statement:
    """The statement in ``sql`` if the endpoint may run it, else :class:`Refused`.

    >>> classify("-- hello\\n(WITH 1 AS x SELECT x)").kind
    'WITH'
    >>> try:
    ...     classify("/* SELECT */ DROP TABLE t")
    ... except Refused as refused:
    ...     print(str(refused)[:60])
    Code: 164. DB::Exception: DROP is not allowed: this endpoint
    """
    statements: list[list[str]] = [[]]
    for tok in tokens(sql):
        if tok == ";":
            statements.append([])
        else:
            statements[-1].append(tok)
    found = [s for s in statements if s]
    if len(found) != 1:
        if not found:
            raise Refused(SYNTAX_ERROR, "SYNTAX_ERROR", "Empty query")
        raise Refused(SYNTAX_ERROR, "SYNTAX_ERROR", "Multi-statements are not allowed: this "
                      "endpoint runs one statement per request")
    toks = found[0]
    upper = [t.upper() for t in toks]
    kind = next((t for t in upper if t != "("), "")
    if kind not in ALLOWED:
        shown = "a quoted name" if kind.startswith(_QUOTED) else kind or "this statement"
        raise Refused(READONLY, "READONLY", f"{shown} is not allowed: this endpoint is "
                      f"read-only ({', '.join(ALLOWED)})")
    _refuse_file_calls(toks)
    if "OUTFILE" in upper or re.search(r"outfile", sql, re.I):
        # Also inside strings and comments: chdb writes the file even with readonly=1, so
        # any spelling the lexer might read differently from ClickHouse's is refused.
        raise Refused(READONLY, "READONLY", "INTO OUTFILE is not allowed: this endpoint is "
                      "read-only")
    return Statement(kind, _format_clause(toks))


def _refuse_file_calls(toks: list[str]) -> None:
    """Refuse ``file(...)``, which reads any file the monitor may read even with
    ``readonly=1``, and any call through a quoted name (`` `file`(...) ``, escapes)."""
    for name, after in zip(toks, toks[1:], strict=False):
        if after != "(":
            continue
        if name.lower() == "file":
            raise Refused(READONLY, "READONLY", "file() is not allowed: it reads the "
                          "monitor's files")
        if name in (_QUOTED + "`", _QUOTED + '"'):
            raise Refused(READONLY, "READONLY", "calling a function by a quoted name is not "
                          "allowed here")


def _format_clause(toks: list[str]) -> str | None:
    """``X`` of a top-level ``FORMAT X`` closing the statement (before ``SETTINGS``)."""
    for i in range(len(toks) - 2, -1, -1):
        if toks[i].upper() == "FORMAT" and _WORD.fullmatch(toks[i + 1]) and (
                i + 2 == len(toks) or toks[i + 2].upper() == "SETTINGS"):
            return toks[i + 1]
    return None


# -- the engine --------------------------------------------------------------------------


@dataclass
class Answer:
    """The bytes of a result in ``format``, and its ClickHouse summary header."""

    body: bytes
    format: str
    summary: dict[str, str]


_CODE = re.compile(r"Code: (\d+)\.")
_NAME = re.compile(r"\(([A-Z_]+)\)\s*(?:\(version [^)]*\))?\s*$")


class Engine:
    """A read-only chdb handle on the process's engine, with the limits set.

    Not thread-safe: :class:`SqlEndpoint` calls it from one thread.
    """

    def __init__(self, path: str, database: str, limits: Limits) -> None:
        self.path = os.path.realpath(path)  # as clickhouse-connect spells it: chdb compares
        self.default_database = database
        self.limits = limits
        self.conn: Any = None
        self.current_database = ""
        self.version = ""
        self.timezone = "UTC"
        self.settings: dict[str, str] = {}

    def open(self) -> None:
        import chdb

        conn = chdb.connect(self.path)
        for setting in (f"max_execution_time = {self.limits.max_execution_s}",
                        f"max_result_rows = {self.limits.max_rows}",
                        f"max_result_bytes = {MAX_RESULT_BYTES}",
                        f"max_memory_usage = {MAX_MEMORY_BYTES}",
                        "result_overflow_mode = 'throw'", "readonly = 1"):
            conn.query(f"SET {setting}")
        self.conn, self.current_database = conn, ""
        (self.version, self.timezone), = self._rows("SELECT version(), timezone()")
        self.settings = dict(self._rows("SELECT name, value FROM system.settings"))

    def _rows(self, sql: str) -> list[list[Any]]:
        return json.loads(self.conn.query(sql, "JSONCompact").bytes())["data"]

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None

    def check_settings(self, requested: dict[str, str]) -> None:
        """Refuse a setting the handle cannot honour (it is read-only)."""
        for name, value in requested.items():
            if name in _LIMIT_SETTINGS:
                continue
            if name not in self.settings:
                raise Refused(UNKNOWN_SETTING, "UNKNOWN_SETTING", f"Unknown setting '{name}'")
            if self.settings[name] != value:
                raise Refused(READONLY, "READONLY", f"Cannot modify '{name}' setting in "
                              "readonly mode: this endpoint runs every query with its own "
                              "settings")

    def run(self, sql: str, fmt: str, db: str, params: dict[str, str]) -> Answer:
        """Run an accepted statement in ``db``; ``fmt`` unless it has a FORMAT clause."""
        statement = classify(sql)
        if self.conn is None:
            self.open()
        try:
            return self._execute(statement, sql, fmt, db, params)
        except Exception:
            # chdb keeps a failed query's partial output on its handle and hands it to the
            # handle's next query (a row-limit error, then SELECT 1 answered 6 MB): start
            # every query after a failure on a fresh handle.
            self.close()
            raise

    def _execute(self, statement: Statement, sql: str, fmt: str, db: str,
                 params: dict[str, str]) -> Answer:
        if db != self.current_database:
            self.conn.query("USE `" + db.replace("\\", "\\\\").replace("`", "\\`") + "`")
            self.current_database = db
        fmt = statement.format or fmt
        result = self.conn.query(sql, fmt, params=params) if params else \
            self.conn.query(sql, fmt)
        summary = {"read_rows": str(result.rows_read()), "read_bytes": str(result.bytes_read()),
                   "written_rows": "0", "written_bytes": "0",
                   "elapsed_ns": str(int(result.elapsed() * 1e9))}
        return Answer(result.bytes(), fmt, summary)

    def error(self, exc: BaseException) -> Refused:
        """An engine exception as ClickHouse would report it (code, name, message)."""
        if isinstance(exc, Refused):
            return exc
        text = str(exc).strip()
        text = text[text.find("Code: "):] if "Code: " in text else text
        code = int(m.group(1)) if (m := _CODE.search(text)) else 1002
        name = m.group(1) if (m := _NAME.search(text)) else "UNKNOWN_EXCEPTION"
        message = _CODE.sub("", text, count=1).strip()
        message = message.removeprefix("DB::Exception:").strip()
        message = _NAME.sub("", message).rstrip(". ")
        return Refused(code, name, message)


def http_status(code: int) -> int:
    """The HTTP status ClickHouse answers an exception code with.

    >>> http_status(164), http_status(62), http_status(60), http_status(159)
    (403, 400, 404, 500)
    """
    if code in (164, 497):  # READONLY, ACCESS_DENIED
        return 403
    if code in (60, 81, 83):  # UNKNOWN_TABLE, UNKNOWN_DATABASE, UNKNOWN_STORAGE
        return 404
    if code in (6, 27, 36, 41, 43, 44, 46, 47, 62, 115, 396, 456, 457):
        return 400  # the query itself is wrong (syntax, identifiers, types, settings, rows)
    return 500


# -- the HTTP server ---------------------------------------------------------------------


class SqlEndpoint:
    """The HTTP server (aiohttp) in front of one :class:`Engine`, on ``127.0.0.1:port``."""

    def __init__(self, path: str, database: str, limits: Limits, port: int) -> None:
        self.engine = Engine(path, database, limits)
        self.port = port
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="sql")
        self.runner: Any = None

    async def start(self) -> None:
        """Open the engine handle and listen; ``OSError`` if the port is taken."""
        from aiohttp import web

        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self.executor, self.engine.open)
        app = web.Application(client_max_size=16 << 20)
        app.router.add_get("/ping", self._ping)
        app.router.add_get("/replicas_status", self._ping)
        app.router.add_route("GET", "/", self._query)
        app.router.add_route("POST", "/", self._query)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        try:
            await web.TCPSite(runner, HOST, self.port).start()
        except OSError:
            await runner.cleanup()
            raise
        self.runner = runner
        log.info("read-only SQL (ClickHouse HTTP interface) on http://%s:%d, database %s",
                 HOST, self.port, self.engine.default_database)

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None
        await asyncio.get_running_loop().run_in_executor(self.executor, self.engine.close)
        self.executor.shutdown(wait=False)

    async def _ping(self, request: Any) -> Any:
        from aiohttp import web

        return web.Response(text="Ok.\n")

    async def _query(self, request: Any) -> Any:
        from aiohttp import web

        params = dict(request.query)
        # As ClickHouse: only multipart forms are fields; any other body is query text
        # (``curl -d 'SELECT 1'`` sends it as application/x-www-form-urlencoded).
        if request.method == "POST" and request.content_type == "multipart/form-data":
            params.update({k: str(v) for k, v in (await request.post()).items()})
            body = ""
        else:
            body = await request.text() if request.method == "POST" else ""
        sql = "\n".join(part for part in (params.get("query", ""), body) if part)
        if not sql.strip():
            return web.Response(text="Ok.\n")
        query_id = params.get("query_id") or request.headers.get(
            "X-ClickHouse-Query-Id") or str(uuid.uuid4())
        headers = {"X-ClickHouse-Query-Id": query_id,
                   "X-ClickHouse-Server-Display-Name": "shadowpipe",
                   "X-ClickHouse-Timezone": self.engine.timezone}
        try:
            answer = await asyncio.get_running_loop().run_in_executor(
                self.executor, self._run, sql, params, request.headers)
        except Exception as exc:  # every failure goes back to the client, as ClickHouse does
            err = self.engine.error(exc)
            log.info("sql refused or failed: %s", str(err).splitlines()[0])
            headers["X-ClickHouse-Exception-Code"] = str(err.code)
            return web.Response(status=http_status(err.code), headers=headers,
                                text=f"{err} (version {self.engine.version})\n")
        headers["X-ClickHouse-Format"] = answer.format
        headers["X-ClickHouse-Summary"] = json.dumps(answer.summary)
        kind = _CONTENT_TYPES.get(answer.format, "text/plain" if answer.format.startswith(
            ("Pretty", "Vertical", "Markdown")) else "application/octet-stream")
        charset = None if kind == "application/octet-stream" else "utf-8"
        return web.Response(body=answer.body, headers=headers, content_type=kind,
                            charset=charset)

    def _run(self, sql: str, params: dict[str, str], headers: Any) -> Answer:
        """On the engine's thread: check the settings, then run."""
        db = params.get("database") or headers.get("X-ClickHouse-Database") or \
            self.engine.default_database
        fmt = params.get("default_format") or headers.get("X-ClickHouse-Format") or \
            "TabSeparated"
        binds = {k[6:]: v for k, v in params.items() if k.startswith("param_")}
        if params.get("compress", "0") not in ("0", "false"):
            raise Refused(NOT_IMPLEMENTED, "NOT_IMPLEMENTED", "compress=1 (ClickHouse's "
                          "compressed blocks) is not supported here: turn the client's "
                          "compression off or use HTTP compression")
        self.engine.check_settings({k: v for k, v in params.items()
                                    if k not in _TRANSPORT and not k.startswith("param_")})
        return self.engine.run(sql, fmt, db, binds)


# -- the monitor's wiring ----------------------------------------------------------------


def engine_path(settings: Settings) -> str | None:
    """The chdb directory of ``settings``, or None when they name a ClickHouse server.

    >>> engine_path(Settings.load(env={"SHADOWPIPE_CLICKHOUSE_URL": "chdb:///data/ch"}))
    '/data/ch'
    >>> engine_path(Settings.load(env={"SHADOWPIPE_CLICKHOUSE_URL": "http://ch:8123"})) is None
    True
    """
    url = urlparse(settings.clickhouse)
    if url.scheme != "chdb":
        return None
    return str(Path(unquote(url.path)).expanduser())


def attach(app: Any, settings: Settings) -> None:
    """Serve the endpoint with the monitor's worker (``app``) while it owns the embedded
    engine; nothing with ``sql_port`` 0 or a ClickHouse server.

    >>> attach(None, Settings.load(env={"SHADOWPIPE_SQL_PORT": "6066"}))
    Traceback (most recent call last):
    ...
    shadowpipe.config.ConfigError: SHADOWPIPE_SQL_PORT [worker monitor]: 6066 is also ...
    """
    import mode

    if settings.sql_port == settings.web_port:
        raise ConfigError(env_name("sql_port"), f"{settings.sql_port} is also "
                          f"{env_name('web_port')}: the SQL endpoint needs a port of its own",
                          "worker monitor")
    path = engine_path(settings)
    if not settings.sql_port or path is None:
        log.info("read-only SQL endpoint off (%s)", f"{env_name('sql_port')}=0"
                 if path is not None else "a ClickHouse server is configured: query it")
        return
    limits = Limits(settings.sql_max_execution_s, settings.sql_max_rows)
    endpoint = SqlEndpoint(path, database(settings), limits, settings.sql_port)

    @app.service
    class SqlService(mode.Service):
        async def on_start(self) -> None:
            # The pipeline matters more than this convenience: it runs on without it.
            try:
                await endpoint.start()
            except OSError as exc:
                log.warning("%s: port %d on %s is not free (%s); the monitor runs without "
                            "its SQL endpoint", env_name("sql_port"), settings.sql_port, HOST,
                            exc.strerror)
            except Exception as exc:  # chdb: e.g. another process owns the directory
                log.warning("%s: the SQL endpoint cannot open the engine at %s (%s); the "
                            "monitor runs without it", env_name("sql_port"), path,
                            str(exc).splitlines()[0] if str(exc) else type(exc).__name__)

        async def on_stop(self) -> None:
            await endpoint.stop()
