"""Install the shadow worker into a Faust app (``shadowpipe worker shadow|all``).

``install`` loads every challenger first (a broken one stops start-up with one line naming
it), then adds to the app:

* a service running the scoring loop (:class:`~.service.ShadowLoop`) on its own thread,
  started and stopped with the worker;
* the JSON view ``GET /shadowpipe/shadow/stats`` on the worker's web port: per-challenger
  counters (scored, errors, timeouts, skipped), dead letters, batch sizes, queue lag.
"""

from __future__ import annotations

import logging
from typing import Any

from shadowpipe.processors.shadow.challengers import load_specs
from shadowpipe.processors.shadow.core import ShadowProcessor
from shadowpipe.processors.shadow.service import ShadowLoop
from shadowpipe.processors.threaded import add_loop_service

from shadowpipe.config import Settings

STATS_PATH = "/shadowpipe/shadow/stats"
log = logging.getLogger("shadowpipe.shadow")


def install(app: Any, settings: Settings) -> ShadowLoop:
    """Check the challengers, then register the scoring service and the stats view."""
    specs = load_specs(settings)
    loop = ShadowLoop(settings, ShadowProcessor(settings, specs))
    names = ", ".join(f"{s.name}@{s.version}" + (" (control)" if s.is_control else "")
                      for s in specs)
    log.info("shadow: challengers %s", names)

    add_loop_service(app, loop, "shadow-loop")

    @app.page(STATS_PATH)
    async def shadow_stats(web: Any, request: Any) -> Any:
        return web.json(loop.stats.snapshot())

    return loop
