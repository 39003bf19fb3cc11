"""Redis and ClickHouse clients built from :class:`~shadowpipe.config.Settings`.

ClickHouse URLs: ``http(s)://user:password@host:port/database`` for a server, or
``chdb:///absolute/path`` for the embedded engine (one process owns a data directory).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from shadowpipe.config import ConfigError, Settings, env_name

CLUSTER_SCHEME = "redis+cluster"


def redis_client(settings: Settings, **kwargs: Any) -> Any:
    """A ``redis.Redis`` client for ``settings.redis_url``, or a ``RedisCluster`` for
    ``redis+cluster://host:port[,host:port...]`` (start-up nodes of a Redis Cluster).

    >>> redis_client(Settings.load(env={})).__class__.__name__
    'Redis'
    >>> url = "redis+cluster://127.0.0.1:7000,127.0.0.1:7001"
    >>> [(n.host, n.port) for n in cluster_nodes(url)]
    [('127.0.0.1', 7000), ('127.0.0.1', 7001)]
    """
    import redis

    if is_cluster_url(settings.redis_url):
        from redis.cluster import RedisCluster

        # Connects at once (reads the slot map): an unreachable cluster fails here.
        return RedisCluster(startup_nodes=cluster_nodes(settings.redis_url), **kwargs)
    return redis.Redis.from_url(settings.redis_url, **kwargs)


def is_cluster_url(url: str) -> bool:
    """Whether ``url`` names a Redis Cluster.

    >>> is_cluster_url("redis+cluster://h:7000"), is_cluster_url("redis://h:6379/0")
    (True, False)
    """
    return url.startswith(CLUSTER_SCHEME + "://")


def cluster_nodes(url: str) -> list[Any]:
    """The start-up nodes of a ``redis+cluster://`` URL (any reachable master will do)."""
    from redis.cluster import ClusterNode

    hosts = urlparse(url).netloc.rpartition("@")[2]
    return [ClusterNode(h.rpartition(":")[0], int(h.rpartition(":")[2] or 6379))
            for h in hosts.split(",") if h]


def check_redis(settings: Settings, service: str) -> None:
    """Raise :class:`ConfigError` naming the Redis setting if Redis does not answer PING."""
    import redis

    try:
        redis_client(settings, socket_connect_timeout=3, socket_timeout=3).ping()
    except (redis.RedisError, redis.exceptions.RedisClusterException) as exc:
        raise ConfigError(
            env_name("redis_url"), f"Redis at {settings.redis_url} unreachable: {exc}", service
        ) from None


def clickhouse_client(settings: Settings, **kwargs: Any) -> Any:
    """A clickhouse-connect client: HTTP for a server, chdb for the embedded engine."""
    import clickhouse_connect

    url = urlparse(settings.clickhouse)
    if url.scheme == "chdb":
        path = Path(unquote(url.path)).expanduser()
        path.mkdir(parents=True, exist_ok=True)
        return clickhouse_connect.get_client(interface="chdb", path=str(path), **kwargs)
    return clickhouse_connect.get_client(
        interface=url.scheme,
        host=url.hostname,
        port=url.port or (8443 if url.scheme == "https" else 8123),
        username=unquote(url.username or "default"),
        password=unquote(url.password or ""),
        **kwargs,
    )


def check_clickhouse(settings: Settings, service: str) -> Any:
    """Connect and ``SELECT 1``; return the client or raise :class:`ConfigError`.

    The one-line error says why (``Connection refused``, a name that does not resolve...);
    the retry warnings urllib3 and clickhouse-connect log on the way are not printed.
    """
    import clickhouse_connect  # noqa: F401 - its loggers (and urllib3's) exist to be quieted

    try:
        with _quiet("urllib3", "clickhouse_connect"):
            client = clickhouse_client(settings)
            client.command("SELECT 1")
        return client
    except Exception as exc:  # clickhouse-connect and chdb raise assorted types
        raise ConfigError(
            env_name("clickhouse_url"),
            f"ClickHouse at {settings.clickhouse} unusable: {_why(exc)}",
            service,
        ) from None


@contextmanager
def _quiet(*names: str) -> Iterator[None]:
    """Silence these libraries' loggers and their children (a parent's ``disabled`` does not
    reach them): a failed start-up check says why in one line."""
    existing = list(logging.root.manager.loggerDict)
    loggers = [logging.getLogger(name) for name in existing
               if any(name == n or name.startswith(n + ".") for n in names)]
    saved = [lg.disabled for lg in loggers]
    for lg in loggers:
        lg.disabled = True
    try:
        yield
    finally:
        for lg, disabled in zip(loggers, saved, strict=True):
            lg.disabled = disabled


_ERRNO = re.compile(r"\[Errno -?\d+\] ([^'\"()]+)")


def _why(exc: BaseException) -> str:
    """The root cause of a connection failure, short: ``Connection refused``.

    >>> _why(OSError("HTTPConnectionPool(...): Max retries exceeded ... ([Errno 111] "
    ...              "Connection refused)"))
    'Connection refused'
    >>> _why(ValueError("HTTP status 404\\nmore"))
    'HTTP status 404'
    """
    text = str(exc)
    found = _ERRNO.search(text)
    if found:
        return found.group(1).strip()
    first = text.splitlines()[0] if text else type(exc).__name__
    return first if len(first) <= 200 else first[:200] + "..."
