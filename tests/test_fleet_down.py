"""``stack down`` of workers (shadowpipe/fleet.py): how long each took to stop, and a worker
that ignores SIGTERM killed with its whole process group (a standby's monitor child must
not outlive it), the end of its log in the report. Plain processes stand in for workers:
this is process handling, no service is involved."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from shadowpipe import fleet
from shadowpipe.config import Settings
from shadowpipe.stack import _pid_alive
from tests.conftest import wait_for

# Ignores SIGTERM, as does the child it starts; prints the child's pid, then waits.
STUCK = """
import signal, subprocess, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
child = subprocess.Popen([sys.executable, "-c",
    "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)"])
print("child", child.pid, flush=True)
time.sleep(600)
"""


def _start(code: str, log: Path) -> subprocess.Popen:
    with open(log, "ab") as out:  # "shadowpipe" in argv: what Worker.alive() looks for
        return subprocess.Popen([sys.executable, "-c", code, "shadowpipe"], stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)


def test_down_reports_stop_times_and_kills_a_stuck_worker_with_its_children(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    settings = Settings.load(env={"SHADOWPIPE_HOME": str(tmp_path)})
    quick = _start("import time; time.sleep(600)", tmp_path / "quick.log")
    stuck = _start(STUCK, tmp_path / "stuck.log")
    line = wait_for("the stuck worker's child", lambda: (tmp_path / "stuck.log").read_text())
    child = int(line.split()[1])
    workers = [fleet.Worker("join-1", "join", quick.pid, 1, str(tmp_path / "quick.log")),
               fleet.Worker("shadow-1", "shadow", stuck.pid, 2, str(tmp_path / "stuck.log"))]
    fleet.Fleet(settings)._record(workers, {})
    monkeypatch.setattr(fleet, "STOP_S", 2.0)
    try:
        report = fleet.Fleet(settings).down()
        assert report[0].startswith("join-1: stopped in ") and f"(pid {quick.pid})" in report[0]
        assert report[1].startswith("shadow-1: killed after 2 s")
        assert f"child {child}" in report[1]  # the end of its log
        assert wait_for("the stuck worker and its child gone", lambda: not _pid_alive(child)
                        and stuck.poll() is not None)
        assert fleet.Fleet(settings).recorded() == ([], {})
    finally:
        for proc in (quick, stuck):
            proc.kill()
            proc.wait()
        subprocess.run(["kill", "-9", str(child)], capture_output=True)
