"""The emitter: one per process, sends inference and feedback events without ever
raising into, or blocking, the service that calls it.

Hot path of an emit call, all on the caller's thread (~4 us with 20 features in a tight
loop, 1.5-3x that right after other work: caches go cold, see docs/producer.md):
validate and sample, encode, hand the bytes to librdkafka's ``produce()``, which only
enqueues. Inference events are *staged* and handed to ``produce()`` in bursts, where it
runs warmer; :class:`~.staging.BurstPolicy` decides when (once 16 are staged, on the first
call whose ``latency_ms`` is at most the running mean: a request with time to spare, not
one on the service's slow tail; at the latest at 64 staged or 100 ms) and when a burst also
serves librdkafka's reports on the caller's thread, which holds the GIL anyway (on one of
the quickest fifth of requests, or the 8th burst without). The emitter's thread hands the
stage over when no event came for 0.2 s. A plain ``emit_inference`` (unsampled model, no
``ts``, plain inputs) encodes and stages in one C call (``FastEmit``, producers/_encode.c,
which is also the stage); every other call runs the Python method below, with the
specialised writer of :mod:`.events` where the C encoder declines, and stages through the
same stage. Without the C extension the same policy drives :class:`~.staging.Stage`: the
same decisions, slower calls. Feedback events are produced at once; every 16th serves the
reports. Compression, batching, sending and retries happen on librdkafka's threads.
Only failed deliveries reach the emitter's callback (``delivery.report.only.error``;
the client still takes the GIL per report to discard a success). ``delivered`` counts the
broker's acknowledgements from librdkafka's statistics (every second, per partition: the
highest acknowledged message id of the idempotent producer; :mod:`.acks`), without a
per-message Python call; with idempotence turned off in ``kafka_overrides`` the successes
are reported and counted one by one instead.

Memory is bounded by ``producer_max_buffer_bytes``: librdkafka's queue is limited in
bytes (three quarters) and in messages (the rest, at ~256 bytes of bookkeeping each);
when it is full the event is dropped and counted as ``queue_full`` (by the C path
itself for a plain call, so that an outage costs a service little; logged by the emitter's
thread), or, with ``producer_block_ms``, after waiting at most that long for space. Staged
events (at most 64) count against that bound; one that librdkafka refuses when its burst is
produced counts as failed (``queue_full``).
"""

from __future__ import annotations

import asyncio
import atexit
import itertools
import logging
import math
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, TypeVar

from confluent_kafka import KafkaError, KafkaException, Message, Producer

from shadowpipe.config import ConfigError, Settings, env_name
from shadowpipe.kafka import PRODUCER_DEFAULTS
from shadowpipe.producers import metrics
from shadowpipe.producers.acks import STATS_INTERVAL_MS, Acks
from shadowpipe.producers.events import (
    EventEncoder,
    Invalid,
    Privacy,
    reason_of,
)
from shadowpipe.producers.staging import STAGE_WAIT_MS, BurstPolicy, Stage
from shadowpipe.sampling import SampleRates, sampled_below, threshold
from shadowpipe.schemas.codec import Codec

try:  # emit_inference's plain case and the stage in C (producers/_encode.c); optional
    from shadowpipe.producers._encode import fast_emitter
except ImportError:
    fast_emitter = None

log = logging.getLogger("shadowpipe.producers")
_LIBRDKAFKA_LOG = logging.getLogger("shadowpipe.producers.librdkafka")
_PER_MESSAGE_OVERHEAD = 256
_LOG_EVERY_S = 60.0
# The client takes the GIL for every delivery report, even a success it then discards.
# Served by the emitting thread, which holds the GIL anyway (after a burst when the policy
# says so, every 16th feedback event); a thread parked in poll() would take it from the
# service once per message (docs/producer.md).
_SERVE_EVERY_MASK = 15
_POLL_EVERY_S = 0.2
_F = TypeVar("_F", bound=Callable[..., Any])


