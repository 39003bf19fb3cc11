"""``shadowpipe demo``: the whole product on real parts, on one machine, in a few minutes.

Starts the embedded stack, trains the models of :mod:`.world`, runs every processor in a
worker process, serves simulated traffic through the producer library, waits until the
monitor has stored every record, then prints a summary read back from ClickHouse
(:mod:`.summary`) and writes ``shadowpipe report``'s self-contained HTML report. A worker
that fails is explained (its last error lines, its log); the embedded broker and Redis are
left running for ``compare``, and the last lines say how to stop them.
"""

from __future__ import annotations

import argparse
import json
import threading
import time
import uuid
from dataclasses import asdict
from pathlib import Path
from typing import Any

from shadowpipe.config import ConfigError, Settings
from shadowpipe.demo.worker import DemoFailed, Worker, explain, wait_for
from shadowpipe.demo.worker import say as _say

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
    if args.events < 100:
        raise ConfigError("--events", f"{args.events} is too few for a meaningful run (>= 100)")
    run_id = f"{args.seed}_{uuid.uuid4().hex[:6]}"
    settings = demo_settings(settings, run_id)
    out = args.out or settings.home_path / "demo" / run_id
    out.mkdir(parents=True, exist_ok=True)
    _say(f"shadowpipe demo: run {run_id}, {args.events} requests, output in {out}")
    _ensure_stack(settings)
    try:
        return _run(args, settings, run_id, out)
    except DemoFailed as exc:
        _say(f"shadowpipe demo: failed: {exc}")
        return 1
    finally:
        _stack_note(settings)


def _run(args: argparse.Namespace, settings: Settings, run_id: str, out: Path) -> int:
    """The run after the stack is up; 0 when every record was stored and summarised."""
    from shadowpipe.demo.summary import summarize
    from shadowpipe.demo.world import World

    world = World.build(seed=args.seed)
    settings = settings.replace(challengers=str(write_challengers(world, out)),
                                policy=str(write_policy(out)))
    requests = list(world.requests(args.events, seed=args.seed, span_s=SPAN_S))
    worker = Worker.start(settings, out / "worker.log")
    settings = worker.settings  # its web port may differ from the configured one
    try:
        alerts = _AlertCollector(settings)
        sent, expected, start_ms = _run_traffic(settings, world, requests, args, worker)
        complete = _wait_stored(settings, expected, worker)
    finally:
        worker.stop()
    _forget_state(settings)
    data = summarize(settings)  # the stopped worker closed the last windows (alerts too)
    alerts.stop({a["alert_id"] for a in data["overall"]["drift_events"]})
    data["alerts_received"] = alerts.received
    data["sent"] = asdict(sent)
    shift_s = next((r.offset_s for r in requests if r.shifted), None)
    data["run"] = {"id": run_id, "events": args.events, "seed": args.seed,
                   "database": settings.clickhouse_database, "topic_prefix": settings.topic_prefix,
                   "shift_ms": None if shift_s is None else start_ms + int(shift_s * 1000)}
    report = _write_report(settings, data["run"], out / "report.html")
    (out / "summary.json").write_text(json.dumps(data, indent=1, default=str))
    from shadowpipe.demo.summary import print_summary

    print_summary(data)
    _say(f"report: {report}")
    if not complete:
        raise DemoFailed("not every record reached ClickHouse: the summary above is partial")
    return 0


def _write_report(settings: Settings, run: dict[str, Any], path: Path) -> Path:
    """``shadowpipe report`` over the run, with the injected change marked on its plots."""
    from shadowpipe.processors.report import page
    from shadowpipe.processors.report.data import gather

    data = gather(settings)
    data["notes"] = [f"Demo run {run['id']}: {run['events']} requests, seed {run['seed']}; "
                     "clinic east changed scanner firmware halfway through (worst_* "
                     "measurements +30 %)."]
    if run["shift_ms"]:
        data["marks"] = [{"t_ms": run["shift_ms"], "label": "scanner change in clinic east"}]
    return page.write(data, path)


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


def _forget_state(settings: Settings) -> None:
    """Delete the run's Redis keys once its worker stopped: nothing reads them any more,
    and the embedded Redis persists them across restarts (pending joins live two days)."""
    from shadowpipe.stores import redis_client

    client = redis_client(settings)
    keys = list(client.scan_iter(match=f"{settings.topic_prefix}*", count=5000))
    for start in range(0, len(keys), 5000):
        client.unlink(*keys[start:start + 5000])


