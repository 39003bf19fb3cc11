"""``shadowpipe export`` on the session's embedded ClickHouse: each kind's rows equal an
independent count (computed here in Python from every stored row), the Parquet file reads
back with the documented column types, JSON Lines and CSV carry the same records, and an
interrupted export leaves no partial file under the final name."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from shadowpipe import cli
from shadowpipe.bench.verdict import SPAN_MS, generate_sql
from shadowpipe.config import Settings
from shadowpipe.processors import export as export_mod
from shadowpipe.processors.selection import KINDS
from shadowpipe.stores import clickhouse_client
from shadowpipe.tables import migrate

RECORDS = 6000
THRESHOLD = 0.3


@pytest.fixture(scope="module")
def stored(stack_settings: Settings) -> tuple[Settings, list[dict[str, Any]]]:
    """A database of RECORDS joined records (some with an older version FINAL must hide),
    and every stored row's latest version read back plainly."""
    s = stack_settings.replace(clickhouse_database=f"x{uuid.uuid4().hex[:10]}")
    client = clickhouse_client(s)
    migrate(client, s)
    now_ms = int(time.time() * 1000)
    step = SPAN_MS // RECORDS
    client.command(generate_sql(s.clickhouse_database, 0, RECORDS, now_ms - SPAN_MS, step,
                                features=True))
    # Stale versions saying the opposite: a selection without FINAL would count them.
    client.command(
        f"INSERT INTO {s.clickhouse_database}.joined_records SELECT * REPLACE (0 AS version, "
        "if(shadow_label = 'benign', 'malignant', 'benign') AS shadow_label, "
        "NULL AS label) FROM "
        f"{s.clickhouse_database}.joined_records WHERE cityHash64(request_id) % 5 = 0")
    result = client.query(
        "SELECT request_id, toString(challenger), primary_label, shadow_label, label, "
        "label_value, shadow_probabilities, context, toUnixTimestamp64Milli(event_time) "
        f"FROM {s.clickhouse_database}.joined_records FINAL")
    names = ["request_id", "challenger", "primary_label", "shadow_label", "label",
             "label_value", "shadow_probabilities", "context", "event_ms"]
    rows = [dict(zip(names, r, strict=True)) for r in result.result_rows]
    assert len(rows) == RECORDS
    return s, rows


def _margin(probabilities: dict[str, float]) -> float | None:
    ranked = sorted(probabilities.values(), reverse=True) + [0.0]
    return ranked[0] - ranked[1] if probabilities else None


def _is(kind: str, r: dict[str, Any]) -> bool:
    p, c, y = r["primary_label"], r["shadow_label"], r["label"]
    both = p is not None and c is not None
    margin = _margin(r["shadow_probabilities"])
    return {
        "disagreements": both and p != c,
        "challenger-wrong": both and y is not None and p == y and c != y,
        "primary-wrong": both and y is not None and c == y and p != y,
        "uncertain": margin is not None and margin < THRESHOLD,
        "unlabelled": y is None and r["label_value"] is None,
        "all": True,
    }[kind]


def _run(monkeypatch: pytest.MonkeyPatch, s: Settings, *args: str) -> int:
    for name, value in s.to_env().items():
        monkeypatch.setenv(name, value)
    return cli.main(["export", *args])


