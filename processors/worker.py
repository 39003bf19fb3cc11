"""``shadowpipe worker NAME``: run processors in a Faust worker.

Each processor is a module ``shadowpipe.processors.<name>.agent`` with an
``install(app, settings)`` function that checks its own requirements (raising
:class:`~shadowpipe.config.ConfigError` before anything starts) and declares its agents.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import threading
from collections.abc import Sequence
from typing import Any

from shadowpipe.config import Settings

PROCESSORS = ("shadow", "join", "monitor")
# SIGINT/SIGTERM: the monitor takes up to ~20 s (its batch, then its windows), the threaded
# loops up to 30 s to join; past this the process exits anyway.
STOP_LIMIT_S = 45.0
log = logging.getLogger(__name__)


def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    worker = sub.add_parser("worker", parents=[common], help="run processors (Faust worker)")
    worker.add_argument("name", choices=("all", *PROCESSORS), help="which processor(s) to run")
    worker.set_defaults(func=worker_cmd)


def worker_cmd(args: argparse.Namespace, settings: Settings) -> int:
    names = PROCESSORS if args.name == "all" else (args.name,)
    run(settings, names)
    return 0


def build(settings: Settings, names: Sequence[str]) -> Any:
    """Check the stack, then build the app with ``names`` installed."""
    from shadowpipe.kafka import check_reachable, ensure_topics
    from shadowpipe.processors.app import check_web_port, make_app

    check_web_port(settings, f"worker {'+'.join(names)}")
    check_reachable(settings, f"worker {'+'.join(names)}")
    ensure_topics(settings)
    app = make_app(settings, names)
    for name in names:
        importlib.import_module(f"shadowpipe.processors.{name}.agent").install(app, settings)
    return app


def run(settings: Settings, names: Sequence[str]) -> None:
    """Run the worker until interrupted."""
    import faust

    app = build(settings, names)
    log.info("starting worker %s", app.conf.id)
    class Worker(faust.Worker):
        def _schedule_shutdown(self, signal: Any) -> None:
            _arm_watchdog(STOP_LIMIT_S)
            super()._schedule_shutdown(signal)

    # The web port/bind/host are app settings (make_app); faust.Worker rejects them.
    worker = Worker(app, loglevel=settings.log_level)
    worker.execute_from_commandline()


def _arm_watchdog(limit_s: float) -> None:
    """Exit (code 1) if a stop takes longer than ``limit_s``: a process that hangs while
    stopping holds its port and blocks its own restart."""
    def expire() -> None:
        log.error("worker still stopping after %.0f s: exiting now", limit_s)
        logging.shutdown()
        os._exit(1)

    timer = threading.Timer(limit_s, expire)
    timer.daemon = True
    timer.start()
