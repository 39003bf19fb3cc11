"""``shadowpipe bench emit``: what emitting costs a primary service.

One process simulates the service: a handler turns a request (20 numeric features and a
context) into a prediction with scikit-learn (a logistic regression averaged with a small
gradient-boosting ensemble, ~0.3-1 ms), then answers. Requests run in pairs, one
without and one with ``emit_inference`` to the real broker, in random order, so machine
noise hits both alike; every handler call is timed (wall clock and thread CPU).

* ``added_p99_us`` = p99 with emit - p99 without; ``throughput_ratio`` = time per request
  without / with; ``emit_cpu_us_per_event`` = the handler thread's extra CPU per emitting
  request + all CPU of the other threads (librdkafka's, the poller) during the run and the
  final flush, per event; ``emit_call_*`` time the emit call alone (the handler without
  emit runs the same timing code around nothing, so ``added_*`` is not the timer's cost).
* ``added_p99_ci95_us``: how far ``added_p99_us`` would move in another run of the same
  length (a 95 % bootstrap interval over the request pairs). A p99 of a few hundred
  microseconds that machine noise spreads over a millisecond is hard to pin: at 20,000
  pairs the interval here is ~50 us wide, hence the default of 50,000.
* Without ``--broker-down`` the broker of the settings is used if it answers (topics under
  a fresh prefix, deleted after), else an embedded stack is started on free ports in a
  temporary directory and stopped after.
* ``--broker-down`` points at a port where nothing listens, with the buffer bound capped
  at 4 MiB so the run fills it: events are dropped (``queue_full``) or, at close, purged
  (``failed``); ``unaccounted`` must be 0 and ``rss_growth_bytes`` stay under the bound.
* ``cpu_steal_pct``: the share of the machine's CPU time the hypervisor gave to other
  guests during the run (Linux; None elsewhere). A few percent already spreads the tail
  of a ~1 ms handler by hundreds of microseconds: read ``added_p99_*`` with it.
* ``--plot FILE`` also draws the handler's latency by quantile with and without emit, and
  what emit adds at each quantile (SVG or PNG, by the file's extension).

Progress goes to stderr, one JSON object to stdout.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import random
import resource
import sys
import time
import uuid
from array import array
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from shadowpipe.config import Settings
from shadowpipe.stack import free_port, reachable_or_embedded

FEATURES = 20
DOWN_BUFFER_BYTES = 4 << 20
TARGETS = {"throughput_ratio": 0.97, "added_p99_us": 25.0, "emit_cpu_us_per_event": 25.0}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of ``shadowpipe bench emit`` (name and help: ``shadowpipe.cli.BENCHES``)."""
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--broker-down", action="store_true",
                        help="emit to an address where nothing listens")
    parser.add_argument("--requests", type=int, default=50_000,
                        help="requests per mode (with and without emit)")
    parser.add_argument("--plot", metavar="FILE",
                        help="also draw latency by quantile with and without emit (.svg/.png)")
    parser.set_defaults(func=run)


def _progress(message: str) -> None:
    print(f"bench emit: {message}", file=sys.stderr, flush=True)


