"""The one retry/backoff of the workers: 0.2 s doubling to 10 s, until it works or the
worker stops.

Every wait of a worker on something that comes back (Redis, ClickHouse, the broker's
acknowledgements) goes through :func:`retry`: nothing of the batch is committed meanwhile,
so a crash or a stop replays it (at-least-once). A stop ends the waiting: the ``pause``
raises :class:`Stopped`.

>>> calls = []
>>> def flaky():
...     calls.append(1)
...     if len(calls) < 3:
...         raise OSError("down")
...     return "up"
>>> retry(flaky, "lookup", errors=(OSError,), pause=lambda s: None)
'up'
>>> stop = threading.Event(); stop.set()
>>> def down():
...     raise OSError("down")
>>> retry(down, "lookup", errors=(OSError,), pause=pause_until(stop))
Traceback (most recent call last):
...
shadowpipe.processors.runtime.retry.Stopped: stopping during a retry
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")
FIRST_S = 0.2
MOST_S = 10.0
log = logging.getLogger("shadowpipe.retry")


class Stopped(Exception):
    """The worker is stopping: a retry gave up (nothing of its batch is committed)."""


def retry(fn: Callable[[], T], what: str, *, errors: tuple[type[BaseException], ...],
          pause: Callable[[float], None],
          on_error: Callable[[BaseException], None] | None = None,
          logger: logging.Logger = log, most_s: float = MOST_S) -> T:
    """``fn()`` until it returns; after each of ``errors``, ``on_error(exc)``, a warning
    naming ``what``, then ``pause(delay)`` (0.2 s doubling to ``most_s``), which raises
    :class:`Stopped` to give up. Other errors propagate at once."""
    delay = FIRST_S
    while True:
        try:
            return fn()
        except errors as exc:
            if on_error is not None:
                on_error(exc)
            text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            logger.warning("%s failed (retry in %.1fs): %s", what, delay, text)
            pause(delay)
            delay = min(delay * 2, most_s)


def pause_until(stop: threading.Event) -> Callable[[float], None]:
    """A ``pause`` for :func:`retry` that waits on ``stop`` and raises :class:`Stopped`
    once it is set."""
    def pause(seconds: float) -> None:
        if stop.wait(seconds):
            raise Stopped("stopping during a retry")
    return pause