@pytest.mark.parametrize("kind", KINDS)
def test_each_kind_exports_exactly_the_records_it_names(
        stored: tuple[Settings, list[dict[str, Any]]], kind: str, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    s, rows = stored
    want = {(r["challenger"], r["request_id"]) for r in rows if _is(kind, r)}
    assert want, f"the fixture has no {kind} records: the test would prove nothing"
    out = tmp_path / f"{kind}.parquet"
    assert _run(monkeypatch, s, "--kind", kind, "--threshold", str(THRESHOLD),
                "--out", str(out)) == 0
    table = pq.read_table(out)
    got = list(zip(table.column("challenger").to_pylist(),
                   table.column("request_id").to_pylist(), strict=True))
    assert len(got) == len(set(got)) == len(want)
    assert set(got) == want
    assert set(table.column("kind").to_pylist()) == {kind}


def test_parquet_reads_back_with_the_documented_column_types(
        stored: tuple[Settings, list[dict[str, Any]]], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    s, _ = stored
    out = tmp_path / "labelled.parquet"
    assert _run(monkeypatch, s, "--kind", "challenger-wrong", "--out", str(out)) == 0
    read = pq.read_schema(out)
    assert [(f.name, export_mod.type_name(f.type)) for f in read] == export_mod.COLUMNS
    first = pq.read_table(out).slice(0, 1).to_pylist()[0]
    assert set(dict(first["num_features"])) == {"radius", "texture", "area", "smoothness", "x"}
    assert first["label"] is not None and first["label_delay_ms"] > 0
    assert first["primary_label"] == first["label"] != first["shadow_label"]
    # A selection with no rows is still a readable file with the same columns.
    empty = tmp_path / "none.parquet"
    assert _run(monkeypatch, s, "--kind", "all", "--challenger", "nobody",
                "--out", str(empty)) == 0
    assert pq.read_table(empty).num_rows == 0
    assert [export_mod.type_name(f.type) for f in pq.read_schema(empty)] == [
        t for _, t in export_mod.COLUMNS]


def test_challenger_segment_and_time_range_narrow_the_selection(
        stored: tuple[Settings, list[dict[str, Any]]], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    s, rows = stored
    since = sorted(r["event_ms"] for r in rows)[len(rows) // 2]
    want = {r["request_id"] for r in rows if _is("disagreements", r)
            and r["challenger"] == "c1" and r["context"].get("clinic") == "s7"
            and r["event_ms"] >= since}
    assert want
    out = tmp_path / "narrow.jsonl"
    since_iso = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(since / 1000)) + \
        f".{since % 1000:03d}+00:00"
    assert _run(monkeypatch, s, "--kind", "disagreements", "--challenger", "c1",
                "--segment", "clinic=s7", "--since", since_iso, "--out", str(out)) == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert {r["request_id"] for r in records} == want
    assert all(r["challenger"] == "c1" and r["context"] == {"clinic": "s7"} for r in records)
    assert isinstance(records[0]["num_features"], dict)
    assert records[0]["event_time"].endswith("Z")


def test_csv_has_the_columns_and_one_line_per_record(
        stored: tuple[Settings, list[dict[str, Any]]], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    s, rows = stored
    out = tmp_path / "primary.csv"
    assert _run(monkeypatch, s, "--kind", "primary-wrong", "--out", str(out)) == 0
    with open(out, newline="") as f:
        header, *lines = list(csv.reader(f))
    assert header == [name for name, _ in export_mod.COLUMNS]
    assert len(lines) == sum(_is("primary-wrong", r) for r in rows)
    cell = dict(zip(header, lines[0], strict=True))
    assert set(json.loads(cell["num_features"])) >= {"radius", "x"}


def _batches_then(error: BaseException) -> Iterator[pa.RecordBatch]:
    yield pa.RecordBatch.from_pylist([{"request_id": "r1"}], schema=export_mod.schema())
    raise error


@pytest.mark.parametrize("fmt", export_mod.FORMATS)
def test_an_interrupted_export_leaves_no_partial_file(tmp_path: Path, fmt: str) -> None:
    out = tmp_path / f"data.{fmt}"
    out.write_bytes(b"the previous export")
    with pytest.raises(KeyboardInterrupt):
        export_mod.write(_batches_then(KeyboardInterrupt()), fmt, out)
    assert out.read_bytes() == b"the previous export"
    assert sorted(p.name for p in tmp_path.iterdir()) == [out.name]  # no temp file left


def test_missing_pyarrow_is_one_line_naming_the_extra(
        stored: tuple[Settings, list[dict[str, Any]]], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    s, _ = stored
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    assert _run(monkeypatch, s, "--kind", "all", "--out", str(tmp_path / "x.parquet")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "shadowpipe[export]" in err[0]
    assert list(tmp_path.iterdir()) == []


def test_a_database_without_joined_records_is_one_line(
        stack_settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    s = stack_settings.replace(clickhouse_database="nothing_here")
    assert _run(monkeypatch, s, "--kind", "all", "--out", str(tmp_path / "x.parquet")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "SHADOWPIPE_CLICKHOUSE_DATABASE" in err[0]


def test_an_embedded_directory_another_process_holds_is_one_line(
        stack_settings: Settings, tmp_path: Path) -> None:
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import chdb,sys; c=chdb.connect(sys.argv[1]); c.query('SELECT 1'); "
         "print('ready', flush=True); sys.stdin.read()", str(tmp_path / "ch")],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "ready"  # the directory is held now
        s = stack_settings.replace(clickhouse_url=f"chdb://{tmp_path / 'ch'}")
        proc = subprocess.run(
            [sys.executable, "-m", "shadowpipe.cli", "export", "--kind", "all",
             "--out", str(tmp_path / "x.parquet")],
            env={**os.environ, **s.to_env()}, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2
        ours = [line for line in proc.stderr.splitlines() if line.startswith("shadowpipe:")]
        assert len(ours) == 1 and "SHADOWPIPE_CLICKHOUSE_URL" in ours[0]
        assert not (tmp_path / "x.parquet").exists()
    finally:
        holder.stdin.close()
        holder.wait(30)