def _cpu_ticks() -> tuple[int, int] | None:
    """(steal, total) jiffies of this machine, or None off Linux."""
    try:
        with open("/proc/stat") as stat:
            fields = [int(x) for x in stat.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    return (fields[7] if len(fields) > 7 else 0), sum(fields[:8])


def _steal_pct(before: tuple[int, int] | None, after: tuple[int, int] | None) -> float | None:
    """Share of the machine's CPU time the hypervisor gave to others meanwhile.

    >>> _steal_pct((10, 1000), (30, 2000))
    2.0
    """
    if before is None or after is None or after[1] <= before[1]:
        return None
    return round(100 * (after[0] - before[0]) / (after[1] - before[1]), 2)


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:  # not Linux: peak RSS is the best available figure
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


@contextlib.contextmanager
def _broker(settings: Settings, down: bool) -> Iterator[tuple[Settings, str]]:
    """Settings of a broker for the run (and what it is), cleaned up after."""
    if down:
        yield settings.replace(
            kafka_bootstrap=f"127.0.0.1:{free_port()}",
            producer_max_buffer_bytes=min(settings.producer_max_buffer_bytes, DOWN_BUFFER_BYTES),
        ), "nothing listening"
        return
    from shadowpipe import kafka

    with reachable_or_embedded(settings, "bench emit", _progress, redis=False) as live:
        if live is not settings:
            yield live, f"embedded tansu at {live.kafka_bootstrap}"
            return
        run = live.replace(topic_prefix=f"{live.topic_prefix}bench-{uuid.uuid4().hex[:8]}.")
        kafka.ensure_topics(run)
        try:
            yield run, f"settings' broker {live.kafka_bootstrap}"
        finally:
            names = [run.topic("inference"), run.topic("feedback")]
            kafka.admin(run).delete_topics(names, operation_timeout=10)


def _model() -> Callable[[Any], Any]:
    """predict_proba of a fitted logistic regression averaged with gradient boosting."""
    import numpy as np
    from sklearn.ensemble import GradientBoostingClassifier
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(7)
    x = rng.normal(size=(4000, FEATURES))
    y = (x[:, 0] + 0.5 * x[:, 1] - 0.3 * x[:, 2] + rng.normal(size=len(x)) > 0).astype(int)
    models = [LogisticRegression().fit(x, y),
              GradientBoostingClassifier(n_estimators=30, max_depth=3, random_state=7).fit(x, y)]

    def predict(row: Any) -> Any:
        return sum(m.predict_proba(row)[0] for m in models) / len(models)

    return predict


def _requests(count: int) -> list[tuple[str, dict[str, float], dict[str, str]]]:
    rng = random.Random(11)
    names = [f"feature_{i:02d}" for i in range(FEATURES)]
    countries, devices = ("DE", "FR", "US", "BR", "IN"), ("ios", "android", "web")
    return [
        (uuid.UUID(int=rng.getrandbits(128)).hex,
         {name: rng.gauss(0.0, 1.0) for name in names},
         {"country": rng.choice(countries), "device": rng.choice(devices)})
        for _ in range(count)
    ]


def _percentile(values: Sequence[float], pct: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(pct / 100 * (len(ordered) - 1))))]


