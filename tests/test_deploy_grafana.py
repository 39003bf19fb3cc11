"""deploy/grafana: every SQL query of every dashboard (panels, annotations, variables) runs
on the embedded ClickHouse after the monitor's pipeline stored a run, and returns rows;
every PromQL expression names only metrics a live worker exports; the provisioning points
at the dashboards and the data sources the panels use."""

from __future__ import annotations

import json
import random
import re
import signal
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import pytest
import yaml

from shadowpipe import kafka, tables
from shadowpipe.config import Settings
from shadowpipe.processors.monitor import sink
from shadowpipe.processors.monitor.pipeline import Message, Pipeline
from shadowpipe.processors.verdict.policy import Policy
from shadowpipe.processors.verdict.store import run_verdicts
from shadowpipe.schemas.codec import Codec
from shadowpipe.stores import clickhouse_client
from tests import report_data
from tests import verdict_challengers as vc
from tests.conftest import spawn_cli

REPO = Path(__file__).resolve().parents[1]
GRAFANA = REPO / "deploy" / "grafana"
CODEC = Codec()
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


# -- PromQL against a live worker's /metrics ----------------------------------------------

CHALLENGERS = """
[[challengers]]
name = "worse"
version = "1"
kind = "callable"
location = "tests.verdict_challengers:worse"
"""
REQUESTS = 300
# Series names a PromQL expression may read for one exported family.
_SUFFIXES = ("_bucket", "_sum", "_count")


def _promql_names() -> dict[str, str]:
    """Every metric name in a PromQL expression of the dashboards -> where it is used."""
    out = {}
    for path in DASHBOARDS:
        for where, expr in _queries(_dashboard(path), PROMETHEUS):
            for name in re.findall(r"\b(shadowpipe_[a-z0-9_]+)\b", expr):
                out[name] = f"{path.name} {where}"
    return out


def _get(s: Settings, path: str) -> tuple[int, str] | None:
    """(status, body) of a GET on the worker, None while it does not answer."""
    try:
        with urllib.request.urlopen(f"http://{s.web_host}:{s.web_port}{path}",
                                    timeout=10) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    except OSError:
        return None


def _exported(text: str) -> set[str]:
    """Sample names in a Prometheus text exposition."""
    return {line.split("{")[0].split(" ")[0] for line in text.splitlines()
            if line and not line.startswith("#")}


def _traffic(s: Settings) -> None:
    """Inference events (half of them labelled), feedback for requests that never came (the
    joiner's orphans) and one undecodable message (a dead letter); the "worse" challenger
    disagrees with the primary on 5 % of them (the monitor's rules, alerts and verdict)."""
    rng = random.Random(5)
    start = int(time.time() * 1000) - 3_600_000
    producer = kafka.producer(s)
    for i in range(REQUESTS):
        features = {"x0": rng.random(), "x1": rng.random()}
        rid, t = f"m-{i}", start + i * 1000
        event = {"request_id": rid, "event_time": t, "model": "primary", "model_version": "1",
                 "num_features": features, "latency_ms": 2.0,
                 "output": {"label": vc.primary(features), "probabilities": {}, "value": None}}
        producer.produce(s.topic("inference"), CODEC.encode("InferenceEvent", event), rid)
        if i % 2 or i >= REQUESTS - 10:
            rid = rid if i % 2 else f"ghost-{i}"
            feedback = {"request_id": rid, "label": vc.truth(features), "event_time": t + 5000}
            producer.produce(s.topic("feedback"), CODEC.encode("Feedback", feedback), rid)
        producer.poll(0)
    producer.produce(s.topic("inference"), b"not avro", b"junk")
    assert producer.flush(30) == 0


def test_every_promql_metric_is_exported_by_a_live_worker(
        settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYTHONPATH", str(REPO))  # the worker imports the test challengers
    (tmp_path / "challengers.toml").write_text(CHALLENGERS)
    s = settings.replace(
        challengers=str(tmp_path / "challengers.toml"),
        clickhouse_url=f"chdb://{tmp_path / 'ch'}", feedback_horizon_s=5,
        allowed_lateness_s=0, monitor_rule_min_records=1, verdict_interval_s=2,
        monitor_batch_ms=100, log_level="WARNING")
    wanted = _promql_names()
    assert len(wanted) >= 10
    _traffic(s)
    worker = spawn_cli(s, "worker", "all", log=tmp_path / "worker.log")
    try:
        deadline = time.monotonic() + 240
        while _get(s, "/shadowpipe/shadow/stats") is None and time.monotonic() < deadline:
            assert worker.poll() is None, (tmp_path / "worker.log").read_text()[-3000:]
            time.sleep(1)  # until the worker's web port answers
        if (_get(s, "/metrics") or (0, ""))[0] == 404:
            pytest.skip("the workers serve no /metrics yet: PromQL names not checked")
        missing, last = set(wanted), None
        while missing and time.monotonic() < deadline and worker.poll() is None:
            last = _get(s, "/metrics")
            missing = {n for n in wanted if last is None or last[0] != 200
                       or n not in _exported(last[1])}
            time.sleep(1)  # a scrape a second, until every name showed up or the deadline
        assert worker.poll() is None, (tmp_path / "worker.log").read_text()[-3000:]
        assert last is not None, "the worker stopped answering on its web port after /metrics"
        assert not missing, ({n: wanted[n] for n in missing}, last[1][-2000:])
    finally:
        if worker.poll() is None:
            worker.send_signal(signal.SIGTERM)
            try:
                worker.wait(60)
            except subprocess.TimeoutExpired:
                worker.kill()
                worker.wait()
