"""The Faust application the workers run, configured from :class:`Settings`.

One app per worker deployment: ``shadowpipe worker all`` registers every processor in one
process (the embedded default); ``shadowpipe worker join`` only the joiner. The app id,
and so the consumer group, is named after the processors it runs, so a group's members
always subscribe to the same topics.
"""

from __future__ import annotations

import socket
import ssl
from collections.abc import Sequence
from typing import Any

from shadowpipe.config import ConfigError, Settings, env_name


def app_id(settings: Settings, processors: Sequence[str]) -> str:
    """``shadowpipe.worker-join``; ``shadowpipe.worker-all`` for every processor."""
    return f"{settings.topic_prefix}worker-{'-'.join(processors)}"


def credentials(settings: Settings) -> Any:
    """Faust broker credentials mirroring the confluent-kafka security pass-through."""
    import faust

    protocol = settings.kafka_security_protocol
    context = None
    if protocol.endswith("SSL"):
        context = ssl.create_default_context(cafile=settings.kafka_ssl_ca_location or None)
        if settings.kafka_ssl_certificate_location:
            context.load_cert_chain(
                settings.kafka_ssl_certificate_location, settings.kafka_ssl_key_location or None
            )
    if protocol.startswith("SASL"):
        return faust.SASLCredentials(
            username=settings.kafka_sasl_username,
            password=settings.kafka_sasl_password,
            mechanism=settings.kafka_sasl_mechanism or "PLAIN",
            ssl_context=context,
        )
    return faust.SSLCredentials(context) if context else None


def check_web_port(settings: Settings, service: str) -> None:
    """Raise :class:`ConfigError` naming ``SHADOWPIPE_WEB_PORT`` if the port is taken: each
    worker process serves its own web endpoint, so separate processes need separate ports.

    >>> import socket
    >>> with socket.socket() as taken:
    ...     taken.bind(("127.0.0.1", 0)); taken.listen()
    ...     port = taken.getsockname()[1]
    ...     check_web_port(Settings.load(env={"SHADOWPIPE_WEB_PORT": str(port)}), "worker x")
    Traceback (most recent call last):
    ...
    shadowpipe.config.ConfigError: SHADOWPIPE_WEB_PORT [worker x]: ...
    """
    host, port = settings.web_host, settings.web_port
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        # As the web server binds (SO_REUSEADDR): a port in TIME_WAIT is free, a listener not.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            raise ConfigError(
                env_name("web_port"),
                f"port {port} on {host} is not free ({exc.strerror}); each worker process "
                "needs its own web port", service) from None


def make_app(settings: Settings, processors: Sequence[str], web_port: int | None = None) -> Any:
    """A Faust app for ``processors`` with raw (bytes) serialisation: decoding is ours."""
    import faust

    datadir = settings.home_path / "faust"
    datadir.mkdir(parents=True, exist_ok=True)  # Faust fails at start-up without it
    return faust.App(
        app_id(settings, processors),
        broker=[f"kafka://{hp.strip()}" for hp in settings.kafka_bootstrap.split(",")],
        broker_credentials=credentials(settings),
        key_serializer="raw",
        value_serializer="raw",
        topic_partitions=settings.partitions,
        topic_replication_factor=settings.replication_factor,
        topic_allow_declare=False,  # topics are created by `stack up` / deploy, not by workers
        # The embedded broker answers JoinGroup only after session timeout / 2.
        broker_session_timeout=6,
        broker_heartbeat_interval=1,
        broker_commit_interval=1.0,
        web_enabled=True,
        web_bind=settings.web_host,
        web_port=web_port or settings.web_port,
        web_host=settings.web_host,
        datadir=str(datadir),
        stream_buffer_maxsize=8192,
        # Offsets are committed only for acked (fully handled) messages, so a stop need not
        # wait for buffered ones: with a dead agent Faust's wait_empty never returned.
        stream_wait_empty=False,
        consumer_auto_offset_reset="earliest",
    )
