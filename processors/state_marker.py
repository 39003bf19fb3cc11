"""Notice a Redis that lost a deployment's state, and say so once.

Redis holds what Kafka offsets do not: the joiner's pending requests (parts waiting for
their prediction or label) and the monitor's checkpoint (open windows, detectors,
cooldowns, counted facts). If Redis comes back empty (a restart without persistence, a
``FLUSHALL``, a failover to an empty replica) while the consumer offsets stay committed,
that state is gone and the workers would carry on as if nothing happened.

So the first worker of a deployment writes a marker key, ``<topic_prefix>state:epoch``
(a random epoch, ``SET NX``, no expiry). A worker reads it at start-up and then at most
once a second while it runs. State is lost when the marker is gone (or was replaced by
another worker that found it gone) while the worker holds state: it saw the marker
before, or at start-up its consumer group has committed offsets and none of its own
state keys exist (a deployment upgraded from before the marker keeps its keys, so it is
not reported). The worker then logs one error line naming what was lost and what to do,
counts it (``redis_state_lost`` in its stats) and writes a new epoch.

>>> marker_key("demo-7.")
'demo-7.state:epoch'
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any

from shadowpipe.config import Settings

log = logging.getLogger("shadowpipe.state")
CHECK_EVERY_S = 1.0
# What each worker loses with Redis's keyspace, and so what a user should expect.
LOST = {
    "join": "requests waiting for their prediction or label were dropped: their late parts "
            "come out as orphans, and parts seen before the loss are never joined",
    "monitor": "its checkpoint (open windows, drift detectors, alert cooldowns, counted "
               "facts) was dropped: open windows and detectors restart from empty",
}
ADVICE = ("run Redis with appendonly yes, appendfsync everysec and maxmemory-policy "
          "noeviction (docs/joiner.md, 'Redis in production')")


def marker_key(topic_prefix: str) -> str:
    """The marker of a deployment (one per topic prefix).

    >>> marker_key("shadowpipe.")
    'shadowpipe.state:epoch'
    """
    return f"{topic_prefix}state:epoch"


class StateMarker:
    """The marker as seen by one worker (``service``: a key of :data:`LOST`).

    ``witnesses`` are the worker's own state keys: if any exists at start-up, Redis did not
    lose the deployment's state, whatever the marker says.
    """

    def __init__(self, client: Any, topic_prefix: str, service: str,
                 witnesses: Sequence[str] = (), every_s: float = CHECK_EVERY_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.client = client
        self.key = marker_key(topic_prefix)
        self.service = service
        self.witnesses = list(witnesses)
        self.every_s = every_s
        self.clock = clock
        self.epoch: bytes | None = None
        self.lost = 0
        self._last = -float("inf")  # when the marker was last read

    def check(self, holds_state: Callable[[], bool] = lambda: False) -> bool:
        """True (once per loss) when Redis lost the deployment's state; logged and counted.

        ``holds_state`` is asked only while the worker has not seen the marker yet (at
        start-up): whether it has committed offsets. Redis errors count as "no news": the
        caller's own retries deal with an unreachable Redis.
        """
        import redis

        now = self.clock()
        if self.epoch is not None and now - self._last < self.every_s:
            return False
        self._last = now
        try:
            return self._check(holds_state)
        except redis.RedisError as exc:
            log.debug("state marker not checked: %s", exc)
            return False

    def _check(self, holds_state: Callable[[], bool]) -> bool:
        current = self.client.get(self.key)
        if current is not None and current == self.epoch:
            return False
        if current is not None:
            lost, why = self.epoch is not None, "was written anew by another worker"
            self.epoch = current
        else:
            if self.epoch is not None:
                lost, why = True, "is gone"
            else:
                lost = holds_state() and not (self.witnesses and self.client.exists(
                    *self.witnesses))
                why = "is missing while its consumer group has committed offsets"
            self.epoch = self._write()
        if lost:
            self.lost += 1
            log.error("Redis lost the %s state of deployment %r (marker %s %s): %s; %s",
                      self.service, self.key.removesuffix("state:epoch"), self.key, why,
                      LOST[self.service], ADVICE)
        return lost

    def _write(self) -> bytes:
        """A new epoch, or the one another worker wrote first."""
        epoch = uuid.uuid4().hex.encode()
        if self.client.set(self.key, epoch, nx=True):
            return epoch
        return self.client.get(self.key) or epoch


def has_committed_offsets(settings: Settings, groups: Sequence[str], topics: Sequence[str],
                          timeout_s: float = 10.0) -> bool:
    """True when any of ``groups`` has a committed offset on any partition of ``topics``
    (an offset fetch: no group is joined)."""
    from confluent_kafka import KafkaException, TopicPartition

    from shadowpipe import kafka

    for group in groups:
        consumer = kafka.consumer(settings, group)
        try:
            meta = consumer.list_topics(timeout=timeout_s).topics
            tps = [TopicPartition(t, p) for t in topics if t in meta
                   for p in meta[t].partitions]
            if tps and any(tp.offset >= 0 for tp in consumer.committed(tps, timeout=timeout_s)):
                return True
        except KafkaException as exc:  # the worker's own start-up check names the setting
            log.warning("committed offsets of %s unknown: %s", group, exc)
        finally:
            consumer.close()
    return False


def monitor_groups(settings: Settings) -> list[str]:
    """The consumer groups a monitor runs in: its own, or (earlier releases, a Faust agent)
    alone or in ``worker all``.

    >>> monitor_groups(Settings.load(env={}))
    ['shadowpipe.monitor', 'shadowpipe.worker-monitor', 'shadowpipe.worker-shadow-join-monitor']
    """
    from shadowpipe.processors.app import app_id
    from shadowpipe.processors.worker import PROCESSORS

    return [f"{settings.topic_prefix}monitor", app_id(settings, ("monitor",)),
            app_id(settings, PROCESSORS)]


def monitor_marker(client: Any, settings: Settings, checkpoint_key: str) -> StateMarker:
    """The monitor's marker; its start-up check asks the joined topic's committed offsets."""
    return StateMarker(client, settings.topic_prefix, "monitor", witnesses=(checkpoint_key,))


def monitor_holds_state(settings: Settings) -> Callable[[], bool]:
    """Whether a monitor of this deployment has committed offsets (asked lazily)."""
    return lambda: has_committed_offsets(settings, monitor_groups(settings),
                                         [settings.topic("joined")])
