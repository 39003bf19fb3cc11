"""``shadowpipe report`` on a run that is not the demo: records of two challengers in a fresh
embedded ClickHouse, the CLI in child processes (directly, and while a monitor worker holds
the engine's directory), the page in headless Chromium against ``shadowpipe verdict``."""

from __future__ import annotations

import html
import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from shadowpipe.config import Settings
from shadowpipe.processors.verdict.render import criteria_rows, notes
from shadowpipe.tables import database
from tests import report_data
from tests.conftest import spawn_cli

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
VIEWS = ("summary", "over-time", "segments", "funnel", "label-delay", "alerts", "latency",
         "disagreements")
PLOTS = ("over-time", "segments", "funnel", "label-delay", "alerts", "latency")


def _settings(settings: Settings, clickhouse_dir: Path) -> Settings:
    return settings.replace(clickhouse_url=f"chdb://{clickhouse_dir}",
                            clickhouse_database="report_run", segments=("clinic",))


def _cli(settings: Settings, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, **settings.to_env(), "COLUMNS": "160"}
    return subprocess.run([sys.executable, "-m", "shadowpipe.cli", *args], env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def run(stack_settings: Settings, tmp_path_factory: pytest.TempPathFactory
        ) -> tuple[Settings, Path, list[dict[str, Any]]]:
    """A seeded ClickHouse directory (written by a child process, which releases it)."""
    import uuid

    from shadowpipe.kafka import ensure_topics

    tmp = tmp_path_factory.mktemp("report")
    s = _settings(stack_settings.replace(topic_prefix=f"t{uuid.uuid4().hex[:10]}."),
                  tmp / "ch")
    ensure_topics(s)
    now_ms = (int(time.time()) // 60) * 60_000
    subprocess.run([sys.executable, "-m", "tests.report_data", s.clickhouse,
                    s.clickhouse_database, str(now_ms)], check=True, timeout=300,
                   cwd=Path(__file__).parents[1])
    return s, tmp, report_data.records(now_ms)


@pytest.fixture(scope="module")
def page(run: tuple) -> tuple[Path, list[dict[str, Any]]]:
    """The report, then ``shadowpipe verdict --format json`` for the same settings."""
    s, tmp, _ = run
    out = tmp / "out" / "report.html"
    proc = _cli(s, "report", "--out", str(out), "--by", "clinic", "device")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == str(out.resolve())
    verdict = _cli(s, "verdict", "--format", "json")
    assert verdict.returncode == 5, verdict.stderr[-2000:]  # c-bad is rejected
    return out, json.loads(verdict.stdout)["verdicts"]


@pytest.mark.skipif(CHROMIUM is None, reason="Debian chromium not installed (.ci/run installs it)")
def test_report_renders_in_headless_chromium_and_matches_the_verdict(
        page: tuple, run: tuple) -> None:
    from playwright.sync_api import sync_playwright

    path, verdicts = page
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--no-first-run"])
        tab = browser.new_page(viewport={"width": 1100, "height": 900})
        errors, requests = [], []
        tab.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        tab.on("pageerror", lambda exc: errors.append(str(exc)))
        tab.on("request", lambda r: requests.append(r.url))
        tab.goto(path.as_uri())
        shown = tab.evaluate("""() => {
            const sections = [...document.querySelectorAll('section')];
            const plots = {};
            for (const s of document.querySelectorAll('section.plot')) {
                plots[s.id] = [...s.querySelectorAll('svg')].map(svg => [
                    svg.getBoundingClientRect().width, svg.getBoundingClientRect().height,
                    svg.querySelectorAll('path, use, text').length]);
            }
            const verdict = document.querySelector('section.verdict');
            return {order: sections.map(s => s.className + '#' + s.id), plots,
                    heads: [...verdict.querySelectorAll('h3')].map(h => h.innerText),
                    items: [...verdict.querySelectorAll('li')].map(li => li.innerText),
                    paragraphs: [...verdict.querySelectorAll('p')].map(p => p.innerText),
                    cells: [...verdict.querySelectorAll('tr')].map(
                        tr => [...tr.querySelectorAll('td')].map(td => td.innerText)),
                    human: document.getElementById('human-labels').innerText,
                    missing: [...document.querySelectorAll('.missing')].map(m => m.innerText)};
        }""")
        tab.screenshot(path=str(path.with_suffix(".png")), full_page=True)
        browser.close()
    assert errors == []
    assert requests == [path.as_uri()]  # nothing fetched but the file itself

    # the verdict leads, then every view
    assert shown["order"][0] == "verdict#"
    assert [o.split("#")[1] for o in shown["order"][1:]] == list(VIEWS)
    assert set(shown["plots"]) == set(PLOTS)
    for sid in PLOTS:
        assert shown["plots"][sid], sid
        for width, height, marks in shown["plots"][sid]:
            assert width > 100 and height > 50 and marks > 10, sid
    assert len(shown["plots"]["segments"]) == 2  # clinic and device
    # every view of this run has data; c-eq answers like the primary: it says so
    assert shown["missing"] == ["no disagreement with the primary in the window: c-eq"]

    # the verdict's text is what shadowpipe verdict returns for the same data
    by_name = {v["challenger"]: v for v in verdicts}
    assert [h.split(":")[0] for h in shown["heads"]] == sorted(by_name)
    for head, name in zip(shown["heads"], sorted(by_name), strict=True):
        assert head.startswith(f"{name}: {by_name[name]['verdict']}")
    assert by_name["c-bad"]["verdict"] == "REJECT"
    assert shown["items"] == [r for name in sorted(by_name) for r in by_name[name]["reasons"]]
    assert any("clinic=east" in r for r in shown["items"])
    for name in sorted(by_name):
        for line in notes(by_name[name]):
            assert line in shown["paragraphs"]
    expected_rows = [row for name in sorted(by_name) for row in criteria_rows(by_name[name])]
    assert [c for c in shown["cells"] if c] == expected_rows

    # human review labels, counted independently
    _, _, records = run
    for name in ("c-bad", "c-eq"):
        mine = [r for r in records if r["challenger"] == name and r.get("label")]
        human = sum(1 for r in mine if r["feedback_source"] == "human")
        assert f"{name}: {human} of {len(mine)} labels" in shown["human"]


def test_report_page_holds_the_stored_counts(page: tuple, run: tuple) -> None:
    path, _ = page
    _, _, records = run
    text = path.read_text()
    # nothing that could fetch: local references (url(#clip), href="#glyph") only
    assert re.findall(r'<script|<link|<img|src=|@import|url\((?!#)|href="(?!#)', text) == []
    timeouts = sum(1 for r in records if r["challenger"] == "c-eq" and r["shadow_error"])
    scored = sum(1 for r in records if r["challenger"] == "c-eq" and not r["shadow_error"])
    assert f"<td>c-eq</td><td>{report_data.REQUESTS}</td><td>{scored}</td>" in text
    assert f"<td>{timeouts}</td>" in text
    # the worst segment comes first in the per-segment table
    segs = text[text.index('id="segments"'):text.index('id="funnel"')]
    assert segs.index("<td>c-bad</td><td>east</td>") < segs.index("<td>c-bad</td><td>west</td>")


def test_unknown_challenger_and_bad_since_exit_2_naming_the_flag(run: tuple) -> None:
    s, tmp, _ = run
    out = tmp / "never.html"
    errors = []
    for args, flag in ((["--challenger", "ghost"], "--challenger"), (["--since", "7x"], "--since"),
                       (["--since", "0"], "--since")):
        proc = _cli(s, "report", "--out", str(out), *args)
        assert proc.returncode == 2, proc.stderr
        last = proc.stderr.strip().splitlines()[-1]
        assert last.startswith(f"shadowpipe: error: {flag}:"), proc.stderr
        assert "Traceback" not in proc.stderr
        errors.append(last)
    assert "(known: c-bad, c-eq)" in errors[0]
    assert not out.exists()


def test_empty_database_says_so_in_every_view(tmp_path: Path) -> None:
    env_settings = Settings.load(env={
        "SHADOWPIPE_CLICKHOUSE_URL": f"chdb://{tmp_path / 'ch'}",
        "SHADOWPIPE_KAFKA_BOOTSTRAP": "127.0.0.1:9", "SHADOWPIPE_WEB_PORT": "9"})
    out = tmp_path / "empty.html"
    proc = _cli(env_settings, "report", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    text = out.read_text()
    assert "<svg" not in text  # no empty plot that looks like a result
    assert "No challenger has joined records yet: INCONCLUSIVE." in text
    for sid in VIEWS:
        section = text[text.index(f'id="{sid}"'):]
        section = section[:section.index("</section>")]
        assert 'class="missing"' in section, sid
    assert "no labels yet" in text


def _ready(settings: Settings) -> bool:
    url = f"http://127.0.0.1:{settings.web_port}/shadowpipe/monitor/ready"
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status == 200
    except OSError:
        return False


def test_report_while_a_monitor_holds_the_engine(run: tuple, page: tuple) -> None:
    """The monitor owns the directory: the report reads through its endpoints and says the
    same verdict."""
    s, tmp, _ = run
    _, verdicts = page
    replay = s.replace(run="june")  # a replay run stored before the monitor started
    subprocess.run([sys.executable, "-m", "tests.report_data", s.clickhouse,
                    database(replay), str((int(time.time()) // 60) * 60_000)], check=True,
                   timeout=300, cwd=Path(__file__).parents[1])
    worker = spawn_cli(s, "worker", "monitor", log=tmp / "monitor.log")
    try:
        deadline = time.monotonic() + 300
        while not _ready(s):
            assert worker.poll() is None, (tmp / "monitor.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "monitor not ready"
            time.sleep(0.5)
        out = tmp / "while-monitor.html"
        proc = _cli(s, "report", "--out", str(out), "--challenger", "c-bad")
        assert proc.returncode == 0, proc.stderr[-3000:]
        replay_out = tmp / "while-monitor-replay.html"
        proc = _cli(replay, "report", "--out", str(replay_out), "--challenger", "c-eq")
        assert proc.returncode == 0, proc.stderr[-3000:]
        judged = _cli(replay, "verdict", "--challenger", "c-eq", "--format", "json")
        assert judged.returncode in (0, 3, 4, 5), judged.stderr[-2000:]
    finally:
        worker.terminate()
        worker.wait(120)
    text = out.read_text()
    bad = next(v for v in verdicts if v["challenger"] == "c-bad")
    assert "c-bad: <span" in text and f">{bad['verdict']}</span>" in text
    assert all(f"<li>{html.escape(r)}</li>" in text for r in bad["reasons"])
    assert "<td>c-eq</td>" not in text  # only the challenger asked for
    assert text.count("<svg") >= len(PLOTS)
    replayed = json.loads(judged.stdout)  # judged by the monitor on the run's database
    assert replayed["challenger"] == "c-eq" and replayed["what_if"] is True
    assert f">{replayed['verdict']}</span>" in replay_out.read_text()
