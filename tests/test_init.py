"""``shadowpipe init``, the deploy entry point: topics and every ClickHouse table of
:mod:`shadowpipe.tables`, idempotent, on the real embedded broker and a fresh ClickHouse
directory."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

from shadowpipe.config import Settings
from shadowpipe.tables import MIGRATIONS
from tests.conftest import chdb_rows


def _init(settings: Settings) -> str:
    done = subprocess.run([sys.executable, "-m", "shadowpipe.cli", "init"],
                          env={**os.environ, **settings.to_env()},
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_init_creates_topics_and_tables_then_finds_them_up_to_date(
        stack_settings: Settings, tmp_path: Path) -> None:
    s = stack_settings.replace(topic_prefix=f"t{uuid.uuid4().hex[:10]}.",
                               clickhouse_url=f"chdb://{tmp_path / 'clickhouse'}")
    first = _init(s).splitlines()
    assert first[0].startswith("topics: ") and "all existed" not in first[0]
    assert first[1].startswith("clickhouse shadowpipe: migration 1: joined records")
    assert first[1].count("migration ") == len(MIGRATIONS)

    again = _init(s).splitlines()
    assert "all existed" in again[0]
    assert again[1] == "clickhouse shadowpipe: up to date"
    tables = {r[0] for r in chdb_rows(tmp_path / "clickhouse", "SHOW TABLES FROM shadowpipe")}
    assert {"joined_records", "orphans", "windows", "alerts", "drift_stats",
            "reference_profiles", "verdicts", "schema_migrations"} <= tables
