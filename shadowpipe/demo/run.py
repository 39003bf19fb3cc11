"""``shadowpipe demo``: the whole product on real parts, on one machine, in a few minutes.

Starts the embedded stack, trains the models of :mod:`.world`, runs every processor in a
worker process, serves simulated traffic through the producer library, waits until the
monitor has stored every record, then prints a summary read back from ClickHouse and
writes a self-contained HTML report (:mod:`.report`).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import asdict
from pathlib import Path
from typing import Any

from shadowpipe.config import ConfigError, Settings, env_name

CHALLENGERS = ("gbm-v2", "primary-copy")
SPAN_S = 4 * 3600


def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    demo = sub.add_parser("demo", parents=[common], help="run a realistic shadow evaluation "
                          "end to end on the embedded stack and write an HTML report")
    demo.add_argument("--events", type=int, default=12000, help="requests to simulate")
    demo.add_argument("--seed", type=int, default=7, help="seed of data, traffic and models")
    demo.add_argument("--wall-seconds", type=float, default=45.0,
                      help="wall-clock time over which four hours of traffic are replayed")
    demo.add_argument("--out", type=Path, default=None,
                      help="output directory (default: <home>/demo/<run id>)")
    demo.set_defaults(func=demo_cmd)


def demo_settings(settings: Settings, run_id: str) -> Settings:
    """The demo's own topics, database, segments and drift features on the same stack."""
    return settings.replace(
        topic_prefix=f"demo-{run_id}.",
        clickhouse_database=f"demo_{run_id}",
        segments=("clinic", "device"),
        drift_features=("worst_area", "worst_concave_points", "mean_radius"),
        window_s=600,
        # Four simulated hours pass in under a minute, so partitions drift hours apart in
        # event time; the run is finite: the worker closes every window when it stops.
        allowed_lateness_s=SPAN_S,
        monitor_close_on_stop="all",
        alert_cooldown_s=3600,
        feedback_horizon_s=86400,
    )


def write_challengers(world: Any, out: Path) -> Path:
    """Save the challenger and the control with joblib and declare them for the worker."""
    import joblib

    joblib.dump(world.challenger, out / "challenger.joblib")
    joblib.dump(world.primary, out / "control.joblib")
    all_features = json.dumps(world.names)
    primary_features = json.dumps(world.primary_features)
    path = out / "challengers.toml"
    path.write_text(
        f'[[challengers]]\nname = "{CHALLENGERS[0]}"\nversion = "2.0"\nkind = "sklearn"\n'
        f'location = "{out / "challenger.joblib"}"\nfeatures = {all_features}\n\n'
        f'[[challengers]]\nname = "{CHALLENGERS[1]}"\nversion = "1.0"\nkind = "sklearn"\n'
        f'location = "{out / "control.joblib"}"\nfeatures = {primary_features}\n'
        "is_control = true\n"
    )
    return path


def write_policy(out: Path) -> Path:
    """The demo's verdict policy: the defaults, but label maturity at the 0.9 quantile.

    The demo's labels arrive after a lognormal delay (median 10 simulated minutes), whose
    0.99 quantile (~1.7 h, more where the arms differ) would leave most of the two
    simulated hours after the scanner change unjudged; at 0.9 (~40 min) they count.
    """
    path = out / "policy.toml"
    path.write_text("[defaults.gates]\nmaturity_quantile = 0.9\n")
    return path


def demo_cmd(args: argparse.Namespace, settings: Settings) -> int:
    from shadowpipe.demo.report import summarize, write_report

    if args.events < 100:
        raise ConfigError("--events", f"{args.events} is too few for a meaningful run (>= 100)")
    run_id = f"{args.seed}_{uuid.uuid4().hex[:6]}"
    settings = demo_settings(settings, run_id)
    out = args.out or settings.home_path / "demo" / run_id
    out.mkdir(parents=True, exist_ok=True)
    _say(f"shadowpipe demo: run {run_id}, {args.events} requests, output in {out}")
    _ensure_stack(settings)
    from shadowpipe.demo.world import World

    world = World.build(seed=args.seed)
    settings = settings.replace(challengers=str(write_challengers(world, out)),
                                policy=str(write_policy(out)))
    requests = list(world.requests(args.events, seed=args.seed, span_s=SPAN_S))
    worker = _start_worker(settings, out)
    try:
        alerts = _AlertCollector(settings)
        sent, expected, start_ms = _run_traffic(settings, world, requests, args, worker)
        _wait_stored(settings, expected, worker)
    finally:
        _stop(worker)
    data = summarize(settings)  # the stopped worker closed the last windows (alerts too)
    alerts.stop()
    data["alerts_received"] = alerts.received
    data["sent"] = asdict(sent)
    shift_s = next((r.offset_s for r in requests if r.shifted), None)
    data["run"] = {"id": run_id, "events": args.events, "seed": args.seed,
                   "database": settings.clickhouse_database, "topic_prefix": settings.topic_prefix,
                   "shift_ms": None if shift_s is None else start_ms + int(shift_s * 1000)}
    report = write_report(data, out / "report.html")
    (out / "summary.json").write_text(json.dumps(data, indent=1, default=str))
    from shadowpipe.demo.report import print_summary

    print_summary(data)
    _say(f"report: {report}")
    return 0