def run(args: argparse.Namespace, settings: Settings) -> int:
    import numpy as np

    from shadowpipe.producers.emitter import Emitter

    predict = _model()
    requests = _requests(2 * args.requests)
    with _broker(settings, args.broker_down) as (run_settings, broker):
        emitter = Emitter(run_settings, name="bench")
        exceptions = 0
        # Pre-sized, no per-sample objects: the RSS growth measured is the emitter's.
        emit_call_ns, timer_ns = array("q", bytes(8 * len(requests))), array("q", bytes(8))
        calls = 0

        def handle(request: tuple[str, dict[str, float], dict[str, str]], emit: bool) -> Any:
            nonlocal exceptions, calls
            request_id, features, context = request
            start = time.perf_counter()
            row = np.fromiter(features.values(), dtype=float, count=FEATURES).reshape(1, -1)
            proba = predict(row)
            output = {"label": "1" if proba[1] >= 0.5 else "0",
                      "probabilities": {"0": float(proba[0]), "1": float(proba[1])}}
            if emit:
                latency_ms = (time.perf_counter() - start) * 1000.0
                before = time.perf_counter_ns()
                try:
                    emitter.emit_inference(request_id, features, output, model="bench",
                                           version="1", latency_ms=latency_ms, context=context)
                except Exception:  # counted: the guarantee is that this stays 0
                    exceptions += 1
                emit_call_ns[calls] = time.perf_counter_ns() - before
                calls += 1
            else:  # the same timing code around nothing: only the emit call differs
                before = time.perf_counter_ns()
                timer_ns[0] = time.perf_counter_ns() - before
            return output

        figures = _measure(handle, requests, _progress)
        del emit_call_ns[calls:]
        base_ns, emit_ns = figures.pop("base_ns"), figures.pop("emit_ns")
        rss_before = figures.pop("rss_before")
        rss_peak = max(figures.pop("rss_samples"), default=0)
        _progress("closing the emitter (flush)")
        close_cpu = time.process_time()
        purged = emitter.close(timeout=0.0 if args.broker_down else 30.0)
        close_cpu = time.process_time() - close_cpu
        stats = emitter.stats()
    emitted = len(emit_call_ns)
    # Everything emitting costs the process: the handler's extra CPU, the other threads'
    # CPU during the run, and the final flush.
    cpu_per_event = (figures["handler_cpu_added_us"] + figures["other_threads_cpu_us"]
                     + close_cpu / max(1, figures["requests"]) * 1e6)
    result = {
        **figures,
        "emit_cpu_us_per_event": cpu_per_event,
        "emit_call_p50_us": _percentile(emit_call_ns, 50) / 1000,
        "emit_call_p99_us": _percentile(emit_call_ns, 99) / 1000,
        "emit_call_mean_us": sum(emit_call_ns) / max(1, emitted) / 1000,
        "dropped": stats.dropped_total,
        "dropped_by_reason": stats.dropped,
        "failed": stats.failed_total,
        "failed_by_reason": stats.failed,
        "sent": stats.sent,
        "delivered": stats.delivered,
        "purged_at_close": purged,
        "unaccounted": emitted - stats.delivered - stats.dropped_total - stats.failed_total,
        "exceptions": exceptions,
        "rss_bytes": rss_peak,
        "rss_growth_bytes": max(0, rss_peak - rss_before),
        "memory_bound_bytes": run_settings.producer_max_buffer_bytes,
        "features": FEATURES,
        "broker": broker,
        "broker_down": args.broker_down,
    }
    result["targets_met"] = _targets_met(result)
    if getattr(args, "plot", None):
        _plot(base_ns, emit_ns, args.plot, f"{emitted} emitting requests, {broker}")
        _progress(f"plot written to {args.plot}")
    print(json.dumps(result) if args.json else json.dumps(result, indent=2))
    return 0


def _measure(
    handle: Callable[[Any, bool], Any], requests: list[Any], progress: Callable[[str], None],
) -> dict[str, Any]:
    """Requests in pairs, one without and one with emit in random order, so machine noise
    hits both alike. CPU: the handler thread's own time per request, plus all the CPU of
    the other threads (librdkafka's, the emitter's poller) charged to emitting."""
    half = len(requests) // 2
    warm = min(200, half)
    counted = half - warm
    # Pre-sized: the RSS growth measured during the run is the emitter's, not these arrays'.
    wall = {False: array("q", bytes(8 * counted)), True: array("q", bytes(8 * counted))}
    cpu: dict[bool, float] = {False: 0.0, True: 0.0}
    rss_samples = []
    coin = random.Random(3)
    for i in range(warm):  # not counted
        handle(requests[i], False)
        handle(requests[half + i], True)
    rss_before = _rss_bytes()
    ticks_before = _cpu_ticks()
    process_start, thread_start = time.process_time(), time.thread_time()
    for i in range(warm, half):
        for emit in (False, True) if coin.random() < 0.5 else (True, False):
            cpu_start = time.thread_time()
            start = time.perf_counter_ns()
            handle(requests[half + i] if emit else requests[i], emit)
            wall[emit][i - warm] = time.perf_counter_ns() - start
            cpu[emit] += time.thread_time() - cpu_start
        if i % 500 == 0:
            rss_samples.append(_rss_bytes())
            progress(f"{i - warm + 1} of {counted} requests per mode")
    other_threads = (time.process_time() - process_start) - (time.thread_time() - thread_start)
    steal = _steal_pct(ticks_before, _cpu_ticks())
    base, emit = wall[False], wall[True]
    count = len(base)
    return {
        "requests": count,
        "baseline_p50_us": _percentile(base, 50) / 1000,
        "baseline_p99_us": _percentile(base, 99) / 1000,
        "emit_p50_us": _percentile(emit, 50) / 1000,
        "emit_p99_us": _percentile(emit, 99) / 1000,
        "added_p50_us": (_percentile(emit, 50) - _percentile(base, 50)) / 1000,
        "added_p99_us": (_percentile(emit, 99) - _percentile(base, 99)) / 1000,
        "added_p99_ci95_us": _added_p99_interval(base, emit),
        "throughput_ratio": sum(base) / sum(emit),
        "handler_cpu_added_us": (cpu[True] - cpu[False]) / count * 1e6,
        "other_threads_cpu_us": other_threads / count * 1e6,
        "cpu_steal_pct": steal,
        "rss_samples": rss_samples,
        "rss_before": rss_before,
        "base_ns": base,
        "emit_ns": emit,
    }


