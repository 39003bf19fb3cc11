"""Scale-out on one machine: ``shadowpipe stack up --workers shadow=2,join=2,monitor=2``.

Starts that many ``shadowpipe worker KIND`` processes against the stack's broker, each on
its own web port (``SHADOWPIPE_WEB_PORT``); processes of one kind share its consumer group,
so Kafka splits the topics' partitions between them and moves a dead one's partitions to
the others (in ~10 s on the embedded broker). ``--redis-cluster N`` starts a local Redis
Cluster of N masters (:class:`~shadowpipe.redis_cluster.LocalRedisCluster`) and gives the
joiners ``SHADOWPIPE_REDIS_URL=redis+cluster://...``; the monitor keeps its checkpoints in
the stack's single Redis.

The monitor on the embedded ClickHouse (``chdb://``): one process may open the data
directory. With ``monitor_mode=single`` the first monitor is active and the others are
standbys (``python -m shadowpipe.fleet standby``): each waits until the directory is free
(the active one died or stopped), then runs ``worker monitor``, which resumes from the
Redis checkpoint. With ``monitor_mode=partitioned`` every monitor shares the series work
and only the first writes ClickHouse; the others run with ``monitor_sink=off`` under
``python -m shadowpipe.fleet sink-standby``, which restarts one of them with the sink on
once the directory is free, so the writes survive the sink's process. With a ClickHouse
server every monitor starts as a member of the group.

What ``up`` started is recorded in ``<home>/workers.json`` so that ``stack status`` shows
each process and its port and ``stack down`` stops exactly those.

>>> parse_workers("shadow=2,join=2,monitor=1")
{'shadow': 2, 'join': 2, 'monitor': 1}
>>> parse_workers("shadow=x")
Traceback (most recent call last):
...
shadowpipe.config.ConfigError: --workers: 'shadow=x': the count must be a whole number >= 0
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from urllib.parse import urlparse

from shadowpipe.config import ConfigError, Settings
from shadowpipe.stack import _pid_alive, _runs, free_port

KINDS = ("shadow", "join", "monitor")
STOP_S = 50.0  # a worker's own stop limit is 45 s (processors/worker.py)
STANDBY_POLL_S = 1.0
STANDBY_GRACE_S = 120.0  # the active monitor's start-up (imports, checks, migrations)


def parse_workers(spec: str) -> dict[str, int]:
    """``KIND=N[,KIND=N...]`` with KIND in :data:`KINDS`; :class:`ConfigError` otherwise."""
    counts: dict[str, int] = {}
    for item in (x.strip() for x in spec.split(",")):
        kind, eq, count = item.partition("=")
        if not eq or kind.strip() not in KINDS:
            raise ConfigError("--workers", f"{item!r}: expected KIND=N with KIND one of "
                                           f"{', '.join(KINDS)}")
        if not count.strip().isdigit():
            raise ConfigError("--workers", f"{item!r}: the count must be a whole number >= 0")
        counts[kind.strip()] = int(count)
    return counts


@dataclass
class Worker:
    """One process ``up`` started."""

    name: str
    kind: str
    pid: int
    port: int
    log: str
    standby: bool = False

    @property
    def stats_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/shadowpipe/{self.kind}/stats"

    def alive(self) -> bool:
        return _pid_alive(self.pid) and _runs(self.pid, "shadowpipe")


def get_json(url: str, timeout_s: float = 3.0) -> dict | None:
    """The JSON body at ``url`` (also of a 503), or None when nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as resp:
            return json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        with contextlib.suppress(ValueError):
            return json.loads(exc.read())
        return None
    except (OSError, ValueError):
        return None


def chdb_directory(settings: Settings) -> Path | None:
    """The embedded ClickHouse directory, None with a ClickHouse server."""
    url = urlparse(settings.clickhouse)
    return Path(url.path).expanduser() if url.scheme == "chdb" else None


def directory_held(path: Path) -> bool:
    """True while a process has the ClickHouse directory open: ClickHouse holds an
    exclusive ``flock`` on its ``status`` file for as long as it runs."""
    try:
        fd = os.open(path / "status", os.O_RDWR)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return True
    finally:
        os.close(fd)  # also drops our lock
    return False


