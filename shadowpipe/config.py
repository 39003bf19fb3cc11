"""All of shadowpipe's configuration, in one typed place.

Every setting is a field of :class:`Settings`. Each is read from the environment variable
``SHADOWPIPE_<FIELD>`` and can be overridden by the CLI flag ``--<field-with-dashes>``.
Defaults run the embedded stack on 127.0.0.1 (``shadowpipe stack up``).

>>> s = Settings.load(env={"SHADOWPIPE_PARTITIONS": "8"})
>>> s.partitions, s.topic("inference")
(8, 'shadowpipe.inference')
>>> Settings.load(env={"SHADOWPIPE_PARTITIONS": "zero"})
Traceback (most recent call last):
...
shadowpipe.config.ConfigError: SHADOWPIPE_PARTITIONS: 'zero' is not an integer
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

ENV_PREFIX = "SHADOWPIPE_"
TOPIC_KINDS = ("inference", "feedback", "predictions", "joined", "alerts", "deadletter",
               "verdicts", "review")


class ConfigError(Exception):
    """A setting is wrong or names something unreachable. ``str()`` is the one line to show."""

    def __init__(self, setting: str, message: str, service: str | None = None) -> None:
        self.setting = setting
        self.service = service
        where = f" [{service}]" if service else ""
        super().__init__(f"{setting}{where}: {message}")


def _opt(default: Any, help: str, **checks: Any) -> Any:
    return field(default=default, metadata={"help": help, **checks})


@dataclass(frozen=True)
class Settings:
    """Typed configuration. Build it with :meth:`load`; never mutate, use :meth:`replace`."""

    # Kafka
    kafka_bootstrap: str = _opt("127.0.0.1:19092", "Kafka bootstrap servers, host:port[,...]")
    kafka_security_protocol: str = _opt(
        "PLAINTEXT", "PLAINTEXT, SSL, SASL_PLAINTEXT or SASL_SSL",
        choices=("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"),
    )
    kafka_sasl_mechanism: str = _opt("", "PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512")
    kafka_sasl_username: str = _opt("", "SASL username")
    kafka_sasl_password: str = _opt("", "SASL password")
    kafka_ssl_ca_location: str = _opt("", "CA certificate file for SSL")
    kafka_ssl_certificate_location: str = _opt("", "client certificate file for SSL")
    kafka_ssl_key_location: str = _opt("", "client key file for SSL")
    schema_registry_url: str = _opt("", "Confluent Schema Registry URL; empty = single-object Avro")
    topic_prefix: str = _opt("shadowpipe.", "prefix of every topic name")
    topic_inference: str = _opt("inference", "inference events (from the producer library)")
    topic_feedback: str = _opt("feedback", "feedback / real outcomes")
    topic_predictions: str = _opt("predictions", "challenger predictions")
    topic_joined: str = _opt("joined", "joined records")
    topic_alerts: str = _opt("alerts", "drift and rule alerts")
    topic_deadletter: str = _opt("deadletter", "messages workers could not process")
    topic_verdicts: str = _opt("verdicts", "verdict events (keyed by challenger)")
    topic_review: str = _opt("review", "review requests for human reviewers "
                             "(shadowpipe review publish)")
    partitions: int = _opt(4, "partitions of each topic created by shadowpipe", min=1)
    replication_factor: int = _opt(1, "replication factor of created topics", min=1)
    # Redis and ClickHouse
    redis_url: str = _opt("redis://127.0.0.1:16379/0", "Redis URL (joiner state, checkpoints)")
    clickhouse_url: str = _opt(
        "", "http(s)://user:pass@host:8123/db for a server, chdb:///path for the embedded "
        "engine; empty = chdb under --home"
    )
    clickhouse_database: str = _opt("shadowpipe", "ClickHouse database")
    clickhouse_ttl_days: int = _opt(90, "TTL of joined records in ClickHouse", min=1)
    run: str = _opt("", "replay run id: results are read from and written to the ClickHouse "
                   "database <clickhouse_database>_replay_<run>; empty = the live results")
    # Embedded stack
    home: str = _opt("~/.shadowpipe", "state directory of the embedded stack (pids, logs, data)")
    # Workers
    web_port: int = _opt(
        6066, "web port of the worker (bound to --web-host)", min=1, max=65535
    )
    web_host: str = _opt("127.0.0.1", "address the workers' web endpoints bind to")
    sql_port: int = _opt(
        18123, "the monitor's read-only SQL endpoint (ClickHouse HTTP interface, "
        "docs/sql.md) on 127.0.0.1 while it owns the embedded engine; 0 = off; always off "
        "with a ClickHouse server", min=0, max=65535)
    sql_max_execution_s: int = _opt(10, "time limit of one query on the SQL endpoint, s", min=1)
    sql_max_rows: int = _opt(
        1_000_000, "row limit of one result on the SQL endpoint (clients read system.settings, "
        "~2,000 rows, on connect)", min=10_000)
    # Producer library (shadowpipe.producers)
    producer_sample_rates: tuple[str, ...] = _opt(
        (), "sampling rates MODEL=RATE, '*' for any other model (comma list; default all 1)")
    producer_drop_fields: tuple[str, ...] = _opt((), "feature/context fields never sent")
    producer_hash_fields: tuple[str, ...] = _opt(
        (), "feature/context fields sent as HMAC-SHA256 with --producer-hash-key")
    producer_hash_key: str = _opt("", "secret key of the hashed fields")
    producer_max_event_bytes: int = _opt(65536, "larger events are dropped, bytes", min=256)
    producer_max_buffer_bytes: int = _opt(
        32 << 20, "memory bound of events waiting for the broker, bytes", min=1 << 20)
    producer_block_ms: int = _opt(0, "max wait for queue space before dropping, ms", min=0)
    challengers: str = _opt("", "challengers file (TOML or JSON) for the shadow worker")
    shadow_batch_size: int = _opt(500, "max events per micro-batch in the shadow worker", min=1)
    shadow_batch_ms: int = _opt(50, "max wait to fill a micro-batch, ms", min=1)
    shadow_cpu_pinning: str = _opt(
        "auto", "auto: the shadow scoring loop and its threads share one CPU (Linux); off",
        choices=("auto", "off"),
    )
    challenger_timeout_ms: int = _opt(1000, "default per-batch timeout of a challenger, ms", min=1)
    feedback_horizon_s: int = _opt(7 * 86400, "how long the joiner waits for late parts, s", min=1)
    window_s: int = _opt(60, "monitor tumbling window size (event time), s", min=1)
    allowed_lateness_s: int = _opt(60, "how late an event may be and still count, s", min=0)
    segments: tuple[str, ...] = _opt((), "context attributes to slice metrics by (comma list)")
    drift_features: tuple[str, ...] = _opt((), "numeric features watched for covariate drift")
    alert_cooldown_s: int = _opt(
        600, "a firing alert condition resolves no sooner than this after it fired, s", min=0)
    alert_repeat_s: int = _opt(
        86400, "a still-firing alert condition is raised again after this, s", min=1)
    monitor_agreement_min_pct: int = _opt(
        80, "monitor rule: alert when a window's agreement is below this %", min=0, max=100)
    monitor_error_rate_max_pct: int = _opt(
        5, "monitor rule: alert when a challenger's error+timeout rate exceeds this %", min=0)
    monitor_model_time_sla_ms: int = _opt(
        250, "monitor rule: alert when a challenger's p95 model time exceeds this, ms", min=1)
    monitor_rule_min_records: int = _opt(50, "windows with fewer records trip no rule", min=1)
    monitor_drift_delta_exp: int = _opt(
        5, "ADWIN confidence: delta = 10^-N (higher = fewer false alarms, later)", min=1, max=12)
    monitor_psi_threshold_pct: int = _opt(
        25, "distribution drift alert when PSI vs the reference exceeds N/100", min=1)
    monitor_batch_size: int = _opt(5000, "max records per monitor micro-batch", min=1)
    monitor_batch_ms: int = _opt(200, "max wait to fill a monitor micro-batch, ms", min=1)
    monitor_idle_s: int = _opt(
        30, "with no record for this long, close the windows whose end + allowed lateness the "
        "wall clock has passed, s", min=1)
    monitor_close_on_stop: str = _opt(
        "due", "on SIGINT/SIGTERM: due = close due windows and store the open ones as "
        "provisional rows; all = close every window (a finite stream)", choices=("due", "all"))
    monitor_mode: str = _opt(
        "single", "single = one monitor process (a second is a hot standby); partitioned = "
        "N monitors in one consumer group, records re-keyed by series onto a repartition "
        "topic (processors/monitor/partitioned.py)", choices=("single", "partitioned"))
    monitor_sink: str = _opt(
        "on", "partitioned mode: this process also writes ClickHouse (joined records and the "
        "monitors' rows); with the embedded engine exactly one process may: off on the others",
        choices=("on", "off"))
    policy: str = _opt("", "verdict policy file (TOML); empty = the built-in defaults")
    verdict_interval_s: int = _opt(
        60, "the monitor re-evaluates every challenger's verdict this often, s", min=1)
    log_level: str = _opt("INFO", "DEBUG, INFO, WARNING or ERROR",
                          choices=("DEBUG", "INFO", "WARNING", "ERROR"))

    # -- construction --------------------------------------------------------------------

    @classmethod
    def load(
        cls, args: argparse.Namespace | None = None, env: Mapping[str, str] | None = None
    ) -> Settings:
        """Defaults, then ``SHADOWPIPE_*`` from ``env`` (default ``os.environ``), then flags."""
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        for f in fields(cls):
            flag = getattr(args, f.name, None) if args is not None else None
            if flag is not None:
                values[f.name] = _coerce(f, flag, "--" + f.name.replace("_", "-"))
            elif env_name(f.name) in env:
                values[f.name] = _coerce(f, env[env_name(f.name)], env_name(f.name))
        settings = cls(**values)
        settings.validate()
        return settings

    def replace(self, **changes: Any) -> Settings:
        """A copy with ``changes`` applied and validated."""
        settings = dataclasses.replace(self, **changes)
        settings.validate()
        return settings

    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the first setting that is malformed."""
        for f in fields(self):
            _check(f, getattr(self, f.name))
        for host_port in self.kafka_bootstrap.split(","):
            host, _, port = host_port.strip().rpartition(":")
            if not host or not port.isdigit():
                raise ConfigError(env_name("kafka_bootstrap"), f"{host_port!r} is not host:port")
        _check_url("redis_url", self.redis_url, ("redis", "rediss", "unix", "redis+cluster"))
        if self.clickhouse_url:
            _check_url("clickhouse_url", self.clickhouse_url, ("http", "https", "chdb"))
        if self.schema_registry_url:
            _check_url("schema_registry_url", self.schema_registry_url, ("http", "https"))

    def to_env(self) -> dict[str, str]:
        """The ``SHADOWPIPE_*`` variables that reproduce these settings in a child process."""
        return {env_name(f.name): _show(getattr(self, f.name), raw=True) for f in fields(self)}

    # -- derived -------------------------------------------------------------------------

    @property
    def home_path(self) -> Path:
        return Path(self.home).expanduser()

    @property
    def clickhouse(self) -> str:
        """The effective ClickHouse URL (embedded engine under ``home`` when unset)."""
        return self.clickhouse_url or f"chdb://{self.home_path / 'clickhouse'}"

    def topic(self, kind: str) -> str:
        """Full name of the topic for ``kind`` (one of :data:`TOPIC_KINDS`)."""
        return self.topic_prefix + getattr(self, f"topic_{kind}")

    def kafka_config(self, **overrides: Any) -> dict[str, Any]:
        """confluent-kafka / librdkafka client config with the security pass-through."""
        conf: dict[str, Any] = {
            "bootstrap.servers": self.kafka_bootstrap,
            "security.protocol": self.kafka_security_protocol,
        }
        optional = {
            "sasl.mechanism": self.kafka_sasl_mechanism,
            "sasl.username": self.kafka_sasl_username,
            "sasl.password": self.kafka_sasl_password,
            "ssl.ca.location": self.kafka_ssl_ca_location,
            "ssl.certificate.location": self.kafka_ssl_certificate_location,
            "ssl.key.location": self.kafka_ssl_key_location,
        }
        conf.update({k: v for k, v in optional.items() if v})
        conf.update(overrides)
        return conf