def _ensure_stack(settings: Settings) -> None:
    """Use the configured Kafka and Redis if they answer; otherwise start the embedded stack."""
    from shadowpipe.kafka import check_reachable, ensure_topics
    from shadowpipe.stack import EmbeddedStack
    from shadowpipe.stores import check_redis

    try:
        check_reachable(settings, "demo", timeout_s=2)
        check_redis(settings, "demo")
    except ConfigError:
        for line in EmbeddedStack(settings).up():
            _say("  " + line)
        return
    created = ensure_topics(settings)
    _say(f"  using the running stack at {settings.kafka_bootstrap}; {len(created)} topics created")


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _start_worker(settings: Settings, out: Path) -> subprocess.Popen:
    log = open(out / "worker.log", "ab")  # noqa: SIM115 - owned by the child process
    env = {**os.environ, **settings.to_env()}
    proc = subprocess.Popen([sys.executable, "-m", "shadowpipe.cli", "worker", "all"],
                            env=env, stdout=log, stderr=log, start_new_session=True)
    from shadowpipe.stack import port_open

    deadline = time.monotonic() + 90
    while not port_open(settings.web_host, settings.web_port):
        if proc.poll() is not None:
            raise ConfigError(env_name("challengers"), f"worker exited at start-up; see "
                              f"{out / 'worker.log'}", "demo")
        if time.monotonic() > deadline:
            raise ConfigError(env_name("web_port"), "worker not ready after 90 s", "demo")
        time.sleep(0.2)
    return proc


def _run_traffic(settings: Settings, world: Any, requests: list, args: argparse.Namespace,
                 worker: subprocess.Popen) -> tuple[Any, dict[str, int], int]:
    from rich.progress import Progress

    from shadowpipe.demo.service import serve
    from shadowpipe.producers import Emitter

    emitter = Emitter(settings, name="demo-service")
    span_ms = int(requests[-1].offset_s * 1000)
    start_ms = int(time.time() * 1000) - span_ms  # the simulated run ends now
    with Progress(transient=False) as bar:
        task = bar.add_task("serving traffic", total=len(requests))
        sent = serve(world, requests, emitter, start_ms, args.wall_seconds,
                     lambda n: bar.advance(task, n))
    emitter.close(30)
    stats = emitter.stats()
    if stats.dropped or stats.failed:
        _say(f"  producer dropped {stats.dropped}, failed {stats.failed}")
    n = len(CHALLENGERS)
    return sent, {"published": sent.inferences * n, "labelled": sent.feedback * n}, start_ms


def _wait_stored(settings: Settings, expected: dict[str, int], worker: subprocess.Popen,
                 timeout_s: float = 240.0) -> None:
    """Poll the monitor (through its query endpoint) until every record is in ClickHouse."""
    from rich.progress import Progress

    from shadowpipe.processors.monitor.compare import fetch

    total = expected["published"] + expected["labelled"]
    deadline = time.monotonic() + timeout_s
    with Progress() as bar:
        task = bar.add_task("pipeline catching up", total=total)
        while time.monotonic() < deadline:
            if worker.poll() is not None:
                raise ConfigError("worker", f"exited with {worker.returncode}", "demo")
            reply = fetch(settings, "arms", {"since_ms": 0, "challenger": "", "by": ""})
            rows = [dict(zip(reply["columns"], r, strict=True)) for r in reply["rows"]]
            done = sum(r["published"] for r in rows) + sum(r["labelled"] for r in rows)
            bar.update(task, completed=min(done, total))
            if done >= total:
                return
            time.sleep(1.0)
    _say(f"  warning: pipeline incomplete after {timeout_s:.0f} s; summarising what arrived")


def _stop(worker: subprocess.Popen) -> None:
    if worker.poll() is None:
        os.killpg(worker.pid, signal.SIGTERM)
        try:
            worker.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(worker.pid, signal.SIGKILL)
            worker.wait()


class _AlertCollector:
    """Follows the alert topic in a thread: the alerts a subscriber would have received."""

    def __init__(self, settings: Settings) -> None:
        from shadowpipe.processors.monitor.alerts import follow

        self.received: list[dict[str, Any]] = []
        self._done = threading.Event()
        self._thread = threading.Thread(
            target=lambda: self.received.extend(follow(settings, stop=self._done.is_set)),
            daemon=True)
        self._thread.start()

    def stop(self) -> None:
        time.sleep(1.0)  # alerts published with the last batch
        self._done.set()
        self._thread.join(10)
