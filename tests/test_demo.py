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
    # The default size: 12,000 requests give the verdict enough mature pairs in clinic east.
    return _run_demo(stack_settings, tmp_path_factory.mktemp("demo"), 12000, 7, 20)


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


def test_verdict_rejects_gbm_v2_in_clinic_east(demo: Path, stack_settings: Settings) -> None:
    summary = json.loads((demo / "summary.json").read_text())
    verdicts = {v["challenger"]: v for v in summary["verdicts"]}
    gbm = verdicts["gbm-v2"]
    assert gbm["verdict"] == "REJECT", gbm["reasons"]
    assert "clinic=east" in gbm["flagged"]
    assert any("clinic=east" in r for r in gbm["reasons"])
    floor = next(c for c in gbm["criteria"] if c["name"] == "excess_disagreement")
    assert "primary-copy" in floor["note"] and "noise floor" in floor["note"]
    assert verdicts["primary-copy"]["verdict"] != "PROMOTE"  # a control proves nothing
    stdout = (demo / "stdout.txt").read_text()
    assert stdout.index("gbm-v2: REJECT") < stdout.index("shadow comparison")
    assert "noise floor" in stdout
    report = (demo / "report.html").read_text()
    # the verdict leads: before the comparison table and every plot
    assert report.index("gbm-v2: <span") < report.index("REJECT") < report.index(
        "<table><tr><th>challenger") < report.index('<section class="plot"')
    assert "clinic=east" in report and "noise floor" in report

    run = summary["run"]
    env = {**os.environ, **stack_settings.to_env(),
           "SHADOWPIPE_CLICKHOUSE_URL": f"chdb://{demo.parent / 'clickhouse'}",
           "SHADOWPIPE_CLICKHOUSE_DATABASE": run["database"],
           "SHADOWPIPE_TOPIC_PREFIX": run["topic_prefix"],
           "SHADOWPIPE_SEGMENTS": "clinic,device", "SHADOWPIPE_POLICY": str(demo / "policy.toml"),
           "SHADOWPIPE_WEB_PORT": str(free_port()), "COLUMNS": "160"}
    proc = subprocess.run([sys.executable, "-m", "shadowpipe.cli", "verdict"], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 5, proc.stderr[-2000:]
    assert "gbm-v2: REJECT" in proc.stdout and "clinic=east" in proc.stdout
    assert "noise floor" in proc.stdout


def test_the_run_leaves_no_redis_state(demo: Path, stack_settings: Settings) -> None:
    """The embedded Redis persists: a finished run removes its keys (its worker is gone)."""
    from shadowpipe.stores import redis_client

    prefix = json.loads((demo / "summary.json").read_text())["run"]["topic_prefix"]
    assert prefix.startswith("demo-")
    assert list(redis_client(stack_settings).scan_iter(match=f"{prefix}*")) == []


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
        errors = []
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.goto(report.as_uri())
        sizes = page.evaluate("""[...document.querySelectorAll('section.plot svg')].map(
            s => [s.closest('section').id, s.getBoundingClientRect().width,
                  s.getBoundingClientRect().height,
                  s.querySelectorAll('path, use, text').length])""")
        page.screenshot(path=str(demo / "report.png"), full_page=True)
        browser.close()
    assert errors == []
    # one plot per view, two for the segments (clinic and device)
    assert sorted(s[0] for s in sizes) == ["alerts", "funnel", "label-delay", "latency",
                                           "over-time", "segments", "segments"]
    for _, width, height, marks in sizes:
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


def test_failing_worker_is_explained_and_the_stack_note_stops_it(tmp_path: Path) -> None:
    """A worker that dies shows its last error lines and its log; the demo's own embedded
    stack is left running and the printed command stops it."""
    kport, rport, dead_ch = free_port(), free_port(), free_port()
    env = {**os.environ, "SHADOWPIPE_HOME": str(tmp_path / "home"),
           "SHADOWPIPE_KAFKA_BOOTSTRAP": f"127.0.0.1:{kport}",
           "SHADOWPIPE_REDIS_URL": f"redis://127.0.0.1:{rport}/0",
           # Only the worker connects to ClickHouse: it fails at start-up, naming the setting.
           "SHADOWPIPE_CLICKHOUSE_URL": f"http://127.0.0.1:{dead_ch}",
           "SHADOWPIPE_WEB_PORT": str(free_port()), "COLUMNS": "160"}
    stop = ["stack", "down"]  # with env: what a failed assertion below still cleans up
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "shadowpipe.cli", "demo", "--events", "200",
             "--out", str(tmp_path / "out")], env=env, capture_output=True, text=True,
            timeout=600)
        assert proc.returncode == 1, proc.stderr[-3000:]
        err = proc.stderr
        assert "the worker exited with 2" in err
        assert "  | shadowpipe: error: SHADOWPIPE_CLICKHOUSE_URL [worker" in err
        assert f"full log: {tmp_path / 'out' / 'worker.log'}" in err
        last = err.strip().splitlines()[-1]
        assert last.startswith("The embedded kafka and redis keep running"), last
        printed = last.split("stop them with: ")[1].split()
        assert printed[:3] == ["shadowpipe", "stack", "down"]
        stop = printed[1:]
        env = {k: v for k, v in os.environ.items() if not k.startswith("SHADOWPIPE_")}
    finally:  # the printed command alone (no SHADOWPIPE_* variables) must stop them
        down = subprocess.run([sys.executable, "-m", "shadowpipe.cli", *stop],
                              env=env, capture_output=True, text=True, timeout=120)
    assert down.stdout.count("stopped") == 2, down.stdout
    from shadowpipe.stack import port_open

    assert not port_open("127.0.0.1", kport) and not port_open("127.0.0.1", rport)


def test_worker_killed_mid_run_is_explained(stack_settings: Settings, tmp_path: Path) -> None:
    """The demo that once ended with only 'worker [demo]: exited with 1' now says what the
    worker last logged, and fails (exit 1) instead of summarising a partial run as done."""
    import re
    import signal
    import time

    from shadowpipe.stack import port_open

    web_port = free_port()
    env = {**os.environ, **stack_settings.to_env(), "SHADOWPIPE_HOME": str(tmp_path / "home"),
           "SHADOWPIPE_CLICKHOUSE_URL": f"chdb://{tmp_path / 'clickhouse'}",
           "SHADOWPIPE_WEB_PORT": str(web_port), "COLUMNS": "160"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "shadowpipe.cli", "demo", "--events", "3000",
         "--wall-seconds", "60", "--out", str(tmp_path / "out")],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    lines = []
    for line in proc.stderr:
        lines.append(line)
        if started := re.search(r"worker started \(pid (\d+)\)", line):
            deadline = time.monotonic() + 300
            while not port_open("127.0.0.1", web_port):  # serving: the traffic starts
                assert time.monotonic() < deadline and proc.poll() is None, "".join(lines)
                time.sleep(0.2)
            os.killpg(int(started.group(1)), signal.SIGKILL)
            break
    lines += proc.stderr.readlines()
    assert proc.wait(600) == 1, "".join(lines)[-3000:]
    err = "".join(lines)
    assert err.count("the worker exited with -9") == 1 and "stopped with" not in err
    assert "the worker's last lines (it logged no error):" in err and "  | " in err
    assert f"full log: {tmp_path / 'out' / 'worker.log'}" in err
    assert "shadowpipe demo: failed: worker exited with -9" in err
