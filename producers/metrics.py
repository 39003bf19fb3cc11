"""Prometheus metrics of the emitters, when ``prometheus-client`` is installed.

The base install does not need it. The counters are read from :meth:`Emitter.stats` at
scrape time by one collector registered in the default registry, so emitting costs
nothing extra. Families (label ``emitter``, plus ``reason`` where it applies):
``shadowpipe_producer_sent_total``, ``_delivered_total``, ``_sampled_out_total``,
``_dropped_total``, ``_failed_total`` and the gauge ``shadowpipe_producer_queued``.
Expose them as usual, e.g. ``prometheus_client.start_http_server(9100)``.

>>> from prometheus_client import generate_latest
>>> from shadowpipe.producers.emitter import EmitterStats
>>> class Source:  # anything with a name and stats(), like an Emitter
...     name = "doc"
...     def stats(self):
...         return EmitterStats(sent=3, delivered=2, queued=1, sampled_out=0,
...                             dropped={"queue_full": 4})
>>> source = Source()
>>> watch(source)
True
>>> line = b'shadowpipe_producer_dropped_total{emitter="doc",reason="queue_full"} 4.0'
>>> line in generate_latest()
True
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Iterator
from typing import Any

_emitters: weakref.WeakSet[Any] = weakref.WeakSet()
_lock = threading.Lock()
_registered = False


def watch(emitter: Any) -> bool:
    """Report ``emitter`` (anything with ``name`` and ``stats()``); False without
    prometheus-client."""
    global _registered
    try:
        from prometheus_client.core import REGISTRY
    except ImportError:
        return False
    with _lock:
        _emitters.add(emitter)
        if not _registered:
            REGISTRY.register(_Collector())
            _registered = True
    return True


class _Collector:
    """Sums the stats of live emitters per emitter name at each scrape."""

    def describe(self) -> list[Any]:
        return []

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        prefix = "shadowpipe_producer_"
        plain = {
            "sent": CounterMetricFamily(prefix + "sent", "events queued", labels=["emitter"]),
            "delivered": CounterMetricFamily(
                prefix + "delivered", "events acknowledged by the broker", labels=["emitter"]),
            "sampled_out": CounterMetricFamily(
                prefix + "sampled_out", "events not sent by sampling", labels=["emitter"]),
            "queued": GaugeMetricFamily(
                prefix + "queued", "events waiting for the broker", labels=["emitter"]),
        }
        by_reason = {
            "dropped": CounterMetricFamily(
                prefix + "dropped", "events never queued", labels=["emitter", "reason"]),
            "failed": CounterMetricFamily(
                prefix + "failed", "events queued but not delivered",
                labels=["emitter", "reason"]),
        }
        totals: dict[str, dict[str, Any]] = {}
        for emitter in list(_emitters):
            stats = emitter.stats()
            total = totals.setdefault(emitter.name, {"dropped": {}, "failed": {}})
            for attr in plain:
                total[attr] = total.get(attr, 0) + getattr(stats, attr)
            for attr in by_reason:
                for reason, count in getattr(stats, attr).items():
                    total[attr][reason] = total[attr].get(reason, 0) + count
        for name, total in totals.items():
            for attr, family in plain.items():
                family.add_metric([name], total[attr])
            for attr, family in by_reason.items():
                for reason, count in total[attr].items():
                    family.add_metric([name, reason], count)
        yield from plain.values()
        yield from by_reason.values()
