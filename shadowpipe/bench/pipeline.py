"""``shadowpipe bench pipeline``: the whole pipeline end to end on the embedded stack.

A primary service (this process) emits through the producer library
(:class:`~shadowpipe.producers.Emitter`) at a fixed offered rate: a logistic regression's
answers on synthetic requests, with feedback (the true label) for every second request.
Every processor runs as its own process, started as ``shadowpipe stack up --workers``
does (:class:`~shadowpipe.fleet.Fleet`): ``worker shadow`` with 2 challengers (a logistic
regression on more features and a control copy of the primary), ``worker join``,
``worker monitor``, on a throw-away embedded stack (broker, Redis, embedded ClickHouse).

How the highest sustainable rate is found:

1. **Capacity probe**: ``--probe-requests`` requests emitted as fast as the producer goes;
   capacity = requests / time until every stage has consumed everything (the monitor's
   committed offsets reach the joined topic's end).
2. **Trials** (``--max-trials``), first at 0.9 x capacity: the rate is offered for
   ``--lag-window-s`` seconds while the consumer lag of every stage (shadow, join, monitor
   groups, from their committed offsets) is sampled twice a second. A rate is sustainable
   when the producer kept it (>= 97 %) and the backlog did not grow: the least-squares
   slope of the total lag floor (each stage's least lag over the last 2.5 s,
   :func:`lag_floor`: a stage that commits once a second shows a sawtooth that is not a
   backlog) over the second half of the window is below 1 % of the messages entering the
   stages per second. While trials are sustainable the next offers 1.25x more (the probe
   counts the pipeline's fixed latency as time, so it underestimates a fast pipeline);
   until one is, the next offers 0.8x; once there is both a sustainable and an
   unsustainable rate, the next offers their geometric middle (bisection), until they are
   within 12 % (:func:`next_rate`). The highest sustainable trial is reported (the last
   one when none was).

Figures (of that trial):

* ``requests_per_s``: requests emitted per second (achieved, not offered);
  ``predictions_per_s``: challenger predictions produced per second (predictions topic).
* ``e2e_p50_ms``, ``e2e_p99_ms``: from ``emit_inference`` to the request's first joined
  record being queryable in ClickHouse, for a sample of requests (1 in 50): the monitor
  commits a joined record's offset only after the batch holding it is inserted into
  ClickHouse, so queryable = the monitor group's committed offset passed the record's
  offset (it commits after every batch; the offsets are sampled every 0.5 s, so this is an
  upper bound by up to ~0.5 s).
  At the end the sampled ids are looked up in ClickHouse through the monitor.
* ``lag_max``: the largest total lag (messages not yet consumed, summed over the stages)
  seen in the trial; ``lag_max_by_stage`` per stage. ``lag_slope_per_s``: the slope that
  judged the trial (messages/s, of the lag floor); ``lag_slope_by_stage``: each stage's
  share of it (they add up), which names the stage that falls behind.
* ``cpu_us_per_request``: CPU time per request of each part, from the trial's first
  request until its traffic is drained (:mod:`.cpu`, from ``/proc``): ``shadow``, ``join``,
  ``monitor`` (with its embedded ClickHouse's inserts and merges), ``kafka`` (the broker),
  ``redis``, ``emitter`` (this process: the producer library and the benchmark's watcher)
  and ``total``; ``cores_busy`` = total CPU / wall time; ``cpu_bound_requests_per_s`` =
  the rate at which that CPU per request would fill every core (an upper bound on this
  machine whatever the layout).
* ``drift_to_alert_s``: at ``--drop-at`` of the window the feedback labels are flipped (the
  primary's accuracy drops, e.g. 0.85 to 0.15): seconds from that moment to the first
  ``ADWIN`` ``error_rate`` alert on the alert topic for this trial's primary model (each
  trial has its own model name, so its detector starts fresh).

``--scale 2``: the same search twice with a CPU-heavy third challenger (a model that
costs ~200 us per event), first with one process of each worker, then with two of each;
``scale_ratio`` = sustainable requests/s with 2 / with 1. On the embedded ClickHouse only
one monitor process may open the data directory: with the default ``--monitor-mode single``
the second monitor is a standby, with ``--monitor-mode partitioned`` both monitors share
the series work and the first alone writes ClickHouse (``monitor_processes_active`` and
``monitor_mode`` say which; the partitioned monitor's three stages are reported as
``monitor-repartition``, ``monitor-series`` and ``monitor``, the sink, in
``lag_max_by_stage``).

Progress goes to stderr; the JSON object (``--json``) to stdout.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shadowpipe.bench.cpu import CpuMeter
from shadowpipe.config import Settings
from shadowpipe.stack import free_port

FEATURES = 10
PRIMARY_FEATURES = 6
POOL = 4096  # distinct feature vectors, cycled (requests get unique ids)
PROBE_EVERY = 50  # one request in 50 is sampled for the end-to-end latency
BUSY_S = 200e-6
RESOLUTION = 1.12  # the search stops once the sustainable rate is known within 12 %
FLOOR_S = 2.5  # lag floors over this span: > the longest commit cadence plus a batch


def busy(features: dict[str, Any]) -> dict[str, Any]:
    """The CPU-heavy challenger of ``--scale``: ~200 us of pure-Python work per event."""
    end = time.perf_counter() + BUSY_S
    spins = 0
    while time.perf_counter() < end:
        spins += 1
    return {"label": "1" if features["x0"] > 0 else "0"}


def add_arguments(bench: argparse.ArgumentParser) -> None:
    """The flags of ``shadowpipe bench pipeline`` (help line: ``shadowpipe.cli.BENCHES``)."""
    bench.add_argument("--lag-window-s", type=float, default=60.0,
                       help="how long each rate is offered, s (lag must not grow over it; "
                            "--window-s is the monitor's window setting)")
    bench.add_argument("--scale", type=int, choices=(1, 2), default=1,
                       help="2: with one, then two processes of each worker and a CPU-heavy "
                            "challenger; prints scale_ratio")
    bench.add_argument("--probe-requests", type=int, default=40_000,
                       help="requests of the capacity probe (sent as fast as possible)")
    bench.add_argument("--max-trials", type=int, default=5,
                       help="rates tried: 0.9 x capacity, up while sustainable, else down, then "
                            "bisected")
    bench.add_argument("--drop-at", type=float, default=0.6,
                       help="fraction of the window at which the accuracy drop is injected")
    bench.add_argument("--alert-timeout-s", type=float, default=60.0,
                       help="how long to wait after the window for the drift alert")
    bench.add_argument("--seed", type=int, default=7)
    bench.add_argument("--json", action="store_true", help="print one JSON object")
    bench.set_defaults(func=bench_cmd)


def say(text: str) -> None:
    print(f"bench pipeline: {text}", file=sys.stderr, flush=True)


def bench_cmd(args: argparse.Namespace, settings: Settings) -> int:
    from shadowpipe.stack import EmbeddedStack

    with tempfile.TemporaryDirectory(prefix="shadowpipe-bench-pipeline-") as tmp:
        home = Path(tmp)
        own = settings.replace(
            home=str(home), kafka_bootstrap=f"127.0.0.1:{free_port()}",
            redis_url=f"redis://127.0.0.1:{free_port()}/0",
            clickhouse_url=f"chdb://{home / 'clickhouse'}", feedback_horizon_s=3600,
            log_level="WARNING")
        stack = EmbeddedStack(own)
        say(f"starting an embedded stack in {home}")
        stack.up()
        try:
            world = World.build(args.seed, home)
            result = measure(own, world, args)
        except Exception:
            show_logs(home / "logs")  # before the temporary directory goes
            raise
        finally:
            stack.down()
    if args.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(f"{key:<28} {value}")
    return 0


def show_logs(logs: Path, lines: int = 15) -> None:
    """The last lines of every worker log, on stderr."""
    for log in sorted(logs.glob("worker-*.log")):
        tail = log.read_text(errors="replace").splitlines()[-lines:]
        say(f"--- {log.name}:\n" + "\n".join(tail))


def measure(settings: Settings, world: World, args: argparse.Namespace) -> dict[str, Any]:
    """One search (``--scale 1``) or the two of ``--scale 2``."""
    if args.scale == 1:
        return {"benchmark": "pipeline", **search(settings, world, args, 1, heavy=False)}
    one = search(settings, world, args, 1, heavy=True)
    two = search(settings, world, args, 2, heavy=True)
    return {"benchmark": "pipeline --scale 2", **two, "with_1": one,
            "scale_ratio": round(two["requests_per_s"] / one["requests_per_s"], 3)
            if one["requests_per_s"] else None}


# -- the primary service's world -----------------------------------------------------------

@dataclass
class World:
    """Synthetic requests, the primary's answers, true labels and the challengers' files."""

    features: list[dict[str, float]]
    outputs: list[dict[str, Any]]
    labels: list[str]
    files: Path

    @classmethod
    def build(cls, seed: int, out: Path) -> World:
        import joblib
        import numpy as np
        from sklearn.linear_model import LogisticRegression

        rng = np.random.default_rng(seed)
        weights = rng.normal(size=FEATURES)
        train = rng.normal(size=(20_000, FEATURES))
        y = (train @ weights + rng.normal(scale=1.0, size=len(train)) > 0).astype(int)
        names = [f"x{i}" for i in range(FEATURES)]
        primary = LogisticRegression().fit(train[:, :PRIMARY_FEATURES], y)
        challenger = LogisticRegression(C=0.5).fit(train, y)
        joblib.dump(primary, out / "control.joblib")
        joblib.dump(challenger, out / "logreg.joblib")
        pool = rng.normal(size=(POOL, FEATURES))
        truth = (pool @ weights + rng.normal(scale=1.0, size=POOL) > 0).astype(int)
        proba = primary.predict_proba(pool[:, :PRIMARY_FEATURES])[:, 1]
        features = [{n: float(v) for n, v in zip(names, row, strict=True)} for row in pool]
        outputs = [{"label": str(int(p > 0.5)), "probabilities": {"1": float(p), "0": 1 - float(p)}}
                   for p in proba]
        return cls(features, outputs, [str(t) for t in truth], out)

    def challengers(self, heavy: bool) -> Path:
        names = json.dumps([f"x{i}" for i in range(FEATURES)])
        primary = json.dumps([f"x{i}" for i in range(PRIMARY_FEATURES)])
        text = (f'[[challengers]]\nname = "logreg"\nversion = "2"\nkind = "sklearn"\n'
                f'location = "{self.files / "logreg.joblib"}"\nfeatures = {names}\n\n'
                f'[[challengers]]\nname = "control"\nversion = "1"\nkind = "sklearn"\n'
                f'location = "{self.files / "control.joblib"}"\nfeatures = {primary}\n'
                "is_control = true\n")
        if heavy:
            text += ('\n[[challengers]]\nname = "heavy"\nversion = "1"\nkind = "callable"\n'
                     'location = "shadowpipe.bench.pipeline:busy"\n')
        path = self.files / f"challengers{'-heavy' if heavy else ''}.toml"
        path.write_text(text)
        return path


# -- traffic -----------------------------------------------------------------------------

@dataclass
class Traffic:
    """The primary service: emits requests (and feedback for half) at a given rate."""

    settings: Settings
    world: World
    model: str
    emitter: Any = None
    sent: int = 0
    feedback: int = 0
    probes: dict[bytes, float] = field(default_factory=dict)  # request id -> emit time
    flipped: bool = False

    def __post_init__(self) -> None:
        from shadowpipe.producers import Emitter

        self.emitter = Emitter(self.settings, name="bench-pipeline")

    def emit(self, n: int, probe: bool) -> None:
        k = n % POOL
        rid = f"{self.model}-{n}"
        if probe:
            self.probes[rid.encode()] = time.perf_counter()
        self.sent += self.emitter.emit_inference(
            rid, self.world.features[k], self.world.outputs[k], model=self.model,
            version="1", latency_ms=1.0)
        if n % 2 == 0:
            label = self.world.labels[k]
            if self.flipped:
                label = "0" if label == "1" else "1"
            self.feedback += self.emitter.emit_feedback(rid, label, model=self.model)

    def burst(self, n: int, max_queued: int = 20_000) -> None:
        """``n`` requests as fast as the broker takes them: the emitter drops what does not
        fit its queue (as it should in a service), so the burst waits for room instead."""
        for i in range(n):
            if i % 1000 == 0:
                while self.emitter.stats().queued > max_queued:
                    time.sleep(0.005)
            self.emit(i, probe=False)

    def offer(self, rate: float, seconds: float, drop_at: float,
              on_drop: Any = None) -> float:
        """``rate`` requests/s for ``seconds``; labels flipped after ``drop_at`` of it."""
        started = time.perf_counter()
        n = 0
        while (now := time.perf_counter()) < started + seconds:
            if not self.flipped and now - started >= drop_at * seconds:
                self.flipped = True
                if on_drop:
                    on_drop(now)
            due = int((now - started) * rate)
            while n < due:
                self.emit(n, probe=n % PROBE_EVERY == 0)
                n += 1
            time.sleep(0.002)
        return n / (time.perf_counter() - started)

    def close(self) -> dict[str, Any]:
        self.emitter.close(30)
        stats = self.emitter.stats()
        return {"requests": self.sent, "sent": stats.sent, "delivered": stats.delivered,
                "dropped": sum(stats.dropped.values()), "failed": stats.failed}


# -- watching the stages -------------------------------------------------------------------

def monitor_stages(s: Settings, tps: dict[str, list[Any]]) -> dict[str, tuple[str, list]]:
    """The monitor's consumer groups and their inputs; ``monitor`` is the one whose commit
    on the joined topic means "queryable in ClickHouse" (the sink, in partitioned mode)."""
    from confluent_kafka import TopicPartition

    from shadowpipe.processors.monitor.agent import group_id
    from shadowpipe.processors.monitor.partitioned import series_topic

    if s.monitor_mode != "partitioned":
        return {"monitor": (group_id(s), tps["joined"])}
    tps["series"] = [TopicPartition(series_topic(s), p) for p in range(s.partitions)]
    prefix = s.topic_prefix
    return {"monitor-repartition": (f"{prefix}monitor-repartition", tps["joined"]),
            "monitor-series": (f"{prefix}monitor-series", tps["series"]),
            "monitor": (f"{prefix}monitor-sink", tps["joined"])}


class Watch(threading.Thread):
    """Samples every stage's lag (to the partitions' real ends: :class:`~shadowpipe.kafka.
    EndOffsets`), resolves sampled requests' end-to-end latency, and reads the alert topic,
    on its own thread (librdkafka calls only)."""

    def __init__(self, settings: Settings, traffic: Traffic | None) -> None:
        super().__init__(daemon=True)
        from confluent_kafka import TopicPartition

        from shadowpipe import kafka
        s = settings
        self.settings, self.traffic = s, traffic
        parts = range(s.partitions)
        tps = {kind: [TopicPartition(s.topic(kind), p) for p in parts]
               for kind in ("inference", "predictions", "feedback", "joined")}
        self.stages = {  # stage -> (group, its input partitions)
            "shadow": (f"{s.topic_prefix}shadow", tps["inference"]),
            "join": (f"{s.topic_prefix}join",
                     tps["inference"] + tps["predictions"] + tps["feedback"]),
            **monitor_stages(s, tps),
        }
        self.groups = {name: kafka.consumer(s, group, **{"enable.auto.commit": False})
                       for name, (group, _) in self.stages.items()}
        self.ends = kafka.EndOffsets(s)  # this thread's (the one before start() included)
        self.tps = tps
        self.samples: list[tuple[float, int, dict[str, int], int]] = []  # t, lag, by stage, in
        self.e2e_ms: list[float] = []
        self.alerts: list[tuple[float, dict[str, Any]]] = []
        self.stop_event = threading.Event()
        self._located: dict[tuple[int, int], float] = {}  # joined (partition, offset) -> emit
        self._joined = self._reader(tps["joined"])
        self._alerts = self._reader([TopicPartition(s.topic("alerts"), p) for p in parts])

    def _reader(self, tps: list[Any]) -> Any:
        from confluent_kafka import TopicPartition

        from shadowpipe import kafka

        consumer = kafka.consumer(self.settings, f"bench-read-{uuid.uuid4().hex[:6]}")
        ends = self.ends(tps)
        consumer.assign([TopicPartition(tp.topic, tp.partition, ends[(tp.topic, tp.partition)])
                         for tp in tps])
        return consumer

    def committed(self, stage: str) -> dict[tuple[str, int], int]:
        group, tps = self.stages[stage]
        done = self.groups[stage].committed(tps, timeout=10)
        return {(tp.topic, tp.partition): max(tp.offset, 0) for tp in done}

    def lag(self) -> tuple[int, dict[str, int], int]:
        """Total lag, lag per stage, and the sum of the stages' input ends."""
        highs = self.ends([tp for tps in self.tps.values() for tp in tps])
        by_stage, ends = {}, 0
        for stage, (_, tps) in self.stages.items():
            done = self.committed(stage)
            keys = [(tp.topic, tp.partition) for tp in tps]
            by_stage[stage] = sum(max(highs[k] - done[k], 0) for k in keys)
            ends += sum(highs[k] for k in keys)
        return sum(by_stage.values()), by_stage, ends

    def run(self) -> None:
        next_sample = 0.0
        while not self.stop_event.is_set():
            self._read_joined()
            self._read_alerts()
            now = time.perf_counter()
            if now >= next_sample:
                total, by_stage, ends = self.lag()
                self.samples.append((now, total, by_stage, ends))
                self._resolve(now)
                next_sample = now + 0.5

    def _read_joined(self) -> None:
        probes = self.traffic.probes if self.traffic else {}
        for msg in self._joined.consume(20_000, 0.05):
            if msg.error() is None and (sent := probes.pop(msg.key(), None)) is not None:
                self._located[(msg.partition(), msg.offset())] = sent  # its first record

    def _read_alerts(self) -> None:
        from shadowpipe.schemas.codec import Codec

        for msg in self._alerts.consume(100, 0):
            if msg.error() is None:
                self.alerts.append((time.perf_counter(), Codec().decode(msg.value(), "Alert")))

    def _resolve(self, now: float) -> None:
        done = self.committed("monitor")
        topic = self.settings.topic("joined")
        for key in [k for k in self._located if done.get((topic, k[0]), 0) > k[1]]:
            self.e2e_ms.append((now - self._located.pop(key)) * 1000)

    def close(self) -> None:
        self.stop_event.set()
        if self.ident is not None:  # the probe only samples, without the thread
            self.join(30)
        for consumer in (*self.groups.values(), self.ends, self._joined, self._alerts):
            consumer.close()


