"""``shadowpipe bench shadow``: the shadow worker's throughput against a plain-loop ceiling.

On the configured broker (or an embedded stack started on free ports in a temporary
directory when it is unreachable), with fresh 4-partition topics and a scikit-learn
LogisticRegression challenger on 20 features:

1. pre-produce ``--events`` InferenceEvents;
2. **ceiling**: a plain confluent-kafka loop consumes them, decodes each (with the worker's
   decoder, :mod:`~shadowpipe.processors.shadow.decode`) and calls ``predict_proba`` per
   batch (no outputs), timed from first to last message;
3. **worker**: ``shadowpipe worker shadow`` runs as a child process over the same events;
   its sustained rate is taken from the broker timestamps of its ShadowPredictions
   (5th to 95th percentile, so start-up and the tail are excluded);
4. **lag** (last pass): with the worker caught up, events are produced at ``--lag-rate``
   events/s and ``p99_queue_lag_ms`` is the 99th percentile of their queue_lag_ms.

Steps 1-3 run ``--passes`` times on fresh topics and the best of each side counts: the
machine is shared, and a burst of load elsewhere must not decide the ratio.

One JSON object on stdout; progress on stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from contextlib import ExitStack, nullcontext
from pathlib import Path
from typing import Any

from shadowpipe.bench import shadow_scrape
from shadowpipe.config import Settings
from shadowpipe.stack import free_port, reachable_or_embedded

FEATURES = tuple(f"x{i}" for i in range(20))


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The flags of ``shadowpipe bench shadow`` (name and help: ``shadowpipe.cli.BENCHES``)."""
    p.add_argument("--events", type=int, default=100_000, help="pre-produced events")
    p.add_argument("--lag-events", type=int, default=20_000, help="events of the lag phase")
    p.add_argument("--lag-rate", type=int, default=5_000, help="events/s of the lag phase")
    p.add_argument("--passes", type=int, default=2, help="ceiling + worker passes; best counts")
    p.add_argument("--json", action="store_true", help="print only the JSON result")
    p.add_argument("--scrape", type=float, default=0.0, metavar="S",
                   help="also passes with /metrics scraped every S s: scrape_cost (worker "
                        "CPU per scrape / S) and scrape_ratio (throughput)")
    p.add_argument("--kind", choices=("sklearn", "onnx", "oip"), default="sklearn",
                   help="also run the worker with the model as this challenger kind: onnx "
                        "(events/s against the scikit-learn kind), oip (served by MLServer: "
                        "per-event cost against the raw round trip); see "
                        "shadowpipe/bench/shadow_kinds.py")
    p.set_defaults(func=bench_cmd)


def say(msg: str) -> None:
    print(f"[bench shadow] {msg}", file=sys.stderr, flush=True)


def _model(path: Path) -> Any:
    import joblib
    import numpy as np
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(7)
    x = rng.normal(size=(5000, len(FEATURES)))
    y = np.where(x @ rng.normal(size=len(FEATURES)) > 0, "yes", "no")
    model = LogisticRegression().fit(x, y)
    joblib.dump(model, path)
    return model


def _event(rid: str, values: Any, now_ms: int) -> dict[str, Any]:
    return {
        "request_id": rid, "event_time": now_ms, "model": "primary", "model_version": "1",
        "num_features": dict(zip(FEATURES, values, strict=True)),
        "output": {"label": "yes", "probabilities": {"yes": 0.7, "no": 0.3}, "value": None},
        "latency_ms": 1.0,
    }


def _produce(settings: Settings, n: int, prefix: str, rate: float | None = None) -> None:

    from shadowpipe import kafka
    from shadowpipe.schemas.codec import Codec

    codec, producer = Codec(settings.schema_registry_url), kafka.producer(settings)
    topic = settings.topic("inference")
    rows = _rows(n)
    if rate is not None:  # connect and get a producer id first: not part of the lag
        producer.produce(topic, codec.encode("InferenceEvent", _event("warm", rows[0], 1)), "w")
        producer.flush(30)
    start = time.perf_counter()
    for i in range(n):
        if rate is not None:  # paced: wait for this event's slot
            delay = start + i / rate - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
        rid = f"{prefix}-{i}"
        value = codec.encode("InferenceEvent", _event(rid, rows[i % len(rows)], _now_ms()))
        producer.produce(topic, value, rid)
        producer.poll(0)
    producer.flush(60)