def check_cluster_size(masters: int) -> None:
    """0 (no cluster) or >= 3 masters, else :class:`ConfigError` naming the flag."""
    if masters and masters < 3:
        raise ConfigError("--redis-cluster", f"{masters}: a Redis Cluster needs >= 3 masters")


class Fleet:
    """Worker processes (and a local Redis Cluster) of one stack home."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.home = settings.home_path
        self.state_file = self.home / "workers.json"

    # -- state ---------------------------------------------------------------------------

    def recorded(self) -> tuple[list[Worker], dict]:
        """The workers and the Redis Cluster (``{"url", "pids"}`` or ``{}``) on record."""
        try:
            state = json.loads(self.state_file.read_text())
        except (OSError, ValueError):
            return [], {}
        return [Worker(**w) for w in state.get("workers", [])], state.get("redis_cluster", {})

    def _record(self, workers: list[Worker], cluster: dict) -> None:
        self.home.mkdir(parents=True, exist_ok=True)
        if workers or cluster:
            self.state_file.write_text(json.dumps(
                {"workers": [asdict(w) for w in workers], "redis_cluster": cluster}, indent=1))
        else:
            self.state_file.unlink(missing_ok=True)

    # -- up ------------------------------------------------------------------------------

    def up(self, counts: dict[str, int], redis_cluster: int = 0,
           say: Callable[[str], None] = print, timeout_s: float = 180.0) -> None:
        """Start the Redis Cluster, then the workers; wait until each answers on its port,
        saying one line per step."""
        check_cluster_size(redis_cluster)
        workers, cluster = self.recorded()
        workers = [w for w in workers if w.alive()]
        if redis_cluster:
            cluster, line = self._cluster_up(cluster, redis_cluster)
            say(line)
            self._record(workers, cluster)
        started: list[Worker] = []
        for kind in KINDS:
            running = [w for w in workers if w.kind == kind]
            if running and counts.get(kind):
                say(f"{kind}: {len(running)} already running (stack down first to change "
                    "the count)")
                continue
            for n in range(1, counts.get(kind, 0) + 1):
                worker = self._spawn(kind, n, cluster.get("url", ""))
                started.append(worker)
                workers.append(worker)
                self._record(workers, cluster)
        self._wait_started(started, say, timeout_s)

    def _cluster_up(self, cluster: dict, masters: int) -> tuple[dict, str]:
        if cluster and all(_pid_alive(p) and _runs(p, "redis-server") for p in cluster["pids"]):
            return cluster, f"redis cluster: already running at {cluster['url']}"
        from shadowpipe.redis_cluster import LocalRedisCluster

        base = self.home / "redis-cluster"
        shutil.rmtree(base, ignore_errors=True)  # a previous cluster's slots and data
        local = LocalRedisCluster(masters, base).start()
        state = {"url": local.url, "pids": [p.pid for p in local.procs.values()],
                 "ports": local.ports}
        return state, (f"redis cluster: {masters} masters at {local.url} "
                       "(SHADOWPIPE_REDIS_URL of the joiners)")

    def _spawn(self, kind: str, n: int, cluster_url: str) -> Worker:
        name = f"{kind}-{n}"
        port = free_port()
        logs = self.home / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, **self.settings.to_env(), "SHADOWPIPE_WEB_PORT": str(port)}
        if kind == "join" and cluster_url:
            env["SHADOWPIPE_REDIS_URL"] = cluster_url
        role = self._monitor_role(n) if kind == "monitor" else ""
        standby = role == "standby"
        argv = ([sys.executable, "-m", "shadowpipe.fleet", role] if role else
                [sys.executable, "-m", "shadowpipe.cli", "worker", kind])
        log = logs / f"worker-{name}.log"
        with open(log, "ab") as out:
            proc = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
        return Worker(name, kind, proc.pid, port, str(log), standby)

    def _monitor_role(self, n: int) -> str:
        """How the ``n``-th monitor runs: ``""`` (``worker monitor``), or the
        :data:`ROLES` wrapper that runs it. The embedded ClickHouse admits one process: in
        ``monitor_mode=single`` the others wait as standbys, in ``partitioned`` they share
        the series work with the sink off and take the sink over when its process is gone
        (:func:`sink_standby`). With a ClickHouse server every one is a member."""
        if n == 1 or chdb_directory(self.settings) is None:
            return ""
        return "sink-standby" if self.settings.monitor_mode == "partitioned" else "standby"

    def _wait_started(self, started: list[Worker], say: Callable[[str], None],
                      timeout_s: float) -> None:
        """One line per worker once it answers on its port (a standby once it runs)."""
        deadline = time.monotonic() + timeout_s
        for w in started:
            while True:
                if not w.alive():
                    raise ConfigError("--workers", f"{w.name} exited at start-up; see {w.log}")
                body = None if w.standby else get_json(w.stats_url)
                if w.standby or body is not None:
                    break
                if time.monotonic() > deadline:
                    raise ConfigError("--workers", f"{w.name} not answering on port {w.port} "
                                                   f"after {timeout_s:.0f} s; see {w.log}")
                time.sleep(0.2)
            say(self._line(w, body))

    @staticmethod
    def _line(w: Worker, body: dict | None) -> str:
        if w.standby and body is None:
            return (f"{w.name}: pid {w.pid}, standby (takes over port {w.port} when the "
                    "active monitor releases the ClickHouse directory)")
        state = body.get("state", "?") if body else "not answering"
        parts = body.get("assigned_partitions") if body else None
        extra = f", partitions {parts}" if parts is not None else ""
        if body and body.get("mode") == "partitioned":
            sink = "on" if body.get("rows_written") is not None else "off"
            extra = f", series partitions {body.get('partitions')}, sink {sink}"
        return f"{w.name}: pid {w.pid}, port {w.port}, {state}{extra}, {w.stats_url}"

    # -- status and down -------------------------------------------------------------------

    def status(self) -> list[tuple[str, str, bool]]:
        """(name, detail, healthy) per recorded worker and the Redis Cluster."""
        workers, cluster = self.recorded()
        rows = []
        if cluster:
            up = all(_pid_alive(p) and _runs(p, "redis-server") for p in cluster["pids"])
            rows.append(("redis-cluster", cluster["url"], up))
        for w in workers:
            if not w.alive():
                rows.append((w.name, f"pid {w.pid} exited; see {w.log}", False))
                continue
            body = get_json(w.stats_url)
            rows.append((w.name, self._line(w, body).split(": ", 1)[1],
                         body is not None or w.standby))
        return rows

    def down(self) -> list[str]:
        """SIGTERM every recorded worker (SIGKILL after :data:`STOP_S`), then the cluster."""
        workers, cluster = self.recorded()
        report = []
        alive = [w for w in workers if w.alive()]
        t0 = time.monotonic()
        for w in alive:
            os.kill(w.pid, signal.SIGTERM)
        took = _wait_exits([w.pid for w in alive], t0 + STOP_S)
        for w in workers:
            if w not in alive:
                report.append(f"{w.name}: was not running")
            elif w.pid in took:
                report.append(f"{w.name}: stopped in {took[w.pid] - t0:.1f} s (pid {w.pid})")
            else:  # its process group: a standby's monitor child goes with it
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(w.pid, signal.SIGKILL)
                report.append(f"{w.name}: killed after {STOP_S:.0f} s (pid {w.pid}); the end "
                              f"of its log ({w.log}):\n{_tail(w.log)}")
        self._wait_directory_free(any(w.kind == "monitor" for w in alive))
        if cluster:
            pids = [p for p in cluster["pids"] if _pid_alive(p) and _runs(p, "redis-server")]
            for pid in pids:
                os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + 10
            while any(_pid_alive(p) for p in pids) and time.monotonic() < deadline:
                time.sleep(0.05)
            for pid in pids:
                if _pid_alive(pid):
                    os.kill(pid, signal.SIGKILL)
            report.append(f"redis cluster: stopped ({len(pids)} masters)")
        self._record([], {})
        return report


    def _wait_directory_free(self, monitors_stopped: bool, timeout_s: float = 30.0) -> None:
        """A stopped monitor shows as a zombie while its threads still hold the embedded
        ClickHouse directory: the next monitor started at once would be refused it."""
        path = chdb_directory(self.settings)
        deadline = time.monotonic() + timeout_s
        while (monitors_stopped and path is not None and directory_held(path)
               and time.monotonic() < deadline):
            time.sleep(0.1)


def _wait_exits(pids: list[int], deadline: float) -> dict[int, float]:
    """When (monotonic) each of ``pids`` exited, for those that did before ``deadline``."""
    exited: dict[int, float] = {}
    while len(exited) < len(pids) and time.monotonic() < deadline:
        for pid in pids:
            if pid not in exited and not _pid_alive(pid):
                exited[pid] = time.monotonic()
        time.sleep(0.1)
    return exited


def _tail(path: str, lines: int = 15) -> str:
    """The last ``lines`` lines of a worker's log (why it did not stop)."""
    try:
        text = Path(path).read_bytes()[-8192:].decode("utf-8", "replace")
    except OSError as exc:
        return f"  ({exc.strerror})"
    return "\n".join(f"  {line}" for line in text.splitlines()[-lines:])


