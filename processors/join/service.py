"""The joiner's consumer loop: take a micro-batch, merge, publish, flush, commit.

Why not a Faust stream: through a ``noack_take`` agent the joiner measured ~1,000 joined
records/s on the embedded broker (Faust's per-event machinery), against ~5x that for the
same :class:`~shadowpipe.processors.join.core.JoinCore` fed by librdkafka. So, like the
shadow worker, the hot path is a librdkafka consumer on one thread of the Faust worker,
which still owns the process, the web endpoint, the sweep timer and the lifecycle.

At-least-once, in the workers' one batch loop
(:class:`~shadowpipe.processors.runtime.loop.BatchLoop`): a batch's offsets are committed
only after its Redis merges are done and its outputs (joined records, dead letters) are
acknowledged by the broker. A Redis failure is logged, counted, and the same batch is
merged again with back-off (0.2 s to 10 s), never committed meanwhile; re-merging is safe
(a stored message re-emits the same versions). A delivery failure re-produces the batch's
outputs. A rebalance (inside ``consume``, on this thread) first settles the batch in
flight. Consumers share the group ``<topic_prefix>join``.

A Redis that comes back empty (see :mod:`~shadowpipe.processors.state_marker`) has lost the
pending requests: that is logged once and counted as ``redis_state_lost``; the loop goes on.
"""

from __future__ import annotations

import logging
from typing import Any

from shadowpipe.config import Settings
from shadowpipe.processors.join.core import BatchResult, JoinCore
from shadowpipe.processors.join.store import StoreError
from shadowpipe.processors.publisher import Publisher
from shadowpipe.processors.runtime.loop import BatchLoop, Handler, KafkaSource, Outputs
from shadowpipe.processors.runtime.loop import produce as produce_outputs
from shadowpipe.processors.runtime.message import Message
from shadowpipe.processors.state_marker import StateMarker, has_committed_offsets

log = logging.getLogger("shadowpipe.join")
BATCH_SIZE = 1000  # with publishing overlapped, 500-2000 measured the same throughput
BATCH_WAIT_S = 0.05
INPUT_KINDS = ("inference", "predictions", "feedback")
CONSUMER_OVERRIDES: dict[str, Any] = {
    "fetch.max.bytes": 64 * 1024 * 1024,
    "max.partition.fetch.bytes": 8 * 1024 * 1024,
    # The embedded broker answers a fetch only at fetch.wait.max.ms when no new data
    # arrives meanwhile: keep it short.
    "fetch.wait.max.ms": 20,
    "fetch.error.backoff.ms": 20,
}
PRODUCER_OVERRIDES: dict[str, Any] = {"linger.ms": 2, "batch.num.messages": 10000}


def group_id(settings: Settings) -> str:
    """The consumer group of every joiner of a deployment.

    >>> group_id(Settings.load(env={}))
    'shadowpipe.join'
    """
    return f"{settings.topic_prefix}join"


def outputs(settings: Settings, result: BatchResult) -> Outputs:
    """A batch's records and dead letters by output topic."""
    return ((settings.topic("joined"), result.joined),
            (settings.topic("deadletter"), result.dead))


class JoinHandler(Handler):
    """The joiner in the batch loop: merge into Redis (retried while Redis is away)."""

    name = "join"
    transient = (StoreError,)

    def __init__(self, settings: Settings, core: JoinCore) -> None:
        self.settings = settings
        self.core = core
        self.topics = [settings.topic(kind) for kind in INPUT_KINDS]
        store = core.store
        self.marker = StateMarker(store.client, settings.topic_prefix, "join",
                                  witnesses=store.witnesses)
        core.counters.setdefault("redis_state_lost", 0)  # shown in the stats even when 0

    def process(self, batch: list[Message]) -> Outputs:
        self.check_state()
        return outputs(self.settings, self.core.process(batch))

    def retried(self, what: str, exc: BaseException) -> None:
        # A StoreError is counted by the core; nothing of the batch is committed.
        self.core.count(**{"batch_retries" if isinstance(exc, StoreError)
                           else "delivery_retries": 1})

    def starting(self) -> None:
        self.check_state()

    def check_state(self) -> None:
        """Count a Redis that came back without this deployment's pending requests (the
        marker logs it once); at most once a second, the first time before consuming."""
        s = self.settings
        if self.marker.check(lambda: has_committed_offsets(s, [group_id(s)], self.topics)):
            self.core.count(redis_state_lost=1)
            self.core.store.layouts.resave()


def join_loop(settings: Settings, core: JoinCore) -> BatchLoop:
    """The joiner's loop over the three input topics (run it on a thread)."""
    s = settings
    handler = JoinHandler(s, core)
    source = KafkaSource(s, group_id(s), handler.topics, BATCH_SIZE, BATCH_WAIT_S,
                         **CONSUMER_OVERRIDES)
    return BatchLoop(handler, lambda: Publisher(s, **PRODUCER_OVERRIDES), source)


def produce(publisher: Publisher, settings: Settings, result: BatchResult) -> None:
    """Queue a batch's records and dead letters (confirm with ``publisher.flush_sync``)."""
    produce_outputs(publisher, outputs(settings, result))


def sweep_once(core: JoinCore, publisher: Publisher, settings: Settings) -> int:
    """One sweep round: claim due requests, publish their orphans, bury them; how many."""
    claim, result = core.sweep()
    produce(publisher, settings, result)
    publisher.flush_sync()
    core.finish(claim)
    return claim.handled
