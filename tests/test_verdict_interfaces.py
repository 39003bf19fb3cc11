"""The verdict's interfaces without the pipeline: the benchmark on a small table, the deploy
examples against the real endpoint, the CLI's exit codes on an empty ClickHouse."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import pytest
import yaml

from shadowpipe.cli import build_parser
from shadowpipe.config import Settings
from shadowpipe.processors.verdict.agent import GATES, VERDICT_PATH
from shadowpipe.processors.verdict.commands import EXIT_CODES, exit_code

REPO = Path(__file__).resolve().parents[1]


def _cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "shadowpipe.cli", *args],
                          env={**os.environ, **env}, capture_output=True, text=True,
                          timeout=300)


def test_bench_verdict_small(tmp_path: Path) -> None:
    proc = _cli({"TMPDIR": str(tmp_path)}, "bench", "verdict", "--records", "20000",
                "--repeat", "1", "--json")
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout)
    assert out["records"] == 20000
    assert out["verdict_s"] > 0 and out["scan_s"] > 0
    # the printed times are rounded: a scan of a few ms moves the ratio by a few per cent
    assert out["efficiency"] == pytest.approx(out["scan_s"] / out["verdict_s"], rel=0.03)
    assert set(out["peak_rss_mb"]) == {"20000"} and out["peak_rss_mb"]["20000"] > 0
    assert 0 < out["peak_rss_scan_mb"]["20000"] <= out["peak_rss_mb"]["20000"]
    assert set(out["verdicts"]) == {"c1", "c2"}
    assert set(out["verdicts"].values()) <= set(EXIT_CODES)
    assert "generating records" in proc.stderr  # progress goes to stderr, JSON alone on stdout
    assert not list(tmp_path.glob("shadowpipe-bench-verdict-*"))  # its data is removed


def test_exit_codes_are_distinct_and_only_promote_is_zero() -> None:
    codes = list(EXIT_CODES.values())
    assert len(set(codes + [1, 2])) == 6
    assert [v for v, c in EXIT_CODES.items() if c == 0] == ["PROMOTE"]
    assert exit_code([{"verdict": "PROMOTE"}, {"verdict": "HOLD"}]) == 3
    assert exit_code([{"verdict": "INCONCLUSIVE"}, {"verdict": "HOLD"}]) == 4
    assert exit_code([{"verdict": "PROMOTE"}]) == 0


def test_cli_on_empty_clickhouse_is_inconclusive(tmp_path: Path) -> None:
    env = {"SHADOWPIPE_CLICKHOUSE_URL": f"chdb://{tmp_path / 'ch'}",
           "SHADOWPIPE_KAFKA_BOOTSTRAP": "127.0.0.1:9", "SHADOWPIPE_WEB_PORT": "9"}
    proc = _cli(env, "verdict", "--challenger", "ghost", "--format", "json")
    assert proc.returncode == EXIT_CODES["INCONCLUSIVE"], proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["verdict"] == "INCONCLUSIVE" and "no joined records" in doc["reasons"][0]


def test_unknown_challenger_is_not_recorded(settings: Settings, tmp_path: Path) -> None:
    env = {**settings.to_env(), "SHADOWPIPE_CLICKHOUSE_URL": f"chdb://{tmp_path / 'ch'}"}
    proc = _cli(env, "verdict", "--challenger", "typo", "--format", "json")
    assert proc.returncode == EXIT_CODES["INCONCLUSIVE"], proc.stderr
    assert json.loads(proc.stdout)["changed"] is False
    assert "not recorded" not in proc.stderr  # the broker answers: nothing was to record


def test_cli_configuration_errors_exit_2(tmp_path: Path) -> None:
    env = {"SHADOWPIPE_CLICKHOUSE_URL": f"chdb://{tmp_path / 'ch'}",
           "SHADOWPIPE_WEB_PORT": "9"}
    proc = _cli(env, "verdict", "reset")
    assert proc.returncode == 2 and "--challenger" in proc.stderr
    bad = tmp_path / "policy.toml"
    bad.write_text("[defaults]\nalpah = 0.05\n")
    proc = _cli({**env, "SHADOWPIPE_POLICY": str(bad)}, "verdict")
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "alpah" in proc.stderr


def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _check_url(url: str) -> dict[str, list[str]]:
    parsed = urlparse(url)
    assert parsed.path == VERDICT_PATH, url
    assert parsed.port == Settings.load(env={}).web_port
    return parse_qs(parsed.query)


def test_argo_rollouts_templates_read_the_verdict_endpoint() -> None:
    docs = _docs(REPO / "deploy" / "argo-rollouts" / "verdict-analysis.yaml")
    assert {d["kind"] for d in docs} == {"AnalysisTemplate"}
    for doc in docs:
        args = {a["name"] for a in doc["spec"]["args"]}
        for metric in doc["spec"]["metrics"]:
            web = metric["provider"]["web"]
            url = web["url"].replace("{{args.monitor}}", "http://worker-monitor:6066")
            query = _check_url(url)
            assert query["challenger"] == ["{{args.challenger}}"] and "challenger" in args
            assert web["jsonPath"] == "{$.verdict}"  # the field every verdict document has
            for cond in (metric["successCondition"], metric["failureCondition"]):
                assert any(f'"{v}"' in cond for v in EXIT_CODES)


def test_flagger_webhooks_use_real_gates() -> None:
    (canary,) = _docs(REPO / "deploy" / "flagger" / "verdict-canary.yaml")
    assert canary["apiVersion"] == "flagger.app/v1beta1" and canary["kind"] == "Canary"
    hooks = {h["type"]: h for h in canary["spec"]["analysis"]["webhooks"]}
    assert set(hooks) == {"rollout", "confirm-promotion"}
    for kind, gate in (("rollout", "no-reject"), ("confirm-promotion", "promote")):
        assert _check_url(hooks[kind]["url"])["gate"] == [gate] and gate in GATES
        assert hooks[kind]["metadata"]["challenger"]


def test_verdict_command_is_registered() -> None:
    args = build_parser().parse_args(["verdict", "--challenger", "c", "--format", "json"])
    assert args.challenger == "c" and args.action is None
    assert build_parser().parse_args(["bench", "verdict", "--records", "10"]).records == 10


def test_revoked_promotion_raises_a_critical_alert() -> None:
    from shadowpipe.processors.verdict.engine import PROMOTE, REJECT, Verdict, latch
    from shadowpipe.processors.verdict.service import revocation_alert
    from shadowpipe.schemas.codec import Codec

    promoted = Verdict("gbm-v2", PROMOTE, 1, ["every guardrail within its margin"], "h",
                       since_ms=1)
    harm = latch(Verdict("gbm-v2", REJECT, 2, ["worse in clinic=east by 5.7 points"], "h"),
                 promoted)
    alert = revocation_alert(harm)
    assert alert is not None and alert["severity"] == "critical"
    assert "clinic=east" in alert["details"]["reasons"]
    codec = Codec()
    assert codec.decode(codec.encode("Alert", alert), "Alert")["metric"] == "promotion_revoked"
    held = latch(Verdict("gbm-v2", "HOLD", 2, ["undecided"], "h"), promoted)
    assert held.verdict == PROMOTE and revocation_alert(held) is None