def _rows(n: int) -> list[list[float]]:
    """The feature rows events are made of (cycled)."""
    import numpy as np

    return np.random.default_rng(11).normal(size=(min(n, 5000), len(FEATURES))).tolist()


def _now_ms() -> int:
    return int(time.time() * 1000)


def _ceiling(settings: Settings, model: Any, n: int) -> float:
    """Events/s of consume + decode + batched predict_proba, no Faust, no outputs."""
    import numpy as np

    from shadowpipe import kafka
    from shadowpipe.processors.shadow.decode import InferenceDecoder
    from shadowpipe.processors.shadow.service import CONSUMER_OVERRIDES
    from shadowpipe.schemas.codec import Codec

    # The worker's own decoder: the ceiling differs from the worker only by what the
    # worker must add (isolation, outputs, commits, the Faust process).
    decode = InferenceDecoder(Codec(settings.schema_registry_url)).decode
    consumer = kafka.consumer(settings, f"bench-ceiling-{uuid.uuid4().hex}", **CONSUMER_OVERRIDES)
    consumer.subscribe([settings.topic("inference")])
    seen, first = 0, None
    deadline = time.monotonic() + 300
    try:
        while seen < n and time.monotonic() < deadline:
            msgs = consumer.consume(settings.shadow_batch_size, settings.shadow_batch_ms / 1000)
            if not msgs:
                continue
            first = first or time.perf_counter()
            records = [decode(m.value()) for m in msgs]
            x = np.array([[r["num_features"][f] for f in FEATURES] for r in records])
            model.predict_proba(x)
            seen += len(msgs)
        elapsed = time.perf_counter() - (first or time.perf_counter())
    finally:
        consumer.close()
    if seen < n:
        raise RuntimeError(f"ceiling loop saw {seen} of {n} events")
    return seen / elapsed


def _stats(port: int) -> dict[str, Any]:
    url = f"http://127.0.0.1:{port}/shadowpipe/shadow/stats"
    with urllib.request.urlopen(url, timeout=5) as resp:
        return json.loads(resp.read())