def _added_p99_interval(base: Sequence[int], emit: Sequence[int], resamples: int = 200
                        ) -> list[float]:
    """95 % bootstrap interval of ``added_p99_us``: pairs resampled with replacement.

    >>> base = array("q", range(1000, 101_000, 100)); emit = array("q", (b + 5000 for b in base))
    >>> _added_p99_interval(base, emit)
    [5.0, 5.0]
    """
    import numpy as np

    b, e = np.asarray(base), np.asarray(emit)
    n = len(b)
    k = min(n - 1, int(round(0.99 * (n - 1))))  # the rank _percentile takes
    rng = np.random.default_rng(5)
    added = []
    for _ in range(resamples):
        pick = rng.integers(0, n, n)
        added.append(int(np.partition(e[pick], k)[k]) - int(np.partition(b[pick], k)[k]))
    low, high = np.percentile(added, [2.5, 97.5])
    return [round(float(low) / 1000, 1), round(float(high) / 1000, 1)]


PLOT_QUANTILES = (50.0, 75.0, 90.0, 95.0, 98.0, 99.0, 99.5, 99.9)


def _plot(base: Sequence[int], emit: Sequence[int], path: str, title: str) -> None:
    """Latency by quantile with and without emit (top) and the difference (bottom), on
    a "nines" axis so that the tail gets the room; the same ranks as the JSON figures."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    nines = [-math.log10(1 - q / 100) for q in PLOT_QUANTILES]
    without = [_percentile(base, q) / 1000 for q in PLOT_QUANTILES]
    with_emit = [_percentile(emit, q) / 1000 for q in PLOT_QUANTILES]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    top.plot(nines, without, "o-", label="without emit")
    top.plot(nines, with_emit, "o-", label="with emit")
    top.set_ylabel("handler latency (us)")
    top.legend()
    bottom.bar(nines, [e - b for e, b in zip(with_emit, without, strict=True)], width=0.12)
    bottom.axhline(TARGETS["added_p99_us"], color="crimson", ls="--", lw=1,
                   label=f"target at p99 ({TARGETS['added_p99_us']:g} us)")
    bottom.set_ylabel("added by emit (us)")
    bottom.set_xticks(nines, [f"p{q:g}" for q in PLOT_QUANTILES])
    bottom.legend()
    fig.suptitle(f"bench emit: {title}")
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)


def _targets_met(result: dict[str, Any]) -> dict[str, bool]:
    met = {
        "throughput_ratio": result["throughput_ratio"] >= TARGETS["throughput_ratio"],
        "added_p99_us": result["added_p99_us"] <= TARGETS["added_p99_us"],
        "emit_cpu_us_per_event": (
            result["emit_cpu_us_per_event"] <= TARGETS["emit_cpu_us_per_event"]
        ),
        "no_exceptions": result["exceptions"] == 0,
        "all_accounted": result["unaccounted"] == 0,
    }
    if result["broker_down"]:
        met["memory_under_bound"] = result["rss_growth_bytes"] <= result["memory_bound_bytes"]
    else:
        met["all_delivered"] = result["delivered"] == result["sent"] and result["failed"] == 0
    return met
