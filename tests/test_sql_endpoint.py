"""The monitor's read-only SQL endpoint (processors/monitor/sql.py, docs/sql.md): the
statement classifier on its own, then a real ``worker monitor`` on the embedded stack read
through clickhouse-connect's HTTP client and plain HTTP while it writes."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import psutil
import pytest

from shadowpipe.bench import synthetic
from shadowpipe.config import ConfigError, Settings
from shadowpipe.kafka import producer
from shadowpipe.processors.monitor.sql import (
    MAX_MEMORY_BYTES,
    Refused,
    classify,
    http_status,
    tokens,
)
from shadowpipe.schemas.codec import Codec
from shadowpipe.stack import free_port
from tests.conftest import spawn_cli, wait_for
from tests.test_deploy_grafana import CLICKHOUSE, DASHBOARDS, _concrete, _queries

# -- the classifier ----------------------------------------------------------------------


@pytest.mark.parametrize(("sql", "kind", "fmt"), [
    ("SELECT 1", "SELECT", None),
    ("  \n\tselect count() from joined_records;  ", "SELECT", None),
    ("-- a comment\n# another\n/* and ; one */ SELECT 1 FORMAT JSONEachRow", "SELECT",
     "JSONEachRow"),
    ("((SELECT 1)) UNION ALL (SELECT 2)", "SELECT", None),
    ("WITH 2 AS x SELECT x FORMAT Native SETTINGS max_threads = 1", "WITH", "Native"),
    ("SHOW TABLES", "SHOW", None),
    ("describe table joined_records", "DESCRIBE", None),
    ("DESC joined_records", "DESC", None),
    ("EXPLAIN SELECT 1", "EXPLAIN", None),
    ("EXISTS TABLE joined_records", "EXISTS", None),
    ("SELECT ';', 'it''s; DROP', \"a;b\", `c;d`, $$x;y$$, $t$'; DROP$t$ FROM t", "SELECT",
     None),
    ("SELECT format FROM t", "SELECT", None),
    ("SELECT file, 'file(' FROM t -- file(", "SELECT", None),
])
def test_classify_accepts_one_read_statement(sql: str, kind: str, fmt: str | None) -> None:
    statement = classify(sql)
    assert (statement.kind, statement.format) == (kind, fmt)


@pytest.mark.parametrize(("sql", "code"), [
    ("DROP TABLE joined_records", 164),
    ("INSERT INTO joined_records (request_id) VALUES ('x')", 164),
    ("SYSTEM STOP MERGES", 164),
    ("/* SELECT */ DROP TABLE joined_records", 164),
    ("-- SELECT\nDROP TABLE joined_records", 164),
    ("# SELECT\nTRUNCATE TABLE joined_records", 164),
    ("SET readonly = 0", 164),
    ("ALTER TABLE joined_records DELETE WHERE 1", 164),
    ("CREATE TABLE x (a Int8) ENGINE = Memory", 164),
    ("USE system", 164),
    ("OPTIMIZE TABLE joined_records FINAL", 164),
    ("`SELECT` 1", 164),
    ("SELECT 1; DROP TABLE joined_records", 62),
    ("SELECT 1; -- just a comment?\n DROP TABLE joined_records", 62),
    ("SELECT 1;SELECT 2", 62),
    ("SELECT 1 INTO OUTFILE '/tmp/x'", 164),
    ("SELECT file('/etc/hostname')", 164),
    ("SELECT file /* c */ ('/etc/hostname')", 164),
    ("SELECT `file`('/etc/hostname')", 164),
    ("SELECT \"f\\x69le\"('/etc/hostname')", 164),
    ("DESCRIBE file('/etc/hostname', 'LineAsString')", 164),
    ("EXPLAIN SELECT arrayMap(x -> FILE(x), ['/etc/hostname'])", 164),
    ("SELECT 1 /* outfile hidden in a comment */", 164),
    ("SELECT '", 62),
    ("SELECT 1 /* unterminated", 62),
    ("SELECT 1 /* /* nested */ DROP TABLE t */", 62),
    ("SELECT $$; DROP TABLE t", 62),
    ("", 62),
    (" ; ; ", 62),
])
def test_classify_refuses_everything_else(sql: str, code: int) -> None:
    with pytest.raises(Refused) as refused:
        classify(sql)
    assert refused.value.code == code
    assert str(refused.value).startswith(f"Code: {code}. DB::Exception: ")


def test_tokens_hide_strings_and_comments() -> None:
    assert tokens("SELECT 'DROP' -- DROP\n/* DROP */") == ["SELECT", "\x00'"]
    assert http_status(396) == 400 and http_status(159) == 500


def test_sql_settings_are_checked() -> None:
    assert Settings.load(env={}).sql_port == 18123
    with pytest.raises(ConfigError, match="SHADOWPIPE_SQL_PORT"):
        Settings.load(env={"SHADOWPIPE_SQL_PORT": "70000"})
    with pytest.raises(ConfigError, match="SHADOWPIPE_SQL_MAX_ROWS"):
        Settings.load(env={"SHADOWPIPE_SQL_MAX_ROWS": "100"})


# -- a real monitor ----------------------------------------------------------------------




def _listening(pid: int) -> set[int]:
    return {c.laddr.port for c in psutil.Process(pid).net_connections(kind="tcp")
            if c.status == psutil.CONN_LISTEN}


def _ready(s: Settings) -> bool:
    try:
        with urllib.request.urlopen(
                f"http://{s.web_host}:{s.web_port}/shadowpipe/monitor/ready", timeout=5) as r:
            return r.status == 200
    except OSError:
        return False


def _send(s: Settings, records: list[dict[str, Any]]) -> None:
    codec, prod = Codec(), producer(s)
    for rec in records:
        prod.produce(s.topic("joined"), codec.encode("JoinedRecord", rec),
                     rec["request_id"].encode())
    assert prod.flush(30) == 0


def _http(port: int, sql: str, body: bytes | None = None,
          **params: str) -> tuple[int, dict[str, str], bytes]:
    url = f"http://127.0.0.1:{port}/?" + urllib.parse.urlencode({"query": sql, **params})
    try:
        with urllib.request.urlopen(url, data=body, timeout=30) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers), err.read()


def test_sql_endpoint_on_a_writing_monitor(settings: Settings, tmp_path: Path) -> None:
    import clickhouse_connect
    from clickhouse_connect.driver.exceptions import DatabaseError

    port = free_port()
    s = settings.replace(clickhouse_url=f"chdb://{tmp_path / 'ch'}", clickhouse_database="sqlep",
                         monitor_batch_ms=100, log_level="INFO", sql_port=port,
                         sql_max_execution_s=1)  # rows: the default, 1,000,000
    start = (int(time.time()) // 60 - 30) * 60_000
    records = synthetic.stream(synthetic.Spec(
        requests=1200, challengers=("c1", "c2"), seed=3, interval_ms=500, start_ms=start,
        labelled_fraction=0.0))
    assert {r["state"] for r in records} == {"predicted"}  # one row each: count() is exact
    first, second = records[:1000], records[1000:]
    _send(s, first)
    worker = spawn_cli(s, "worker", "monitor", log=tmp_path / "worker.log")
    try:
        wait_for("the monitor's readiness", lambda: _ready(s))
        wait_for("the SQL port", lambda: port in _listening(worker.pid))
        assert _listening(worker.pid) == {s.web_port, port}  # and nothing else
        client = clickhouse_connect.get_client(host="127.0.0.1", port=port)

        def count() -> int:
            return client.query("SELECT count() FROM joined_records").result_rows[0][0]

        wait_for("the first records counted", lambda: count() == len(first))
        _send(s, second)  # the monitor writes these while the endpoint answers
        wait_for("every record counted", lambda: count() == len(records))

        by_challenger = client.query(
            "SELECT count() FROM joined_records WHERE challenger = {c:String}",
            parameters={"c": "c2"}).result_rows
        assert by_challenger == [(sum(r["challenger"] == "c2" for r in records),)]
        form = clickhouse_connect.get_client(host="127.0.0.1", port=port,
                                             form_encode_query_params=True)
        assert form.query("SELECT count() FROM joined_records WHERE challenger = {c:String}",
                          parameters={"c": "c2"}).result_rows == by_challenger  # multipart
        df = client.query_df("SELECT request_id, challenger, primary_label, model_time_ms "
                             "FROM joined_records ORDER BY request_id, challenger LIMIT 4")
        expected = sorted((r["request_id"], r["challenger"]) for r in records)[:4]
        assert list(zip(df.request_id, df.challenger, strict=True)) == expected
        sent = {(r["request_id"], r["challenger"]): r for r in records}
        assert list(df.primary_label) == [sent[k]["primary_output"]["label"] for k in expected]

        # Grafana's comparison dashboard, pointed at the endpoint: every query passes the
        # classifier and runs read-only (rows: test_deploy_grafana.py, on a fuller run).
        dashboards = [(f"{p.name} {where}", sql) for p in DASHBOARDS
                      for where, sql in _queries(json.loads(p.read_text()), CLICKHOUSE)]
        assert len(dashboards) >= 10
        failed = []
        for where, sql in dashboards:
            try:
                client.query(_concrete(sql, s.clickhouse_database, ["c1", "c2"]))
            except DatabaseError as exc:
                failed.append(f"{where}: {exc}")
        assert failed == []

        status, headers, body = _http(port, "SELECT count() FROM joined_records")
        assert (status, body) == (200, f"{len(records)}\n".encode())
        assert headers["X-ClickHouse-Format"] == "TabSeparated"
        status, _, body = _http(port, "SELECT", b"count() FROM joined_records", database="sqlep")
        assert (status, body) == (200, f"{len(records)}\n".encode())  # POST: query + body
        status, _, body = _http(port, "SELECT getSetting('max_memory_usage'), "
                                "getSetting('max_execution_time'), getSetting('readonly')")
        assert body == f"{MAX_MEMORY_BYTES}\t1\t1\n".encode()
        status, _, body = _http(port, "SELECT 1", compress="1")
        assert status == 500 and body.startswith(b"Code: 48. DB::Exception: compress=1")
        status, _, body = _http(port, "SELECT challenger, count() AS n FROM joined_records "
                                "GROUP BY challenger ORDER BY challenger FORMAT JSONEachRow")
        assert [json.loads(line) for line in body.splitlines()] == [
            {"challenger": c, "n": sum(r["challenger"] == c for r in records)}
            for c in ("c1", "c2")]

        outfile = tmp_path / "out.tsv"
        refused = {
            "DROP TABLE joined_records": 164,
            "INSERT INTO joined_records (request_id, challenger) VALUES ('x', 'y')": 164,
            "SYSTEM STOP MERGES": 164,
            "SELECT 1; DROP TABLE joined_records": 62,
            "/* */ DROP TABLE joined_records": 164,
            f"SELECT 1 INTO OUTFILE '{outfile}'": 164,
            # readonly=1 lets file() read any file the monitor may read: refused before
            "SELECT arrayMap(x -> file(x), ['/etc/hostname'])": 164,
            "SELECT `file`('/etc/hostname')": 164,
            # past the classifier, the engine's readonly=1 still refuses: table functions
            # that reach outside, and raising a limit
            "SELECT * FROM file('/etc/hostname', 'LineAsString')": 164,
            "SELECT 1 SETTINGS max_execution_time = 1000": 164,
        }
        for sql, code in refused.items():
            with pytest.raises(DatabaseError) as err:
                client.query(sql)
            assert err.value.code == code, sql
            status, headers, body = _http(port, sql)
            assert status == 403 if code == 164 else status == 400
            assert headers["X-ClickHouse-Exception-Code"] == str(code)
            assert body.startswith(f"Code: {code}. DB::Exception: ".encode())
        with pytest.raises(DatabaseError, match="READONLY"):
            client.command("DROP TABLE joined_records")
        assert not outfile.exists()
        assert client.command("EXISTS TABLE joined_records") == 1
        assert count() == len(records)

        with pytest.raises(DatabaseError, match=r"Limit for result exceeded") as err:
            client.query("SELECT number FROM numbers(2000000)")
        assert err.value.code == 396
        # The engine has written rows when it fails: chdb hands them to the handle's next
        # query unless the handle is replaced (seen in most tries, so three tries).
        for _ in range(3):
            status, _, body = _http(port, "SELECT number FROM numbers(2000000)")
            assert status == 400 and body.startswith(b"Code: 396.")
            assert _http(port, "SELECT 1")[::2] == (200, b"1\n")
        with pytest.raises(DatabaseError, match=r"Timeout exceeded") as err:
            client.query("SELECT count() FROM numbers(1000000000000) WHERE sleepEachRow(0) = 0")
        assert err.value.code == 159
        assert _http(port, "SELECT 1")[::2] == (200, b"1\n")
        assert count() == len(records)  # the endpoint serves on after its errors
        assert worker.poll() is None
    finally:
        worker.kill()
        worker.wait(10)


def test_sql_endpoint_off(settings: Settings, tmp_path: Path) -> None:
    s = settings.replace(clickhouse_url=f"chdb://{tmp_path / 'ch'}", clickhouse_database="sqloff",
                         sql_port=0, log_level="INFO")
    worker = spawn_cli(s, "worker", "monitor", log=tmp_path / "worker.log")
    try:
        wait_for("the monitor's readiness", lambda: _ready(s))
        assert _listening(worker.pid) == {s.web_port}
        assert "read-only SQL endpoint off (SHADOWPIPE_SQL_PORT=0)" in (
            tmp_path / "worker.log").read_text()
    finally:
        worker.kill()
        worker.wait(10)


def test_sql_port_equal_to_the_web_port_stops_the_monitor(settings: Settings,
                                                          tmp_path: Path) -> None:
    s = settings.replace(clickhouse_url=f"chdb://{tmp_path / 'ch'}", sql_port=settings.web_port)
    worker = spawn_cli(s, "worker", "monitor", log=tmp_path / "worker.log")
    assert worker.wait(120) == 2
    lines = (tmp_path / "worker.log").read_text().strip().splitlines()
    assert lines[-1].startswith("shadowpipe: error: SHADOWPIPE_SQL_PORT [worker monitor]: ")