def _wait_consumed(port: int, target: int, proc: subprocess.Popen, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the worker exited with code {proc.returncode}")
        try:
            if _stats(port)["consumed"] >= target:
                return
        except OSError:
            pass  # web server not up yet
        time.sleep(0.5)
    raise RuntimeError(f"the worker did not consume {target} events in {timeout_s:.0f} s")


def _read_predictions(settings: Settings, n: int) -> list[tuple[int, bytes]]:
    """(broker timestamp ms, value) of the first ``n`` ShadowPredictions."""
    from shadowpipe import kafka

    consumer = kafka.consumer(settings, f"bench-read-{uuid.uuid4().hex}")
    consumer.subscribe([settings.topic("predictions")])
    out: list[tuple[int, bytes]] = []
    deadline = time.monotonic() + 120
    try:
        while len(out) < n and time.monotonic() < deadline:
            out.extend((m.timestamp()[1], m.value())
                       for m in consumer.consume(10000, 0.5) if m.error() is None)
    finally:
        consumer.close()
    return out


def _sustained_rate(timestamps: list[int]) -> float:
    ts = sorted(timestamps)
    lo, hi = int(len(ts) * 0.05), int(len(ts) * 0.95)
    return (hi - lo) / max((ts[hi] - ts[lo]) / 1000, 1e-3)


def _spawn_worker(settings: Settings, challengers: Path, log: Path) -> subprocess.Popen:
    env = {**os.environ, **settings.to_env(), "SHADOWPIPE_CHALLENGERS": str(challengers),
           "SHADOWPIPE_LOG_LEVEL": "WARNING"}
    with open(log, "ab") as out:
        return subprocess.Popen([sys.executable, "-m", "shadowpipe.cli", "worker", "shadow"],
                                env=env, stdout=out, stderr=out)


def _pass(base: Settings, work: Path, model: Any, events: int, lag: tuple[int, int] | None,
          stack: ExitStack, challengers: Path | None = None, scrape_s: float = 0.0,
          ) -> dict[str, Any]:
    """One pass on fresh topics: ceiling, then the worker (then the lag phase if asked).
    With another ``challengers`` file: only the worker, scoring with it. With ``scrape_s``:
    the worker's ``/metrics`` scraped every ``scrape_s`` seconds while it consumes."""
    from shadowpipe.kafka import ensure_topics
    from shadowpipe.schemas.codec import Codec

    settings = base.replace(
        topic_prefix=f"bench{uuid.uuid4().hex[:8]}.", partitions=4, web_port=free_port()
    )
    ensure_topics(settings)
    say(f"producing {events} events to {settings.topic('inference')} (4 partitions)")
    _produce(settings, events, "bulk")
    ceiling = None
    if challengers is None:  # the scraped passes too: both sides run the same steps
        ceiling = _ceiling(settings, model, events)
        say(f"ceiling (consume + decode + batched predict): {ceiling:.0f} events/s")
    proc = _spawn_worker(settings, challengers or work / "challengers.toml", work / "worker.log")
    stack.callback(_stop, proc)
    with shadow_scrape.scraper(settings.web_port, scrape_s) if scrape_s else nullcontext(
            {}) as scrapes:
        _wait_consumed(settings.web_port, events, proc, timeout_s=600)
    if scrape_s:
        scrapes["scrape_cpu_s"] = shadow_scrape.cpu_per_scrape(proc.pid, settings.web_port)
    expected = events
    if lag is not None:
        say(f"worker caught up; lag phase: {lag[0]} events at {lag[1]}/s")
        _produce(settings, lag[0], "paced", rate=lag[1])
        expected += lag[0] + 1  # + the warm-up event
        _wait_consumed(settings.web_port, expected, proc, timeout_s=300)
    stats = _stats(settings.web_port)
    _stop(proc)
    codec = Codec(settings.schema_registry_url)
    bulk_ts, lags, model_ms = [], [], 0.0
    for ts, value in _read_predictions(settings, expected):
        rec = codec.decode(value, "ShadowPrediction")
        if rec["request_id"].startswith("bulk-"):
            bulk_ts.append(ts)
            model_ms += rec["model_time_ms"]
        elif rec["request_id"].startswith("paced-"):
            lags.append(rec["queue_lag_ms"])
    worker = _sustained_rate(bulk_ts)
    say(f"worker: {worker:.0f} events/s")
    return {"ceiling": ceiling, "worker": worker, "stats": stats, "lags": sorted(lags),
            "predictions": len(bulk_ts) + len(lags),
            "model_s_per_event": model_ms / 1000 / max(len(bulk_ts), 1), **scrapes}


def run_bench(settings: Settings, events: int, lag_events: int, lag_rate: int,
              passes: int = 2, kind: str = "sklearn", scrape_s: float = 0.0
              ) -> dict[str, Any]:
    """``passes`` passes (ceiling then worker on fresh topics); the best of each counts, so
    a burst of load from elsewhere on a shared machine hits both sides alike. With
    ``kind`` onnx or oip, each pass then runs the worker with that kind too
    (:mod:`~shadowpipe.bench.shadow_kinds`); with ``scrape_s``, a pass with ``/metrics``
    scraped too, first or last in turn (:mod:`~shadowpipe.bench.shadow_scrape`)."""
    from shadowpipe.bench import shadow_kinds

    with ExitStack() as stack:
        settings = stack.enter_context(
            reachable_or_embedded(settings, "bench shadow", say, redis=False))
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="shadow-bench-")))
        model = _model(work / "lr.joblib")
        (work / "challengers.toml").write_text(
            '[[challengers]]\nname = "lr"\nversion = "1"\nkind = "sklearn"\n'
            f'location = "{work / "lr.joblib"}"\nfeatures = {json.dumps(list(FEATURES))}\n'
        )
        other = (shadow_kinds.prepare(kind, work, model, FEATURES, stack)
                 if kind != "sklearn" else None)
        runs, kind_runs, scraped = [], [], []
        for i in range(passes):
            if scrape_s and i % 2 == 1:
                scraped.append(_pass(settings, work, model, events, None, stack,
                                     scrape_s=scrape_s))
            # The kind's pass goes second, then first, in turn: a machine or broker that
            # slows down over the run must not always hit the same side.
            if other is not None and i % 2 == 1:
                kind_runs.append(_kind_pass(settings, work, model, events, stack, other, kind))
            runs.append(_pass(settings, work, model, events,
                              (lag_events, lag_rate) if i == passes - 1 else None, stack))
            if other is not None and i % 2 == 0:
                kind_runs.append(_kind_pass(settings, work, model, events, stack, other, kind))
            if scrape_s and i % 2 == 0:
                scraped.append(_pass(settings, work, model, events, None, stack,
                                     scrape_s=scrape_s))
    worker = max(r["worker"] for r in runs)
    ceiling = max(r["ceiling"] for r in runs)
    lags, stats = runs[-1]["lags"], runs[-1]["stats"]
    return {
        "events": events,
        "partitions": 4,
        "batch_size": settings.shadow_batch_size,
        "worker_events_per_s": round(worker, 1),
        "ceiling_events_per_s": round(ceiling, 1),
        "efficiency": round(worker / ceiling, 3),
        "p99_queue_lag_ms": lags[int(0.99 * (len(lags) - 1))] if lags else None,
        "p50_queue_lag_ms": lags[len(lags) // 2] if lags else None,
        "worker_runs_events_per_s": [round(r["worker"]) for r in runs],
        "ceiling_runs_events_per_s": [round(r["ceiling"]) for r in runs],
        "lag_phase_events": len(lags),
        "lag_phase_rate_events_per_s": lag_rate,
        "predictions": sum(r["predictions"] for r in runs),
        "worker_errors": sum(c["errors"] + c["timeouts"] for c in stats["challengers"].values()),
        "worker_mean_batch": stats["batches"]["mean"],
        **({"kind": kind, **shadow_kinds.summary(kind, runs, kind_runs)} if kind_runs else {}),
        **(shadow_scrape.summary(runs, scraped, scrape_s) if scraped else {}),
    }


def _kind_pass(settings: Settings, work: Path, model: Any, events: int, stack: ExitStack,
               challengers: Path, kind: str) -> dict[str, Any]:
    """A worker pass scoring with ``challengers``; for oip, then the raw round trip."""
    from shadowpipe.bench import shadow_kinds

    say(f"the same events, the model as an {kind} challenger")
    run = _pass(settings, work, model, events, None, stack, challengers)
    if kind == "oip":
        batch = max(1, round(run["stats"]["batches"]["mean"]))
        (run["kind_s_per_event"], run["raw_s_per_event"],
         run["raw_pipelined_s_per_event"]) = shadow_kinds.kind_vs_raw(
            challengers, FEATURES, _rows(events), events, batch)
        say(f"oip: kind {run['kind_s_per_event'] * 1e6:.1f} us/event, raw round trip "
            f"{run['raw_s_per_event'] * 1e6:.1f} us/event (batches of {batch}); in the "
            f"worker's calls {run['model_s_per_event'] * 1e6:.1f} us/event")
    return run


def _stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()


def bench_cmd(args: argparse.Namespace, settings: Settings) -> int:
    result = run_bench(settings, args.events, args.lag_events, args.lag_rate, args.passes,
                       args.kind, args.scrape)
    print(json.dumps(result))
    return 0