# -- the search ----------------------------------------------------------------------------

def search(settings: Settings, world: World, args: argparse.Namespace, processes: int,
           heavy: bool) -> dict[str, Any]:
    """Start the workers, probe the capacity, find the highest sustainable rate."""
    from shadowpipe.fleet import Fleet
    from shadowpipe.kafka import ensure_topics

    tag = f"b{uuid.uuid4().hex[:6]}"
    # Its own ClickHouse directory: the last search's monitor may still be letting go of its.
    s = settings.replace(topic_prefix=f"{tag}.", clickhouse_database=f"bench_{tag}",
                         clickhouse_url=f"chdb://{settings.home_path / ('clickhouse-' + tag)}",
                         challengers=str(world.challengers(heavy)))
    ensure_topics(s)
    fleet = Fleet(s)
    say(f"{processes} process(es) of each worker, challengers "
        f"{'logreg, control, heavy' if heavy else 'logreg, control'}")
    try:  # a worker that fails to start leaves the others running: down stops them
        fleet.up({"shadow": processes, "join": processes, "monitor": processes}, say=say)
        wait_assigned(fleet)
        meter = cpu_meter(s, fleet)
        capacity, probed = probe(s, world, args)
        trials: list[dict[str, Any]] = []
        rate: float | None = 0.9 * capacity
        for k in range(args.max_trials):
            if rate is None:
                break
            trials.append(run_trial(s, world, args, max(50.0, rate), f"{tag}t{k}", meter))
            rate = next_rate(trials)
        sustained = [t for t in trials if t["sustainable"]]
        trial = max(sustained, key=lambda t: t["offered_per_s"]) if sustained else trials[-1]
        active = sum(1 for w in fleet.recorded()[0] if w.kind == "monitor" and not w.standby)
        stored = stored_counts(fleet, s)
        emitted = probed + sum(t["emitter"]["requests"] for t in trials)
    finally:
        say("stopping the workers")
        fleet.down()
    return {**trial, "capacity_probe_requests_per_s": round(capacity),
            "trials": [{key: t[key] for key in ("offered_per_s", "requests_per_s",
                                                "lag_slope_per_s", "lag_slope_by_stage",
                                                "sustainable")}
                       for t in trials],
            "processes_per_worker": processes, "monitor_processes_active": active,
            "monitor_mode": s.monitor_mode,
            "challengers": 3 if heavy else 2, "requests_emitted": emitted,
            "stored_per_challenger": stored,
            "requests_accounted": bool(stored) and all(n == emitted for n in stored.values())}


