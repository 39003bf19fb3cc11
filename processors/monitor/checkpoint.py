"""The monitor's checkpoint format: a versioned header, then the pickled
:class:`~.core.MonitorState`.

A checkpoint is read back by whatever version of the worker starts next, so it says which
format it is in: ``shadowpipe-monitor-state/<version>\\n`` then the pickle. A version this
worker does not know (written by a newer release, or not a checkpoint at all) is refused
with one line naming the Redis key, before anything is unpickled; the unversioned pickles
of earlier releases (format 0) are migrated: read once, written back in the current format
at the next checkpoint.

>>> from shadowpipe.processors.monitor.core import MonitorState
>>> blob = dump(MonitorState(watermark=5))
>>> blob[:len(HEADER)] == HEADER, load(blob, "k").watermark
(True, 5)
>>> load(b"shadowpipe-monitor-state/9\\n...", "shadowpipe.monitor:state")
Traceback (most recent call last):
...
shadowpipe...CheckpointError: SHADOWPIPE_REDIS_URL [worker monitor]: ...format 9...
"""

from __future__ import annotations

import logging
import pickle

from shadowpipe.config import ConfigError, env_name
from shadowpipe.processors.monitor.core import MonitorState

log = logging.getLogger("shadowpipe.monitor")
FORMAT = 1
PREFIX = b"shadowpipe-monitor-state/"
HEADER = PREFIX + str(FORMAT).encode() + b"\n"
PICKLE_PROTO = b"\x80"  # how every pickle of protocol 2 and later starts (format 0)


class CheckpointError(ConfigError):
    """A checkpoint this worker cannot read: the start-up stops with one line (exit 2)."""

    def __init__(self, key: str, found: str) -> None:
        super().__init__(env_name("redis_url"), (
            f"the monitor checkpoint {key!r} is {found}; this worker reads format {FORMAT} "
            "(and migrates format 0): run the release that wrote it, or delete the key to "
            "start the windows and detectors afresh"), "worker monitor")


def dump(state: MonitorState) -> bytes:
    """The checkpoint of ``state``, in the current format."""
    return HEADER + pickle.dumps(state, protocol=pickle.HIGHEST_PROTOCOL)


def load(blob: bytes, key: str) -> MonitorState:
    """The state in checkpoint ``blob`` (read from Redis key ``key``); raises
    :class:`CheckpointError` for a format other than the current one or format 0."""
    if blob.startswith(HEADER):
        return _unpickle(blob[len(HEADER):], key)
    if blob.startswith(PREFIX):
        version = blob[len(PREFIX):].split(b"\n", 1)[0][:20].decode("ascii", "replace")
        raise CheckpointError(key, f"in format {version}")
    if blob.startswith(PICKLE_PROTO):
        log.warning("monitor checkpoint %s has no format header (format 0, an earlier "
                    "release): migrating it to format %d", key, FORMAT)
        return _unpickle(blob, key)
    raise CheckpointError(key, f"not a monitor checkpoint (it starts with {blob[:12]!r})")


def _unpickle(body: bytes, key: str) -> MonitorState:
    state = pickle.loads(body)  # noqa: S301 - our own format, checked above
    if not isinstance(state, MonitorState):
        raise CheckpointError(key, f"a pickled {type(state).__name__}, not a MonitorState")
    return state
