"""The main job end to end: `shadowpipe demo` on the real embedded stack, its summary,
its HTML report in headless Chromium, and determinism for a seed."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from shadowpipe.config import Settings
from tests.conftest import free_port

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def _run_demo(stack: Settings, tmp: Path, events: int, seed: int, wall: float) -> Path:
    out = tmp / "out"
    env = {**os.environ, **stack.to_env(),
           "SHADOWPIPE_HOME": str(tmp / "home"),
           "SHADOWPIPE_CLICKHOUSE_URL": f"chdb://{tmp / 'clickhouse'}",
           "SHADOWPIPE_WEB_PORT": str(free_port()), "COLUMNS": "160"}
    proc = subprocess.run(
        [sys.executable, "-m", "shadowpipe.cli", "demo", "--events", str(events),
         "--seed", str(seed), "--wall-seconds", str(wall), "--out", str(out)],
        env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (out / "stdout.txt").write_text(proc.stdout)
    return out


def _query(clickhouse_dir: Path, sql: str) -> list[list]:
    """A direct query in a child process (one chdb path per process)."""
    code = ("import json,sys,clickhouse_connect as c;"
            "cl=c.get_client(interface='chdb',path=sys.argv[1]);"
            "print(json.dumps([list(r) for r in cl.query(sys.argv[2]).result_rows],default=str))")
    out = subprocess.run([sys.executable, "-c", code, str(clickhouse_dir), sql],
                         capture_output=True, text=True, timeout=120, check=True)
    return json.loads(out.stdout)


@pytest.fixture(scope="module")
def demo(stack_settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _run_demo(stack_settings, tmp_path_factory.mktemp("demo"), 6000, 7, 15)


def test_change_is_detected_in_summary(demo: Path) -> None:
    summary = json.loads((demo / "summary.json").read_text())
    received = summary["alerts_received"]
    assert any(a["challenger"] == "gbm-v2" and a["segment"] == "clinic=east"
               and a["metric"] in ("error_rate", "disagreement") for a in received)
    stored = summary["overall"]["drift_events"]
    assert any(a["challenger"] == "gbm-v2" and a["segment"] == "clinic=east" for a in stored)
    stdout = (demo / "stdout.txt").read_text()
    assert "clinic=east" in stdout and "gbm-v2" in stdout


def test_summary_equals_direct_clickhouse_query(demo: Path) -> None:
    summary = json.loads((demo / "summary.json").read_text())
    db = summary["run"]["database"]
    rows = _query(demo.parent / "clickhouse",
                  f"SELECT challenger, count(), countIf(state = 'labelled'), "
                  f"countIf(label IS NOT NULL AND shadow_label = label) "
                  f"FROM {db}.joined_records FINAL GROUP BY challenger ORDER BY challenger")
    by_challenger = {r["challenger"]: r for r in summary["overall"]["arms"]}
    assert len(rows) == 2
    for challenger, published, labelled, correct in rows:
        arm = by_challenger[challenger]
        assert arm["coverage"]["published"] == published == summary["sent"]["inferences"]
        assert arm["coverage"]["labelled"] == labelled == summary["sent"]["feedback"]
        acc = arm["challenger_arm"]["accuracy"]
        assert acc == pytest.approx(correct / labelled)


@pytest.mark.skipif(CHROMIUM is None, reason="Debian chromium not installed (.ci/run installs it)")
def test_report_renders_every_plot_in_headless_chromium(demo: Path) -> None:
    from playwright.sync_api import sync_playwright

    report = demo / "report.html"
    assert "clinic east" in report.read_text()
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--no-first-run"])
        page = browser.new_page(viewport={"width": 1100, "height": 900})
        page.goto(report.as_uri())
        sizes = page.evaluate("""[...document.querySelectorAll('section.plot svg')].map(
            s => [s.getBoundingClientRect().width, s.getBoundingClientRect().height,
                  s.querySelectorAll('path, use, text').length])""")
        page.screenshot(path=str(demo / "report.png"), full_page=True)
        browser.close()
    assert len(sizes) == 6
    for width, height, marks in sizes:
        assert width > 100 and height > 50 and marks > 10
    assert (demo / "report.png").stat().st_size > 10_000


def test_same_seed_same_counts_and_alerts(stack_settings: Settings, tmp_path: Path) -> None:
    runs = [json.loads((_run_demo(stack_settings, tmp_path / str(i), 3000, 11, 8)
                        / "summary.json").read_text()) for i in range(2)]

    def fingerprint(summary: dict) -> tuple:
        arms = sorted((a["challenger"], a["coverage"]["published"], a["coverage"]["labelled"],
                       a["agreement"]) for a in summary["overall"]["arms"])
        alerts = sorted({(a["kind"], a["detector"], a["metric"], a["challenger"], a["arm"] or "",
                          a["segment"] or "") for a in summary["alerts_received"]})
        return summary["sent"], arms, alerts

    assert fingerprint(runs[0]) == fingerprint(runs[1])