def next_rate(trials: list[dict[str, Any]]) -> float | None:
    """The rate of the trial after ``trials``, None when the search is over: up 1.25x
    while every trial was sustainable, down 0.8x until one is; then the geometric middle
    of the highest sustainable and the lowest unsustainable rate, while they are more than
    :data:`RESOLUTION` apart.

    >>> ok = lambda r: {"offered_per_s": r, "sustainable": True}
    >>> no = lambda r: {"offered_per_s": r, "sustainable": False}
    >>> next_rate([ok(100)]), next_rate([no(100)]), next_rate([ok(100), no(125)])
    (125.0, 80.0, 111.80339887498948)
    >>> next_rate([ok(100), no(125), ok(112)])  # within 12 %: the sustained 112 stands
    >>> next_rate([no(100), ok(80)])  # a bisection step on the way down too
    89.44271909999159
    """
    ok = [t["offered_per_s"] for t in trials if t["sustainable"]]
    no = [t["offered_per_s"] for t in trials if not t["sustainable"]]
    if not no:
        return max(ok) * 1.25
    if not ok:
        return min(no) * 0.8
    low, high = max(ok), min(no)
    return math.sqrt(low * high) if high > low * RESOLUTION else None


def cpu_meter(settings: Settings, fleet: Any) -> CpuMeter:
    """CPU time by role: each worker kind, the broker, Redis and this process (the primary
    service's emitter, with the benchmark's own watcher thread)."""
    from shadowpipe.stack import EmbeddedStack

    roles: dict[str, list[int]] = {}
    for w in fleet.recorded()[0]:
        roles.setdefault(w.kind, []).append(w.pid)
    for name, pid in EmbeddedStack(settings).pids().items():
        roles.setdefault(name, []).append(pid)
    return CpuMeter(roles, here="emitter")