@dataclass(frozen=True)
class EmitterStats:
    """A snapshot of an emitter's counters.

    ``sent`` were accepted by the local queue; ``delivered`` acknowledged by the broker
    (acks=all; as of librdkafka's latest statistics, at most ~1.2 s old, exact after
    :meth:`Emitter.close`); ``queued`` still waiting; ``dropped`` never queued (invalid input,
    full queue, closed emitter) and ``failed`` queued but not delivered, by reason.
    """

    sent: int
    delivered: int
    queued: int
    sampled_out: int
    dropped: dict[str, int] = field(default_factory=dict)
    failed: dict[str, int] = field(default_factory=dict)

    @property
    def dropped_total(self) -> int:
        return sum(self.dropped.values())

    @property
    def failed_total(self) -> int:
        return sum(self.failed.values())


class _RateLimitedLog:
    """Logs each key at most once per minute, with the count since the last line.

    Also serves as librdkafka's ``logger`` (its ``log(level, fmt, *args)`` calls, keyed by
    facility), so a broker outage does not flood the service's logs.
    """

    def __init__(self, target: logging.Logger) -> None:
        self._target = target
        self._last: dict[str, tuple[float, int]] = {}

    def due(self, key: str) -> bool:
        """True when ``key`` may be logged now (counts the suppressed ones)."""
        now = time.monotonic()
        last, suppressed = self._last.get(key, (-math.inf, 0))
        if now - last < _LOG_EVERY_S:
            self._last[key] = (last, suppressed + 1)
            return False
        self._last[key] = (now, 0)
        return True

    def __call__(self, key: str, message: str, *args: Any) -> None:
        if self.due(key):
            self._target.warning(message + "; logged at most once a minute", *args)

    def log(self, level: int, fmt: str, *args: Any) -> None:
        if self.due(str(args[0]) if args else fmt):
            self._target.log(level, fmt, *args)


def _privacy(settings: Settings) -> Privacy:
    drop, hashed = set(settings.producer_drop_fields), set(settings.producer_hash_fields)
    if hashed and not settings.producer_hash_key:
        raise ConfigError(
            env_name("producer_hash_key"),
            f"required when {env_name('producer_hash_fields')} is set",
        )
    if drop & hashed:
        raise ConfigError(
            env_name("producer_hash_fields"),
            f"{sorted(drop & hashed)} also in {env_name('producer_drop_fields')}",
        )
    return Privacy(frozenset(drop), frozenset(hashed), settings.producer_hash_key.encode())


def wire_headers(settings: Settings) -> tuple[bytes, bytes]:
    """Framing prefixes (inference, feedback): single-object, or Confluent with the
    registry ids resolved once here (registration is idempotent for the same schema)."""
    codec = Codec(settings.schema_registry_url)
    try:
        return codec.header("InferenceEvent"), codec.header("Feedback")
    except (OSError, ValueError, KeyError) as exc:
        raise ConfigError(
            env_name("schema_registry_url"), f"cannot register the schemas: {exc}"
        ) from None