class _Child:
    """The ``worker monitor`` child of a standby, SIGTERM and SIGINT passed on to it."""

    def __init__(self) -> None:
        self.proc: subprocess.Popen | None = None
        self.stopping = False
        self._passed: set[int] = set()  # children the stop was passed on to
        signal.signal(signal.SIGTERM, self._stop)
        signal.signal(signal.SIGINT, self._stop)

    def _stop(self, signum: int, _frame: object) -> None:
        self.stopping = True
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signum)
            self._passed.add(self.proc.pid)

    def start(self, sink: str | None = None) -> subprocess.Popen:
        """Run ``worker monitor`` (with ``SHADOWPIPE_MONITOR_SINK=sink`` if given)."""
        env = {**os.environ, **({"SHADOWPIPE_MONITOR_SINK": sink} if sink else {})}
        self.proc = subprocess.Popen([sys.executable, "-m", "shadowpipe.cli", "worker",
                                      "monitor"], env=env)
        if self.stopping and self.proc.pid not in self._passed:  # came while it started
            self.proc.send_signal(signal.SIGTERM)
        return self.proc

    def await_holder(self, path: Path | None) -> None:
        """Started with the monitor that opens the directory: let it take it first, or a
        standby could win the race and that monitor would exit at start-up."""
        grace = time.monotonic() + STANDBY_GRACE_S
        while (path is not None and not self.stopping and not directory_held(path)
               and time.monotonic() < grace):
            time.sleep(STANDBY_POLL_S / 4)