def cpu_figures(spent: dict[str, float], requests: int, wall_s: float) -> dict[str, Any]:
    """Per request CPU by role, cores busy, and the rate at which that CPU fills every core.

    >>> cpu_figures({"shadow": 0.5, "join": 1.5, "total": 2.0}, 10_000, 4.0)["cpu_us_per_request"]
    {'shadow': 50.0, 'join': 150.0, 'total': 200.0}
    """
    cores = os.cpu_count() or 1
    return {"cpu_us_per_request": {role: round(sec / requests * 1e6, 1)
                                   for role, sec in spent.items()} if requests else None,
            "cores_busy": round(spent["total"] / wall_s, 2) if wall_s > 0 else None,
            "cpu_bound_requests_per_s": round(cores * requests / spent["total"])
            if spent["total"] > 0 else None}


def wait_assigned(fleet: Any, timeout_s: float = 180.0) -> None:
    """Until every shadow worker owns partitions (the group has formed)."""
    from shadowpipe.fleet import get_json

    shadow = [w for w in fleet.recorded()[0] if w.kind == "shadow"]
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if all((get_json(w.stats_url) or {}).get("assigned_partitions") for w in shadow):
            return
        time.sleep(0.5)
    raise RuntimeError(f"shadow workers without partitions after {timeout_s:.0f} s")


