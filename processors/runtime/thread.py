"""A blocking consumer loop run on its own thread, started and stopped with the worker.

The shadow worker and the joiner move records with a librdkafka consumer loop rather than
a Faust stream (Faust's per-event overhead capped them at a fraction of their targets);
Faust still owns the process, the web endpoint, timers and start/stop. A loop that dies
must not leave a worker that looks alive and does nothing, so a crash stops the worker.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from typing import Any, Protocol

log = logging.getLogger(__name__)


class Loop(Protocol):
    """What a threaded loop offers: ``run`` blocks until ``stop`` is called."""

    def run(self) -> None: ...

    def stop(self) -> None: ...


def add_loop_service(app: Any, loop: Loop, name: str, join_timeout_s: float = 30.0) -> None:
    """Register a Faust service that runs ``loop`` on a thread named ``name``."""
    import mode

    @app.service
    class LoopService(mode.Service):
        _thread: threading.Thread | None = None

        async def on_start(self) -> None:
            aio = asyncio.get_running_loop()

            def target() -> None:
                try:
                    loop.run()
                except BaseException as exc:  # a silently dead loop processes nothing: exit 1
                    log.exception("%s crashed", name)
                    asyncio.run_coroutine_threadsafe(self.crash(exc), aio)

            self._thread = threading.Thread(target=target, name=name, daemon=True)
            self._thread.start()

        async def on_stop(self) -> None:
            loop.stop()
            if self._thread is not None:
                await asyncio.get_running_loop().run_in_executor(
                    None, self._thread.join, join_timeout_s)
