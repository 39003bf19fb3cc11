"""The newcomer path of issue 15, end to end: a service instrumented with the producer
library emits 3,000 requests and their outcomes; the shadow worker, the joiner and the
monitor run as three separate processes on their own web ports; challengers come from a
module next to the challengers file (no PYTHONPATH). Halfway through, the primary's error
rate jumps. The monitor is stopped with SIGINT as soon as it has counted the last record
(its idle timeout far away, so only the graceful stop can close the last windows).

Checked: the windows table covers the stream's last minute, and the primary's drift is
alerted about the primary, never once per challenger though three challengers (one a
control copy) saw it, and never open twice at once.
"""

from __future__ import annotations

import json
import random
import signal
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

from shadowpipe.config import Settings
from shadowpipe.producers import Emitter, current_request_id
from tests.conftest import chdb_rows, free_port, spawn_cli

REQUESTS = 3000
MODELS = '''
def _label(features, cut):
    return "hi" if features["x0"] >= cut else "lo"

def tight(features):
    return {"label": _label(features, 0.52)}

def loose(features):
    return {"label": _label(features, 0.48)}

def copy(features):
    return {"label": _label(features, 0.5)}
'''
CHALLENGERS = "".join(
    f'[[challengers]]\nname = "{name}"\nversion = "1"\nkind = "callable"\n'
    f'location = "newcomer_models:{name}"\n{extra}\n'
    for name, extra in (("tight", ""), ("loose", ""), ("copy", "is_control = true\n")))


def _get(s: Settings, path: str) -> dict[str, Any] | None:
    try:
        with urllib.request.urlopen(f"http://{s.web_host}:{s.web_port}{path}",
                                    timeout=30) as resp:
            return json.loads(resp.read())
    except OSError:
        return None


def _wait(what: str, fn: Any, procs: list[subprocess.Popen], timeout_s: float = 400) -> Any:
    deadline = time.monotonic() + timeout_s
    value = None
    while time.monotonic() < deadline:
        assert all(p.poll() is None for p in procs), f"a worker died waiting for {what}"
        value = fn()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}: {value}")


def _arms(s: Settings) -> dict[str, tuple[int, int]]:
    """(published, labelled) per challenger in the monitor's joined records."""
    reply = _get(s, "/shadowpipe/query/?name=arms&since_ms=0") or {}
    rows = [dict(zip(reply["columns"], r, strict=True)) for r in reply.get("rows", [])]
    return {r["challenger"]: (r["published"], r["labelled"]) for r in rows}


def _serve(s: Settings) -> int:
    """The service: 3,000 tracked predictions, each outcome reported right after; the
    truth departs from the primary on 5 % of the first half and 45 % of the second.
    Returns the last request's event time (ms)."""
    rng = random.Random(11)
    emitter = Emitter(s)

    @emitter.track(model="primary", version="1")
    def predict(features: dict[str, float]) -> dict[str, str]:
        return {"label": "hi" if features["x0"] >= 0.5 else "lo"}

    for i in range(REQUESTS):
        answer = predict({"x0": rng.random(), "x1": rng.random()})
        wrong = rng.random() < (0.05 if i < REQUESTS // 2 else 0.45)
        truth = answer["label"] if not wrong else ("lo" if answer["label"] == "hi" else "hi")
        emitter.emit_feedback(current_request_id(), truth)
        if i % 100 == 99:  # a realistic pace: the stream spans tens of seconds
            time.sleep(0.2)
    last = int(time.time() * 1000)
    assert emitter.close(timeout=60) == 0
    return last


def test_newcomer_path(settings: Settings, tmp_path: Path) -> None:
    (tmp_path / "newcomer_models.py").write_text(MODELS)
    (tmp_path / "challengers.toml").write_text(CHALLENGERS)
    s = settings.replace(challengers=str(tmp_path / "challengers.toml"),
                         clickhouse_url=f"chdb://{tmp_path / 'ch'}",
                         clickhouse_database="newcomer", monitor_idle_s=3600,
                         log_level="WARNING")
    ports = {name: s.replace(web_port=free_port()) for name in ("shadow", "join", "monitor")}
    workers = {name: spawn_cli(ws, "worker", name, log=tmp_path / f"{name}.log")
               for name, ws in ports.items()}
    procs = list(workers.values())
    try:
        _wait("the monitor ready", lambda: (_get(ports["monitor"],
              "/shadowpipe/monitor/ready") or {}).get("ready"), procs)
        last = _serve(s)
        want = {c: (REQUESTS, REQUESTS) for c in ("tight", "loose", "copy")}
        _wait("every prediction and label stored", lambda: _arms(ports["monitor"]) == want,
              procs)
        monitor = workers["monitor"]
        monitor.send_signal(signal.SIGINT)
        assert monitor.wait(120) == 0
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
    ch = tmp_path / "ch"
    end = chdb_rows(ch, "SELECT max(toUnixTimestamp64Milli(window_end)) "
                        "FROM newcomer.windows FINAL WHERE segment = ''")[0][0]
    assert end is not None and end >= last, (end, last)  # the last minute is stored
    published = chdb_rows(ch, "SELECT challenger, sum(published) FROM newcomer.windows "
                              "FINAL WHERE segment = '' GROUP BY challenger")
    assert dict(map(tuple, published)) == {c: REQUESTS for c in ("tight", "loose", "copy")}
    primary = chdb_rows(ch, "SELECT challenger, status, alert_id, details['resolves'], "
                            "details['repeat_of'], toUnixTimestamp64Milli(time) "
                            "FROM newcomer.alerts FINAL "
                            "WHERE arm = 'primary' AND metric = 'error_rate'")
    assert {a[0] for a in primary} == {""}, primary  # about the primary, not a challenger
    assert _episodes(primary) >= 1, primary


def _episodes(alerts: list[list[Any]]) -> int:
    """Firing episodes of one condition, checking it is never open twice at once (what
    three challengers raising it each would do): a firing while one is open must be that
    one's repeat, and a resolution names the open firing. The arrival order of the four
    joined partitions decides whether the detector refires after a resolution, so more than
    one episode is allowed; two at the same time are not."""
    fired = {a[2]: a[5] for a in alerts if a[1] == "firing"}
    # A resolution's own time may precede its firing's (event time across partitions): it
    # is placed right after the firing it names.
    ordered = sorted(alerts, key=lambda a: (fired.get(a[3], a[5]), a[1] == "resolved")
                     if a[1] == "resolved" else (a[5], False))
    open_id, episodes = None, 0
    for _challenger, status, aid, resolves, repeat_of, _time in ordered:
        if status == "resolved":
            assert resolves == open_id, alerts
            open_id = None
        elif open_id is None:
            open_id, episodes = aid, episodes + 1
        else:
            assert repeat_of == open_id, alerts
    return episodes
