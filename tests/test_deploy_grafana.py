"""deploy/grafana: every SQL query of every dashboard (panels, annotations, variables) runs
on the embedded ClickHouse after the monitor's pipeline stored a run, and returns rows;
every PromQL expression names only metrics a live worker exports; the provisioning points
at the dashboards and the data sources the panels use."""

from __future__ import annotations

import json
import re
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import yaml
from shadowpipe.processors.monitor import sink
from shadowpipe.processors.monitor.pipeline import Message, Pipeline
from shadowpipe.processors.verdict.policy import Policy
from shadowpipe.processors.verdict.store import run_verdicts
from shadowpipe.schemas.codec import Codec

from shadowpipe import tables
from shadowpipe.config import Settings
from shadowpipe.stores import clickhouse_client
from tests import report_data

GRAFANA = Path(__file__).resolve().parents[1] / "deploy" / "grafana"
DASHBOARDS = sorted((GRAFANA / "dashboards").glob("*.json"))
NOW_MS = (int(time.time()) // 60) * 60_000
CLICKHOUSE = "grafana-clickhouse-datasource"
PROMETHEUS = "prometheus"


def _dashboard(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def _queries(dash: dict[str, Any], ds_type: str) -> list[tuple[str, str]]:
    """(where, query text) of every query on a ``ds_type`` data source."""
    out = []
    for panel in dash.get("panels", []):
        for target in panel.get("targets", []):
            if (target.get("datasource") or panel["datasource"])["type"] == ds_type:
                out.append((f"panel {panel['title']!r}", target.get("rawSql")
                            or target.get("expr")))
    for ann in dash.get("annotations", {}).get("list", []):
        if ann.get("datasource", {}).get("type") == ds_type:
            out.append((f"annotation {ann['name']!r}", ann["target"].get("rawSql")
                        or ann["target"].get("expr")))
    for var in dash.get("templating", {}).get("list", []):
        if var["type"] == "query" and var["datasource"]["type"] == ds_type:
            query = var["query"]
            out.append((f"variable {var['name']!r}",
                        query if isinstance(query, str) else query["query"]))
    return out


def _concrete(sql: str, database: str, challengers: list[str]) -> str:
    """The SQL Grafana's ClickHouse plugin would send for the last 7 days (plus a day, the
    records end at NOW_MS); an unknown macro or variable is left in and fails the test."""
    since, until = NOW_MS - 7 * report_data.DAY, NOW_MS + report_data.DAY
    sql = re.sub(r"\$__timeFilter\((\w+)\)",
                 rf"\1 >= fromUnixTimestamp64Milli({since}) AND "
                 rf"\1 <= fromUnixTimestamp64Milli({until})", sql)
    sql = re.sub(r"\$__timeInterval\((\w+)\)",
                 r"toStartOfInterval(toDateTime(\1), INTERVAL 3600 second)", sql)
    sql = sql.replace("${database}", database).replace("${attribute}", "clinic")
    return sql.replace("${challenger:singlequote}", ", ".join(f"'{c}'" for c in challengers))


@pytest.fixture(scope="module")
def stored(stack_settings: Settings) -> Settings:
    """A run stored as the monitor stores it: joined records, closed windows (per clinic),
    drift statistics through the real pipeline, two alerts, then the verdicts."""
    s = stack_settings.replace(clickhouse_database=f"g{uuid.uuid4().hex[:10]}",
                               segments=("clinic",), drift_features=("radius",))
    pipeline = Pipeline(s)
    pipeline.migrate()
    codec = Codec()
    records = report_data.records(NOW_MS)
    messages = [Message(codec.encode("JoinedRecord", r), r["request_id"].encode(), "joined",
                        0, i) for i, r in enumerate(records)]
    for i in range(0, len(messages), 2000):
        pipeline.process(messages[i:i + 2000])
        pipeline.checkpoint()
    pipeline.close_all()
    client = clickhouse_client(s)
    # this run trips no alert rule: store report_data's two as the monitor would
    cols = sink.rows_to_columns(report_data.alerts(NOW_MS), tables.ALERT_COLUMNS)
    client.insert("alerts", list(cols.values()), column_names=list(cols),
                  database=s.clickhouse_database, column_oriented=True)
    run_verdicts(client, s, Policy.parse(""), now_ms=NOW_MS)
    return s


def test_dashboards_exist_and_use_the_provisioned_data_sources() -> None:
    sources = yaml.safe_load((GRAFANA / "provisioning" / "datasources" /
                              "datasources.yaml").read_text())["datasources"]
    by_uid = {d["uid"]: d["type"] for d in sources}
    assert sorted(by_uid.values()) == [CLICKHOUSE, PROMETHEUS]
    assert {p.name for p in DASHBOARDS} >= {"comparison.json", "pipeline.json"}
    for path in DASHBOARDS:
        dash = _dashboard(path)
        used = [p["datasource"] for p in dash["panels"]] + [
            a["datasource"] for a in dash.get("annotations", {}).get("list", [])]
        for ds in used:
            assert by_uid.get(ds["uid"]) == ds["type"], (path.name, ds)
        ids = [p["id"] for p in dash["panels"]]
        assert len(ids) == len(set(ids)), path.name
    (provider,) = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" /
                                  "dashboards.yaml").read_text())["providers"]
    assert provider["options"]["path"] == "/var/lib/grafana/dashboards"


def test_every_dashboard_sql_query_returns_rows(stored: Settings) -> None:
    s = stored
    client = clickhouse_client(s)
    challengers = ["c-bad", "c-eq"]
    queries = [(f"{p.name} {where}", sql) for p in DASHBOARDS
               for where, sql in _queries(_dashboard(p), CLICKHOUSE)]
    assert len(queries) >= 10
    for where, sql in queries:
        concrete = _concrete(sql, s.clickhouse_database, challengers)
        assert "$" not in concrete, f"{where}: a macro the test does not know: {concrete}"
        rows = client.query(concrete).result_rows
        assert rows, f"{where}: no rows\n{concrete}"
