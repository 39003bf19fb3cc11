"""The demo's worker process: started on a free web port, watched, stopped, and explained
when it fails (its last error lines and where its full log is).

A busy machine (the tests, other work) makes every step slower, never wrong: the waits
here are conditions with generous deadlines that print where they stand, not fixed
sleeps or tight timeouts.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from shadowpipe.config import Settings

START_S = 600.0  # importing chdb, river and sklearn takes seconds on a quiet machine
STOP_S = 600.0  # a graceful stop closes every window of the run: not to be cut short
PROGRESS_S = 30.0
_RECORD = re.compile(r"^\[?\d{4}-\d\d-\d\d[ T]\d\d:")  # first line of a log record
_ERROR = re.compile(r"\b(ERROR|CRITICAL|FATAL)\b|^Traceback|^shadowpipe: error:")
_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


class DemoFailed(Exception):
    """The run cannot go on; ``str()`` is its one-line reason (details printed before)."""


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def worker_lines(log: Path, n: int = 15) -> list[str]:
    """The last ``n`` lines of the log's error records (with their tracebacks), or its last
    ``n`` lines when it has none; terminal codes and progress-bar redraws removed.

    >>> import tempfile
    >>> log = Path(tempfile.mkdtemp()) / "worker.log"
    >>> _ = log.write_text("2026-01-01 10:00:00,1 INFO x: fine\\n"
    ...                    "[2026-01-01 10:00:01,2] [7] [ERROR] loop crashed\\n"
    ...                    "Traceback (most recent call last):\\n  File 'a.py'\\nKeyError: 3\\n"
    ...                    "[2026-01-01 10:00:02,3] [7] [INFO] stopping\\n")
    >>> print("\\n".join(worker_lines(log)))
    [2026-01-01 10:00:01,2] [7] [ERROR] loop crashed
    Traceback (most recent call last):
      File 'a.py'
    KeyError: 3
    """
    try:
        with open(log, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - 512 * 1024))
            text = f.read().decode(errors="replace")
    except OSError:
        return []
    lines = [_ANSI.sub("", raw.split("\r")[-1]).rstrip() for raw in text.splitlines()]
    lines = [line for line in lines if line.strip()]
    picked, inside = [], False
    for line in lines:
        if _ERROR.search(line):
            inside = True
        elif _RECORD.match(line):
            inside = False
        if inside:
            picked.append(line)
    return (picked or lines)[-n:]


def explain(what: str, log: Path) -> None:
    """Print ``what`` happened, the worker's last error lines and where its full log is."""
    lines = worker_lines(log)
    which = "error lines" if any(_ERROR.search(line) for line in lines) else \
        "lines (it logged no error)"
    say(f"shadowpipe demo: {what}; the worker's last {which}:")
    for line in lines or ["(its log is empty)"]:
        say(f"  | {line}")
    say(f"  full log: {log}")


def _port_free(host: str, port: int) -> bool:
    import socket

    with socket.socket() as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


class Worker:
    """``shadowpipe worker all`` in a child process whose output goes to ``log``."""

    def __init__(self, settings: Settings, log: Path) -> None:
        self.settings = settings
        self.log = log
        self.began = time.monotonic()
        self.explained = False  # its failure was shown: once is enough
        out = open(log, "ab")  # noqa: SIM115 - owned by the child process
        env = {**os.environ, **settings.to_env()}
        self.proc = subprocess.Popen([sys.executable, "-m", "shadowpipe.cli", "worker", "all"],
                                     env=env, stdout=out, stderr=out, start_new_session=True)
        out.close()

    @classmethod
    def start(cls, settings: Settings, log: Path) -> Worker:
        """Start on the configured web port, or on a free one if something else holds it
        (its endpoint is how the demo reads the monitor), and wait until it serves."""
        from shadowpipe.stack import free_port

        if not _port_free(settings.web_host, settings.web_port):
            port = free_port()
            say(f"  web port {settings.web_port} is taken (SHADOWPIPE_WEB_PORT); "
                f"the demo's worker uses {port}")
            settings = settings.replace(web_port=port)
        worker = cls(settings, log)
        say(f"  worker started (pid {worker.proc.pid}), log: {log}")
        worker.wait_serving()
        return worker

    def wait_serving(self) -> None:
        from shadowpipe.stack import port_open

        s = self.settings
        wait_for("the worker to serve on port " + str(s.web_port),
                 lambda: port_open(s.web_host, s.web_port), START_S, self.check)

    def check(self) -> None:
        """Raise :class:`DemoFailed` (after explaining) if the worker has exited."""
        code = self.proc.poll()
        if code is not None:
            after = time.monotonic() - self.began
            if not self.explained:
                explain(f"the worker exited with {code} after {after:.0f} s", self.log)
            self.explained = True
            raise DemoFailed(f"worker exited with {code} (its last lines are above)")

    def stop(self) -> None:
        """SIGTERM, then wait for the graceful stop (it closes the run's last windows)."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            if not wait_for("the worker to close its windows and stop",
                            lambda: self.proc.poll() is not None, STOP_S, raise_=False):
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
                explain(f"the worker did not stop within {STOP_S:.0f} s and was killed",
                        self.log)
                return
        if self.proc.returncode not in (0, -signal.SIGTERM) and not self.explained:
            explain(f"the worker stopped with {self.proc.returncode}", self.log)
            self.explained = True


def wait_for(what: str, done: Callable[[], bool], deadline_s: float,
             check: Callable[[], None] | None = None, *, raise_: bool = True) -> bool:
    """Poll ``done`` until true; ``check`` raises on a fatal condition; a line every
    :data:`PROGRESS_S` says what is awaited. False (or :class:`DemoFailed`) at the deadline.

    >>> wait_for("nothing", lambda: True, 1.0)
    True
    """
    began = time.monotonic()
    next_note = began + PROGRESS_S
    while not done():
        if check is not None:
            check()
        now = time.monotonic()
        if now - began > deadline_s:
            if raise_:
                raise DemoFailed(f"gave up waiting for {what} after {deadline_s:.0f} s")
            return False
        if now >= next_note:
            say(f"  still waiting for {what} ({now - began:.0f} s)")
            next_note = now + PROGRESS_S
        time.sleep(0.2)
    return True
