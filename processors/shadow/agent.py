"""Install the shadow worker into a Faust app (``shadowpipe worker shadow|all``).

``install`` loads every challenger first (a broken one stops start-up with one line naming
it), then adds to the app:

* a service running the scoring loop (:class:`~.service.ShadowLoop`) on its own thread,
  started and stopped with the worker;
* the JSON view ``GET /shadowpipe/shadow/stats`` on the worker's web port: per-challenger
  counters (scored, errors, timeouts, skipped), dead letters, batch sizes, queue lag.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from typing import Any

from shadowpipe.processors.shadow.challengers import load_specs
from shadowpipe.processors.shadow.core import ShadowProcessor
from shadowpipe.processors.shadow.service import ShadowLoop

from shadowpipe.config import Settings

STATS_PATH = "/shadowpipe/shadow/stats"
log = logging.getLogger("shadowpipe.shadow")


def install(app: Any, settings: Settings) -> ShadowLoop:
    """Check the challengers, then register the scoring service and the stats view."""
    import mode

    specs = load_specs(settings)
    loop = ShadowLoop(settings, ShadowProcessor(settings, specs))
    names = ", ".join(f"{s.name}@{s.version}" + (" (control)" if s.is_control else "")
                      for s in specs)
    log.info("shadow: challengers %s", names)

    @app.service
    class ShadowService(mode.Service):
        """Runs the loop on a thread; a crash of the loop stops the worker."""

        _thread: threading.Thread | None = None

        async def on_start(self) -> None:
            aio = asyncio.get_running_loop()

            def target() -> None:
                try:
                    loop.run()
                except BaseException as exc:  # a silent dead loop scores nothing: exit 1
                    log.exception("shadow loop crashed")
                    asyncio.run_coroutine_threadsafe(self.crash(exc), aio)

            self._thread = threading.Thread(target=target, name="shadow-loop", daemon=True)
            self._thread.start()

        async def on_stop(self) -> None:
            loop.stop()
            if self._thread is not None:
                await asyncio.get_running_loop().run_in_executor(None, self._thread.join, 30)

    @app.page(STATS_PATH)
    async def shadow_stats(web: Any, request: Any) -> Any:
        return web.json(loop.stats.snapshot())

    return loop