def standby(settings: Settings) -> int:
    """``monitor_mode=single``: wait while another process holds the ClickHouse directory,
    then run ``worker monitor`` in a child; again after it exits with 2 (it lost the race)."""
    path = chdb_directory(settings)
    child = _Child()
    child.await_holder(path)
    while not child.stopping:
        if path is not None and directory_held(path):
            time.sleep(STANDBY_POLL_S)
            continue
        code = child.start().wait()
        if code != 2 or child.stopping:
            return code
        time.sleep(STANDBY_POLL_S)
    return 0


def sink_standby(settings: Settings) -> int:
    """``monitor_mode=partitioned`` on the embedded ClickHouse, a monitor that does not run
    the sink: run ``worker monitor`` with ``monitor_sink=off`` (it shares the series work);
    once the directory is free (the sink's process died or stopped), stop it and run it
    again with the sink on, so the writes and the reads (queries, verdict, SQL) move to
    this process; with the sink off again if another monitor took the directory first (the
    child exits with 2). The restart moves this process's series partitions away and back
    (a rebalance; at-least-once as always)."""
    path = chdb_directory(settings)
    child = _Child()
    child.await_holder(path)
    sink = "off"
    while not child.stopping:
        proc = child.start(sink)
        while proc.poll() is None and (sink == "on" or child.stopping or path is None
                                       or directory_held(path)):
            time.sleep(STANDBY_POLL_S)
        if proc.poll() is None:
            print("[fleet] the sink's ClickHouse directory is free: restarting this "
                  "monitor with the sink on", file=sys.stderr, flush=True)
            proc.send_signal(signal.SIGTERM)
            proc.wait()
            sink = "on"
            continue
        if proc.returncode != 2 or sink == "off" or child.stopping:
            return proc.returncode
        sink = "off"  # another monitor took the directory first
        time.sleep(STANDBY_POLL_S)
    return 0


ROLES = {"standby": standby, "sink-standby": sink_standby}


if __name__ == "__main__":
    if len(sys.argv) != 2 or sys.argv[1] not in ROLES:
        sys.exit(f"usage: python -m shadowpipe.fleet {'|'.join(ROLES)} (started by `stack up`)")
    sys.exit(ROLES[sys.argv[1]](Settings.load()))
