"""Install the shadow worker into a Faust app (``shadowpipe worker shadow|all``).

``install`` loads every challenger first (a broken one stops start-up with one line naming
it), then adds to the app:

* a service running the scoring loop (:func:`~.service.shadow_loop`, the workers' batch
  loop) on its own thread, started and stopped with the worker;
* ``GET /shadowpipe/shadow/ready`` and ``GET /shadowpipe/shadow/stats`` on the worker's web
  port (:mod:`~shadowpipe.processors.runtime.health`): per-challenger counters (scored,
  errors, timeouts, skipped), dead letters, batch sizes, queue lag.
"""

from __future__ import annotations

import logging
from typing import Any

from shadowpipe.config import Settings
from shadowpipe.processors.runtime.health import add_health, loop_lag, loop_readiness
from shadowpipe.processors.runtime.loop import BatchLoop
from shadowpipe.processors.runtime.thread import add_loop_service
from shadowpipe.processors.shadow.challengers import load_specs
from shadowpipe.processors.shadow.core import ShadowProcessor
from shadowpipe.processors.shadow.service import shadow_loop

log = logging.getLogger("shadowpipe.shadow")


def install(app: Any, settings: Settings) -> BatchLoop:
    """Check the challengers, then register the scoring service and the health views."""
    specs = load_specs(settings)
    processor = ShadowProcessor(settings, specs)
    loop = shadow_loop(settings, processor)
    names = ", ".join(f"{s.name}@{s.version}" + (" (control)" if s.is_control else "")
                      for s in specs)
    log.info("shadow: challengers %s", names)

    add_loop_service(app, loop, "shadow-loop")
    add_health(app, "shadow", processor.stats.snapshot, lambda: loop_readiness(loop),
               lag=loop_lag(loop))
    return loop