def _stack_note(settings: Settings) -> None:
    """The last lines: the embedded services of this home are left running, and how to stop
    them (the flags that differ from the defaults included)."""
    from shadowpipe.stack import EmbeddedStack

    running = [name for name, _, up in EmbeddedStack(settings).status()[:2] if up]
    if not running:
        return
    home = f" --home {settings.home}" if settings.home != Settings.home else ""
    addresses = "".join(f" --{name.replace('_', '-')} {getattr(settings, name)}"
                        for name in ("kafka_bootstrap", "redis_url")
                        if getattr(settings, name) != getattr(Settings, name))
    _say(f"The embedded {' and '.join(running)} keep running (for `shadowpipe compare "
         f"--clickhouse-database {settings.clickhouse_database}{home}`); stop them with: "
         f"shadowpipe stack down{home}{addresses}")


def _run_traffic(settings: Settings, world: Any, requests: list, args: argparse.Namespace,
                 worker: Worker) -> tuple[Any, dict[str, int], int]:
    from rich.progress import Progress

    from shadowpipe.demo.service import serve
    from shadowpipe.producers import Emitter

    emitter = Emitter(settings, name="demo-service")
    span_ms = int(requests[-1].offset_s * 1000)
    start_ms = int(time.time() * 1000) - span_ms  # the simulated run ends now
    with Progress(transient=False) as bar:
        task = bar.add_task("serving traffic", total=len(requests))
        sent = serve(world, requests, emitter, start_ms, args.wall_seconds,
                     lambda n: (bar.advance(task, n), worker.check()))
    # Generous: on a busy machine the broker may take a while to acknowledge the tail.
    purged = emitter.close(300)
    stats = emitter.stats()
    if stats.dropped or stats.failed:
        _say(f"  producer dropped {stats.dropped}, failed {stats.failed}")
    if purged:
        raise DemoFailed(f"the broker did not acknowledge {purged} events within 300 s")
    n = len(CHALLENGERS)
    return sent, {"published": sent.inferences * n, "labelled": sent.feedback * n}, start_ms


def _wait_stored(settings: Settings, expected: dict[str, int], worker: Worker,
                 stall_s: float = 300.0) -> bool:
    """Poll the monitor (through its query endpoint) until every record is in ClickHouse.
    Gives up (False) only when nothing new arrived for ``stall_s``: a busy machine makes
    the pipeline slow, not stuck."""
    from rich.progress import Progress

    total = expected["published"] + expected["labelled"]
    done, moved = -1, time.monotonic()
    with Progress() as bar:
        task = bar.add_task("pipeline catching up", total=total)
        while True:
            worker.check()
            now = _stored(settings)
            if now is not None and now != done:
                done, moved = now, time.monotonic()
                bar.update(task, completed=min(done, total))
            if done >= total:
                return True
            if time.monotonic() - moved > stall_s:
                break
            time.sleep(1.0)
    explain(f"the pipeline stored {max(done, 0)} of {total} records and nothing more for "
            f"{stall_s:.0f} s", worker.log)
    return False


def _stored(settings: Settings) -> int | None:
    """Records stored so far, from the running monitor's endpoint (never ClickHouse directly:
    the worker owns the embedded engine's directory); None when it does not answer in time."""
    from shadowpipe.processors.read import from_monitor, rows

    params = {"since_ms": 0, "challenger": "", "by": ""}
    try:
        reply = from_monitor(settings, "arms", params, timeout_s=120)
        found = rows(reply) if reply is not None else None
    except (ConfigError, ValueError, KeyError):  # busy, restarting, or not serving queries yet
        return None
    return None if found is None else sum(r["published"] + r["labelled"] for r in found)


class _AlertCollector:
    """Follows the alert topic in a thread: the alerts a subscriber would have received."""

    def __init__(self, settings: Settings) -> None:
        from shadowpipe.processors.monitor.alerts import follow

        # follow() imports the codec lazily; importing fastavro on the thread while the
        # main thread imports it for the producer can see a half-initialised module.
        from shadowpipe.schemas import codec  # noqa: F401

        self.received: list[dict[str, Any]] = []
        self._done = threading.Event()
        self._thread = threading.Thread(
            target=lambda: self.received.extend(follow(settings, stop=self._done.is_set)),
            daemon=True)
        self._thread.start()

    def stop(self, stored: set[str], deadline_s: float = 120.0) -> None:
        """Stop once every alert stored in ClickHouse (ids ``stored``) was received."""
        if not wait_for("the stored alerts on the alert topic", lambda: stored <= {
                a["alert_id"] for a in list(self.received)}, deadline_s, raise_=False):
            _say(f"  warning: {len(stored - {a['alert_id'] for a in self.received})} stored "
                 f"alerts were not received from the alert topic")
        self._done.set()
        self._thread.join(30)