def env_name(field_name: str) -> str:
    """``kafka_bootstrap`` -> ``SHADOWPIPE_KAFKA_BOOTSTRAP``."""
    return ENV_PREFIX + field_name.upper()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add one ``--flag`` per setting; unset flags stay ``None`` so env vars apply."""
    group = parser.add_argument_group("configuration (each also from SHADOWPIPE_<NAME>)")
    for f in fields(Settings):
        group.add_argument(
            "--" + f.name.replace("_", "-"),
            dest=f.name,
            default=None,
            metavar=f.name.upper().split("_")[-1],
            # argparse %-formats help strings; settings may mention percentages.
            help=f"{f.metadata['help']} (default: {_show(f.default)})".replace("%", "%%"),
        )


def _show(value: Any, raw: bool = False) -> str:
    if isinstance(value, tuple):
        return ",".join(value)
    return str(value) if raw else repr(value)


def _coerce(f: dataclasses.Field, raw: Any, source: str) -> Any:
    text = str(raw).strip()
    if f.type in ("int", int):
        try:
            return int(text)
        except ValueError:
            raise ConfigError(source, f"{text!r} is not an integer") from None
    if f.type in ("tuple[str, ...]",):
        return tuple(part.strip() for part in text.split(",") if part.strip())
    return text


def _check(f: dataclasses.Field, value: Any) -> None:
    meta = f.metadata
    if "choices" in meta and value not in meta["choices"]:
        raise ConfigError(env_name(f.name), f"{value!r} is not one of {', '.join(meta['choices'])}")
    if "min" in meta and value < meta["min"]:
        raise ConfigError(env_name(f.name), f"{value} is below the minimum {meta['min']}")
    if "max" in meta and value > meta["max"]:
        raise ConfigError(env_name(f.name), f"{value} is above the maximum {meta['max']}")


def _check_url(name: str, url: str, schemes: tuple[str, ...]) -> None:
    parsed = urlparse(url)
    if parsed.scheme not in schemes:
        raise ConfigError(env_name(name), f"{url!r}: scheme must be one of {', '.join(schemes)}")
    if parsed.scheme != "chdb" and parsed.scheme != "unix" and not parsed.hostname:
        raise ConfigError(env_name(name), f"{url!r} has no host")
    if parsed.scheme == "chdb" and not parsed.path:
        raise ConfigError(env_name(name), f"{url!r} has no path (use chdb:///abs/path)")