def max_messages(settings: Settings) -> int:
    """librdkafka's message count bound: a quarter of the budget at the overhead each."""
    return max(1, settings.producer_max_buffer_bytes // 4 // _PER_MESSAGE_OVERHEAD)


def producer_config(settings: Settings, **overrides: Any) -> dict[str, Any]:
    """librdkafka configuration: production defaults plus the memory bound."""
    budget = settings.producer_max_buffer_bytes
    return settings.kafka_config(**{
        **PRODUCER_DEFAULTS,
        "queue.buffering.max.kbytes": max(1, budget * 3 // 4 // 1024),
        "queue.buffering.max.messages": max_messages(settings),
        # Shadow events can wait: librdkafka costs ~2 us/event at 1 s, ~60 at 5 ms (1k/s).
        "linger.ms": 1000,
        "delivery.report.only.error": True,
        "logger": _RateLimitedLog(_LIBRDKAFKA_LOG),
        **overrides,
    })


def _count_value(counter: itertools.count) -> int:
    """How many times ``next`` was called on ``itertools.count(1)`` (its repr holds the
    next value; the only read that is not pickling, deprecated since Python 3.12).

    >>> counter = itertools.count(1); _ = next(counter), next(counter)
    >>> _count_value(counter)
    2
    """
    return int(repr(counter)[6:-1]) - 1


def _key(request_id: Any) -> bytes:
    """The request id's UTF-8 bytes (the message key), or Invalid."""
    if not isinstance(request_id, str):
        raise Invalid("missing_request_id" if request_id is None else "invalid_request_id")
    if not request_id.strip():
        raise Invalid("missing_request_id")
    return request_id.encode()


def _millis(ts: Any) -> int:
    """Event time in ms since the epoch: now, a datetime, or a number of milliseconds."""
    if ts is None:
        return time.time_ns() // 1_000_000
    if isinstance(ts, datetime):
        return math.floor(ts.timestamp() * 1000)
    if ts - ts != 0:
        raise Invalid("non_finite")
    return math.floor(ts)


class Emitter:
    """Emits events to the inference and feedback topics. Create one per process.

    ``overrides`` replace :class:`~shadowpipe.config.Settings` fields (for instance
    ``producer_sample_rates=("*=0.1",)``); ``kafka_overrides`` replace librdkafka keys.
    Construction raises :class:`~shadowpipe.config.ConfigError` for bad settings; after
    that no method raises: every emit returns True when the event was queued for
    sending and False when it was sampled out or dropped (see :meth:`stats`).

    >>> from shadowpipe.config import Settings
    >>> settings = Settings.load(env={"SHADOWPIPE_KAFKA_BOOTSTRAP": "127.0.0.1:9"})
    >>> emitter = Emitter(settings, kafka_overrides={"log_level": 0})
    >>> emitter.emit_inference("", {"x": 1.0}, "ok", model="m", version="1", latency_ms=1.0)
    False
    >>> emitter.emit_feedback("r1", "ok")
    True
    >>> emitter.close(timeout=0)  # nothing listens on port 9: the feedback is purged
    1
    >>> stats = emitter.stats()
    >>> stats.sent, stats.delivered, stats.dropped, stats.failed
    (1, 0, {'missing_request_id': 1}, {'purge_queue': 1})
    """

    def __init__(
        self,
        settings: Settings | None = None,
        *,
        name: str = "default",
        kafka_overrides: Mapping[str, Any] | None = None,
        exit_timeout_s: float = 5.0,
        **overrides: Any,
    ) -> None:
        settings = settings or Settings.load()
        self.settings = settings.replace(**overrides) if overrides else settings
        self.name = name
        self._rates = SampleRates.parse(self.settings.producer_sample_rates)
        self._encoder = EventEncoder(
            *wire_headers(self.settings), _privacy(self.settings),
            self.settings.producer_max_event_bytes,
        )
        self._inference_topic = self.settings.topic("inference")
        self._feedback_topic = self.settings.topic("feedback")
        self._block_s = self.settings.producer_block_ms / 1000
        # (model, version) -> (inclusion probability, sampling threshold, encoded fields)
        self._models: dict[tuple[Any, Any], tuple[float, bytes | None, bytes]] = {}
        self._lock = threading.Lock()
        # next() on a count is atomic under the GIL: no lock on the hot path.
        self._sent = itertools.count(1)
        self._sampled_out = 0
        self._dropped: dict[str, int] = {}
        self._failed: dict[str, int] = {}
        self._closed = False
        self._exit_timeout_s = exit_timeout_s
        self._log = _RateLimitedLog(log)
        self._acks = Acks()
        self._succeeded = itertools.count(1)  # one by one only without idempotence
        config = producer_config(self.settings, **{
            "on_delivery": self._on_delivery, "error_cb": self._on_error,
            "stats_cb": self._acks.snapshot, "statistics.interval.ms": STATS_INTERVAL_MS,
            "client.id": f"shadowpipe-{name}", **(kafka_overrides or {}),
        })
        # acked_msgid is kept by the idempotent producer only, and read from our statistics
        # callback: without either (overridden), successes are reported and counted.
        self._from_stats = (str(config.get("enable.idempotence")).lower() in ("true", "1")
                            and config.get("stats_cb") == self._acks.snapshot
                            and int(config.get("statistics.interval.ms", 0)) > 0)
        if not self._from_stats:
            config["delivery.report.only.error"] = False
        self._producer = Producer(config)
        self._max_messages = int(config["queue.buffering.max.messages"])
        self._produce = self._producer.produce
        self._stage = self._staging(int(config["queue.buffering.max.kbytes"]) * 1024)
        self._c_drops_logged = 0
        self._stop = threading.Event()
        self._poller = threading.Thread(
            target=self._poll_loop, name=f"shadowpipe-emitter-{name}", daemon=True
        )
        self._poller.start()
        atexit.register(self._close_at_exit)
        metrics.watch(self)

    def _staging(self, max_queue_bytes: int) -> Any:
        """The stage of inference events: the compiled one, which also takes the plain
        ``emit_inference`` call, or its Python twin; one :class:`BurstPolicy` either way."""
        policy = BurstPolicy(STAGE_WAIT_MS)
        if self._encoder.compiled is None or fast_emitter is None:
            return Stage(policy, self._producer, self._inference_topic, self._serve_reports,
                         self._refused_at_hand_over, self._sent, self._max_messages,
                         max_queue_bytes)
        # The instance attribute shadows the method below, which stays the reference:
        # every call that is not the plain case is handed to it unchanged.
        self.emit_inference = stage = fast_emitter(  # type: ignore[method-assign]
            type(self).emit_inference.__get__(self), self._models,
            self._encoder.inference_header, self._encoder.max_bytes, policy,
            self._inference_topic, self._producer, self._serve_reports,
            self._refused_at_hand_over, not self._block_s, self._sent, self._max_messages,
            max_queue_bytes,
        )
        return stage

    # -- emitting -------------------------------------------------------------------------

    def emit_inference(
        self,
        request_id: str,
        features: Mapping[str, Any] | None,
        output: Any,
        *,
        model: str,
        version: str,
        latency_ms: float,
        context: Mapping[str, str] | None = None,
        ts: datetime | float | None = None,
        trace_id: str | None = None,
    ) -> bool:
        """Queue one prediction of ``model``; True if queued. Never raises.

        ``features``: name -> number, string or None; ``output``: a label, a regression
        value or ``{"label", "probabilities", "value"}``; ``ts``: datetime or epoch ms
        (default now). Rules in :mod:`shadowpipe.producers.events`.
        """
        try:
            if self._closed:
                raise Invalid("closed")
            if type(request_id) is str and request_id and not request_id.isspace():
                key = request_id.encode()
            else:
                key = _key(request_id)
            rate, bound, model_version = (
                self._models.get((model, version)) or self._model(model, version))
            if bound is not None and not sampled_below(key, bound):
                return self._skip()
            if not self._block_s and self._queue_full():
                return self._drop("queue_full")  # full: spend neither encoding nor a raise
            event_time = time.time_ns() // 1_000_000 if ts is None else _millis(ts)
            data = self._encoder.encoded_model_inference(
                key, features, output, model_version, latency_ms, context, event_time, rate,
                trace_id,
            )
            if self._stage.add(data, key, float(latency_ms)):  # counted as sent there
                return True
            if not self._block_s or not self._retry_until_space(self._inference_topic, key, data):
                return self._drop("queue_full")
        except Exception as exc:  # the caller must never see an exception
            return self._drop(reason_of(exc), exc)
        next(self._sent)
        return True

    def emit_feedback(
        self,
        request_id: str,
        label: Any,
        *,
        ts: datetime | float | None = None,
        source: str = "explicit",
        weight: float = 1.0,
        value: float | None = None,
        model: str | None = None,
    ) -> bool:
        """Queue the real outcome of ``request_id``; True if queued. Never raises.

        ``label`` as in outputs (a float is the regression ``value``); sampled with the
        same hash as the inference, at ``model``'s rate or, without ``model``, the
        highest configured rate (:class:`~shadowpipe.sampling.SampleRates`).
        """
        try:
            if self._closed:
                raise Invalid("closed")
            key = _key(request_id)
            rate = self._rates.feedback_rate(model)
            bound = threshold(rate)
            if bound is not None and not sampled_below(key, bound):
                return self._skip()
            if not self._block_s and self._queue_full():
                return self._drop("queue_full")  # the staged events have their places
            data = self._encoder.feedback(
                key, label, value=value, event_time=_millis(ts), source=source,
                weight=weight, inclusion_prob=rate,
            )
            self._produce(self._feedback_topic, data, key)
        except BufferError:
            if not self._block_s or not self._retry_until_space(self._feedback_topic, key, data):
                return self._drop("queue_full")
        except KafkaException as exc:
            return self._drop("produce_error", exc)
        except Exception as exc:  # the caller must never see an exception
            return self._drop(reason_of(exc), exc)
        if not next(self._sent) & _SERVE_EVERY_MASK:
            self._serve_reports()
        return True

    def _model(self, model: Any, version: Any) -> tuple[float, bytes | None, bytes]:
        """(rate, threshold, encoded fields) of ``model`` at ``version``, memoised."""
        if type(model) is not str:
            raise Invalid("unsupported_type")
        model_version = self._encoder.model_version(model, version)
        if len(self._models) >= 1024:
            self._models.clear()
        rate = self._rates.rate(model)
        cached = self._models[model, version] = (rate, threshold(rate), model_version)
        return cached

    def _retry_until_space(self, topic: str, key: bytes | str, data: bytes) -> bool:
        """Serve librdkafka for at most ``producer_block_ms`` while the queue is full."""
        deadline = time.monotonic() + self._block_s
        while (left := deadline - time.monotonic()) > 0:
            try:
                self._producer.poll(min(left, 0.01))
                self._produce(topic, data, key)
                return True
            except BufferError:
                continue
            except Exception:
                return False
        return False

    def _queue_full(self) -> bool:
        """librdkafka's queue has no room for one more event besides the staged ones."""
        return len(self._producer) + self._stage.staged >= self._max_messages

    def _skip(self) -> bool:
        with self._lock:
            self._sampled_out += 1
        return False

    def _drop(self, reason: str, exc: Exception | None = None) -> bool:
        with self._lock:
            self._dropped[reason] = self._dropped.get(reason, 0) + 1
        if self._log.due(reason):  # formatting only when it is logged
            shown = exc is not None and not isinstance(exc, Invalid)
            detail = f": {type(exc).__name__}: {exc}" if shown else ""
            log.warning("shadowpipe emitter %s: event dropped (%s)%s; logged at most once a "
                        "minute per reason", self.name, reason, detail)
        return False

    # -- librdkafka callbacks (on the poll thread) -----------------------------------------

    def _on_delivery(self, err: KafkaError | None, msg: Message) -> None:
        if err is None:  # reported only when idempotence is off (no acked_msgid then)
            next(self._succeeded)  # atomic under the GIL, like _sent
            return
        self._acks.failed(msg.topic(), msg.partition())
        self._fail(err.name().lstrip("_").lower(), err.str())

    def _refused_at_hand_over(self, data: bytes, key: str, exc: BaseException | None) -> None:
        """A staged event whose ``produce()`` raised: it was accepted (``sent``), so it
        is retried while ``producer_block_ms`` allows, else counted as failed."""
        full = isinstance(exc, BufferError)
        if full and self._block_s and self._retry_until_space(self._inference_topic, key, data):
            return
        self._fail("queue_full" if full else "produce_error", f"{type(exc).__name__}: {exc}")

    def _fail(self, reason: str, detail: str) -> None:
        with self._lock:
            self._failed[reason] = self._failed.get(reason, 0) + 1
        self._log("failed:" + reason, "shadowpipe emitter %s: delivery failed: %s", self.name,
                  detail)

    def _on_error(self, err: KafkaError) -> None:
        self._log("error:" + err.name(), "shadowpipe emitter %s: %s", self.name, err.str())

    def _serve_reports(self) -> None:
        """Serve librdkafka's reports on this thread (failures are counted here)."""
        try:
            self._producer.poll(0)
        except Exception:  # a callback bug must not kill delivery accounting
            log.exception("shadowpipe emitter %s: poll failed", self.name)

    def _poll_loop(self) -> None:
        # Emitting threads serve reports as they go; this covers the quiet times only. While
        # they emit, a report served here would take the GIL from them once per message.
        seen = _count_value(self._sent)
        while not self._stop.wait(_POLL_EVERY_S):
            now = _count_value(self._sent)
            # No emit since the last look: hand the stage over (which serves the reports).
            if now == seen and not self._stage.hand_over():
                self._serve_reports()
            seen = now
            self._log_c_drops()

    def _log_c_drops(self) -> None:
        """Log queue_full drops counted by the compiled path (at most once a minute)."""
        drops = self._stage.full_drops
        if drops > self._c_drops_logged and self._log.due("queue_full"):
            log.warning("shadowpipe emitter %s: %d events dropped (queue_full); logged at most "
                        "once a minute per reason", self.name, drops - self._c_drops_logged)
            self._c_drops_logged = drops

    # -- state ----------------------------------------------------------------------------

    def stats(self) -> EmitterStats:
        """Counters now (cheap; safe from any thread; serves pending reports first)."""
        # Read in this order, every sent event is at least in one of the later figures:
        # delivered may lag by the events queued meanwhile, never run ahead.
        sent = _count_value(self._sent)
        if not self._closed:  # len() counts unserved reports and statistics as messages
            self._serve_reports()
        # Staged first: an event handed over in between is counted twice, never missed.
        queued = self._stage.staged + len(self._producer)
        with self._lock:
            failed, dropped = dict(self._failed), dict(self._dropped)
            sampled_out = self._sampled_out
        if full_drops := self._stage.full_drops:  # counted in C (outages)
            self._log_c_drops()
            dropped["queue_full"] = dropped.get("queue_full", 0) + full_drops
        delivered = (self._acks.delivered() if self._from_stats
                     else _count_value(self._succeeded))
        return EmitterStats(
            sent=sent,
            delivered=delivered,
            queued=queued,
            sampled_out=sampled_out,
            dropped=dropped,
            failed=failed,
        )

    def close(self, timeout: float = 10.0) -> int:
        """Deliver what is queued within ``timeout`` s; the rest is purged and counted as
        failed. Later emits are dropped (``closed``). Returns how many were purged."""
        with self._lock:
            if self._closed:
                return 0
            self._closed = True
        self._stage.close()
        atexit.unregister(self._close_at_exit)
        self._stop.set()
        self._poller.join()
        left = self._producer.flush(max(0.0, timeout))
        if left:
            self._producer.purge()
            self._producer.flush(1.0)  # serves the purged messages' failure reports
        if self._from_stats and _count_value(self._sent):
            self._final_statistics()
        # Ends librdkafka's statistics too: unserved, they would pile up (and count in len()).
        self._producer.close()
        return left

    def _final_statistics(self) -> None:
        """Wait for librdkafka's statistics taken after the last acknowledgement, so that
        ``delivered`` is exact once closed (at most one interval)."""
        seen = self._acks.seq  # statistics served by flush() may predate the last ack
        deadline = time.monotonic() + 2 * STATS_INTERVAL_MS / 1000 + 0.5
        while not self._acks.settled_since(seen) and time.monotonic() < deadline:
            self._producer.poll(0.05)

    async def aclose(self, timeout: float = 10.0) -> int:
        """:meth:`close` without blocking the event loop."""
        return await asyncio.get_running_loop().run_in_executor(None, self.close, timeout)

    def _close_at_exit(self) -> None:
        self.close(self._exit_timeout_s)

    def __enter__(self) -> Emitter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- wrapping predict functions ----------------------------------------------------

    def track(self, *, model: str, version: str, **options: Any) -> Callable[[_F], _F]:
        """Decorator emitting every call of a predict function; see
        :func:`shadowpipe.producers.tracking.track`."""
        from shadowpipe.producers.tracking import track

        return track(self, model=model, version=version, **options)

    def inference(self, *, model: str, version: str, **options: Any) -> Any:
        """Context manager timing and emitting one prediction; see
        :class:`shadowpipe.producers.tracking.InferenceCall`."""
        from shadowpipe.producers.tracking import InferenceCall

        return InferenceCall(self, model=model, version=version, **options)