def probe(settings: Settings, world: World, args: argparse.Namespace) -> tuple[float, int]:
    """Requests per second the pipeline drains when flooded with ``--probe-requests``, and
    how many requests the emitter sent."""
    traffic = Traffic(settings, world, "probe")
    watch = Watch(settings, None)
    say(f"capacity probe: {args.probe_requests} requests as fast as possible")
    started = time.perf_counter()
    traffic.burst(args.probe_requests)
    sent = traffic.close()["requests"]
    drained = wait_drained(watch, started)
    watch.close()
    capacity = sent / (drained - started)
    say(f"capacity probe: drained in {drained - started:.1f} s, ~{capacity:.0f} requests/s")
    return capacity, sent


def wait_drained(watch: Watch, since: float, timeout_s: float = 900.0) -> float:
    """When every stage had consumed everything (polled, lag 0), after ``since``."""
    deadline = time.perf_counter() + timeout_s
    while time.perf_counter() < deadline:
        total, by_stage, _ = watch.lag()
        if total == 0:
            return time.perf_counter()
        time.sleep(0.2)
    raise RuntimeError(f"the pipeline did not drain in {timeout_s:.0f} s: lag {by_stage}")


def run_trial(settings: Settings, world: World, args: argparse.Namespace, rate: float,
              model: str, meter: CpuMeter) -> dict[str, Any]:
    """Offer ``rate`` for the window; lag, end-to-end latency, drift-to-alert and CPU
    figures (from the first request until the trial's traffic is drained)."""
    from shadowpipe.kafka import EndOffsets

    traffic = Traffic(settings, world, model)
    watch = Watch(settings, traffic)
    ends = EndOffsets(settings)  # the main thread's: the watch's own runs on its thread
    predictions_before = sum(ends(watch.tps["predictions"]).values())
    watch.start()
    drop: list[float] = []
    say(f"trial: {rate:.0f} requests/s for {args.lag_window_s:.0f} s")
    cpu_before, started = meter.read(), time.perf_counter()
    achieved = traffic.offer(rate, args.lag_window_s, args.drop_at, drop.append)
    end = time.perf_counter()
    sent = traffic.close()
    drained = wait_drained(watch, end)
    # Read before the alert wait: an idle wait for a late alert is not the pipeline's time.
    cpu = cpu_figures(meter.spent(cpu_before, meter.read()), sent["requests"],
                      drained - started)
    alert_at = wait_alert(watch, model, end + args.alert_timeout_s)
    time.sleep(1.5)  # the last probes' commits
    predictions = sum(ends(watch.tps["predictions"]).values()) - predictions_before
    ends.close()
    watch.close()
    floor = lag_floor(watch.samples)
    slope, entering = lag_trend(floor, end)
    by_stage = {stage: round(lag_trend([(t, lags[stage], lags, n) for t, _, lags, n in floor],
                                       end)[0], 1)
                for stage in watch.stages}
    sustainable = achieved >= 0.97 * rate and slope <= 0.01 * entering
    e2e = sorted(watch.e2e_ms)
    result = {
        "offered_per_s": round(rate), "requests_per_s": round(achieved),
        "predictions_per_s": None, "e2e_p50_ms": pct(e2e, 0.5), "e2e_p99_ms": pct(e2e, 0.99),
        "e2e_samples": len(e2e), "lag_max": max((t[1] for t in watch.samples), default=0),
        "lag_max_by_stage": {stage: max((t[2][stage] for t in watch.samples), default=0)
                             for stage in watch.stages},
        "lag_slope_per_s": round(slope, 1), "lag_slope_by_stage": by_stage,
        "messages_in_per_s": round(entering),
        "drift_to_alert_s": round(alert_at - drop[0], 2) if alert_at and drop else None,
        "sustainable": sustainable, "window_s": args.lag_window_s, "emitter": sent,
        "predictions_total": predictions, **cpu,
    }
    result["predictions_per_s"] = round(predictions / args.lag_window_s)  # all made in-window
    say(f"trial: {achieved:.0f} requests/s achieved, lag slope {slope:.0f}/s "
        f"({'sustainable' if sustainable else 'lag grows'}), e2e p99 {result['e2e_p99_ms']} ms, "
        f"drift alert after {result['drift_to_alert_s']} s")
    return result


