"""``shadowpipe bench export`` on a short run: one JSON object with the keys the issue-17
targets are read from, its in-run baseline, and every generated record exported and
scanned (figures are not judged: timings on a shared test machine say nothing)."""

from __future__ import annotations

from pathlib import Path

import pytest

from shadowpipe.config import Settings
from tests.test_bench_runs import _bench


def test_bench_export_exports_every_record_against_its_scan(
        settings: Settings, tmp_path: Path) -> None:
    out = _bench(settings, tmp_path, "export", "--records", "20000", "--repeat", "1")
    assert {"rows", "rows_per_s", "scan_rows_per_s", "peak_rss_mb", "ratio"} <= set(out)
    assert out["rows"] == 20000  # the bench itself fails when a scan read fewer
    assert out["ratio"] == pytest.approx(out["rows_per_s"] / out["scan_rows_per_s"], rel=0.01)
    assert out["peak_rss_mb"] > 0 and out["parquet_mb"] > 0
    assert list(tmp_path.iterdir()) == []  # the temp chdb directory is gone
