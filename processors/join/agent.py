"""``shadowpipe worker join``: install the joiner into a Faust worker.

``install`` checks Redis (a ConfigError naming ``SHADOWPIPE_REDIS_URL`` before anything
starts), then adds to the app:

* a service running the workers' batch loop (:func:`~.service.join_loop`) on its own
  thread: micro-batches of the inference, predictions and feedback topics are merged into
  Redis, the JoinedRecords published, then the offsets committed (see ``service.py`` for
  why this is a librdkafka loop rather than a Faust stream);
* a timer sweeping requests past the feedback horizon (claim, publish orphans, bury);
* ``GET /shadowpipe/join/ready`` and ``GET /shadowpipe/join/stats`` (also at the older
  ``/join/stats/``; :mod:`~shadowpipe.processors.runtime.health`): the counters as JSON
  (also logged every 30 s).

>>> sweep_interval_s(7 * 86400), sweep_interval_s(2)
(5.0, 0.5)
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from shadowpipe.config import Settings
from shadowpipe.processors.join.core import JoinCore
from shadowpipe.processors.join.service import PRODUCER_OVERRIDES, join_loop, sweep_once
from shadowpipe.processors.join.store import StoreError
from shadowpipe.processors.publisher import DeliveryError, Publisher
from shadowpipe.processors.runtime.health import add_health, loop_lag, loop_readiness
from shadowpipe.processors.runtime.loop import BatchLoop
from shadowpipe.processors.runtime.thread import add_loop_service

OLD_STATS_PATH = "/join/stats/"  # before the paths were the same on every worker
STATS_LOG_S = 30.0
log = logging.getLogger("shadowpipe.join")


def sweep_interval_s(horizon_s: float) -> float:
    """How often to look for expired requests: a quarter of the horizon, 0.25 s to 5 s."""
    return min(5.0, max(0.25, horizon_s / 4))


def install(app: Any, settings: Settings) -> BatchLoop:
    """Check Redis, then register the consumer service, the sweep timer and the health
    views."""
    from shadowpipe.stores import check_redis

    check_redis(settings, "worker join")
    core = JoinCore(settings)
    loop = join_loop(settings, core)
    sweeper = Publisher(settings, **PRODUCER_OVERRIDES)
    last_log = [time.monotonic()]

    add_loop_service(app, loop, "join-loop")

    @app.timer(interval=sweep_interval_s(settings.feedback_horizon_s), name="join_sweep")
    async def join_sweep() -> None:
        try:
            while await asyncio.to_thread(sweep_once, core, sweeper, settings):
                pass
        except (StoreError, DeliveryError) as exc:  # claimed requests come back after the lease
            log.error("join sweep failed, retrying next round: %s", exc)
            core.count(sweep_retries=1)
        if time.monotonic() - last_log[0] >= STATS_LOG_S:
            last_log[0] = time.monotonic()
            log.info("join counters: %s", core.stats())

    add_health(app, "join", lambda: {"pending": core.store.pending(), **core.stats()},
               lambda: loop_readiness(loop), stats_aliases=(OLD_STATS_PATH,),
               lag=loop_lag(loop))

    return loop