def wait_alert(watch: Watch, model: str, deadline: float) -> float | None:
    """When the first firing ADWIN error-rate alert about ``model``'s primary was read."""
    while time.perf_counter() < deadline:
        for at, alert in list(watch.alerts):
            if (alert["detector"] == "ADWIN" and alert["metric"] == "error_rate"
                    and alert["status"] == "firing" and alert.get("arm") == "primary"
                    and alert["details"].get("model") == model):
                return at
        time.sleep(0.2)
    return None


def lag_floor(samples: list[tuple[float, int, dict[str, int], int]],
              span_s: float = FLOOR_S) -> list[tuple[float, int, dict[str, int], int]]:
    """Each sample with every stage's lag replaced by its least over the ``span_s`` before
    it (the total is their sum): the backlog, without the sawtooth of a stage that
    commits at a cadence (the partitioned series stage: every second), which sampled
    twice a second aliases into slopes of +-1,000 messages/s that are not there.

    >>> saw = [(t / 2, 0, {"s": 900 * (t % 3)}, 0) for t in range(12)]  # flat, a sawtooth
    >>> [x[1] for x in lag_floor(saw, 1.5)][3:]
    [0, 0, 0, 0, 0, 0, 0, 0, 0]
    >>> grows = [(t / 2, 0, {"s": 100 * t + 900 * (t % 3)}, 0) for t in range(12)]
    >>> [x[1] for x in lag_floor(grows, 1.5)][3:]
    [0, 300, 300, 300, 600, 600, 600, 900, 900]
    """
    out = []
    for i, (t, _, _, entering) in enumerate(samples):
        recent = [x[2] for x in samples[:i + 1] if x[0] >= t - span_s]
        lags = {stage: min(r[stage] for r in recent) for stage in recent[-1]}
        out.append((t, sum(lags.values()), lags, entering))
    return out


