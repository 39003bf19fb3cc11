"""The one health surface of the workers, the same on every worker's web port:

* ``GET /shadowpipe/<worker>/ready``: 200 ``{"ready": true, "state": "ready", ...}`` or
  503 with the state (``starting``, ``retrying``, ``stalled``, ``stopping``) and why;
* ``GET /shadowpipe/<worker>/stats``: the worker's counters as JSON, with the same
  ``state``, ``ready`` and ``reason``;
* ``GET /metrics``: the same counters in the Prometheus text format (:mod:`.metrics`).

``<worker>`` is ``shadow``, ``join`` or ``monitor``; ``worker all`` serves all three.

>>> state_of(started=True, stopping=False, retrying=None, batch_s=None)
('ready', '')
>>> state_of(started=True, stopping=False, retrying="Redis dedup lookup", batch_s=3.0)
('retrying', 'Redis dedup lookup')
>>> paths("join")
('/shadowpipe/join/ready', '/shadowpipe/join/stats')
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

from shadowpipe.processors.runtime import metrics
from shadowpipe.processors.runtime.loop import BatchLoop

STALL_S = 60.0  # a batch running longer than this (without a retry logged) is stalled
Readiness = tuple[str, str]  # (state, reason)


def paths(worker: str) -> tuple[str, str]:
    """The readiness and stats paths of ``worker``."""
    return f"/shadowpipe/{worker}/ready", f"/shadowpipe/{worker}/stats"


def state_of(*, started: bool, stopping: bool, retrying: str | None,
             batch_s: float | None) -> Readiness:
    """(state, reason): the readiness verdict of the module doc."""
    if stopping:
        return "stopping", "the worker is stopping"
    if retrying:
        return "retrying", retrying
    if batch_s is not None and batch_s > STALL_S:
        return "stalled", f"a batch has been running for {batch_s:.0f} s"
    if not started:
        return "starting", "the worker has not started consuming"
    return "ready", ""


def loop_readiness(loop: BatchLoop, retrying: str | None = None) -> Readiness:
    """The readiness of a batch loop (``retrying``: something else the worker waits for)."""
    started = loop.batch_started
    return state_of(started=loop.started, stopping=loop.stopping,
                    retrying=loop.retrying or retrying,
                    batch_s=time.monotonic() - started if started is not None else None)


def loop_lag(loop: BatchLoop) -> metrics.Lag:
    """The consumer lag per (topic, partition) of a threaded loop, for ``/metrics``."""
    return lambda: metrics.consumer_lag(
        dict(loop.source.highwater) if loop.source is not None else {}, dict(loop.positions))


def add_health(app: Any, worker: str, stats: Callable[[], dict[str, Any]],
               readiness: Callable[[], Readiness], stats_aliases: Sequence[str] = (),
               lag: metrics.Lag | None = None) -> None:
    """Serve ``worker``'s readiness and stats on ``app``'s web port (the stats also on
    ``stats_aliases``: older paths still in use), and both on ``/metrics`` with ``lag``
    (consumer lag per topic and partition, :func:`loop_lag`)."""
    ready_path, stats_path = paths(worker)

    def verdict() -> dict[str, Any]:
        state, reason = readiness()
        return {"ready": state == "ready", "state": state, "reason": reason}

    async def ready(web: Any, request: Any) -> Any:
        body = verdict()
        return web.json(body, status=200 if body["ready"] else 503)

    async def counters(web: Any, request: Any) -> Any:
        return web.json({**verdict(), **stats()})

    app.page(ready_path, name=f"{worker}_ready")(ready)
    for path in (stats_path, *stats_aliases):
        app.page(path, name=f"{worker}_stats")(counters)
    metrics.serve(app, worker, stats, readiness, lag)