def lag_trend(samples: list[tuple[float, int, dict[str, int], int]],
              end: float) -> tuple[float, float]:
    """Least-squares slope of the total lag over the second half of the window (messages/s)
    and the rate of messages entering the stages then.

    >>> growing = [(t, 100 * t, {}, 1000 * t) for t in range(10)]
    >>> lag_trend(growing, end=9)
    (100.0, 1000.0)
    """
    window = [x for x in samples if x[0] <= end]
    half = window[len(window) // 2:]
    if len(half) < 3:
        return math.inf, 0.0
    ts = [x[0] for x in half]
    lags = [x[1] for x in half]
    mt, ml = sum(ts) / len(ts), sum(lags) / len(lags)
    var = sum((t - mt) ** 2 for t in ts)
    slope = sum((t - mt) * (lag - ml) for t, lag in zip(ts, lags, strict=True)) / var
    entering = (half[-1][3] - half[0][3]) / (half[-1][0] - half[0][0])
    return slope, entering


def pct(values: list[float], q: float) -> float | None:
    """The ``q`` quantile of sorted ``values`` (None when empty).

    >>> pct([1.0, 2.0, 3.0, 4.0], 0.5), pct([], 0.99)
    (3.0, None)
    """
    if not values:
        return None
    return round(values[min(len(values) - 1, int(len(values) * q))], 1)


def stored_counts(fleet: Any, settings: Settings) -> dict[str, int]:
    """Requests stored in ClickHouse per challenger (asked through the monitor)."""
    from shadowpipe.fleet import get_json

    monitor = next(w for w in fleet.recorded()[0] if w.kind == "monitor" and not w.standby)
    body = get_json(f"http://127.0.0.1:{monitor.port}/shadowpipe/query/?name=arm_counts"
                    "&since_ms=0&challenger=&by=", timeout_s=120) or {}
    rows = [dict(zip(body.get("columns", []), r, strict=True)) for r in body.get("rows", [])]
    return {r["challenger"]: r["published"] for r in rows if r["segment"] == ""}
