import subprocess
import sys

import pytest

from shadowpipe.config import ConfigError, Settings, add_arguments, env_name


def test_env_then_flags_override() -> None:
    import argparse

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--partitions", "3", "--segments", "country,device"])
    s = Settings.load(args, env={"SHADOWPIPE_PARTITIONS": "8", "SHADOWPIPE_TOPIC_PREFIX": "x."})
    assert s.partitions == 3
    assert s.segments == ("country", "device")
    assert s.topic("joined") == "x.joined"


def test_defaults_point_at_embedded_stack() -> None:
    s = Settings.load(env={})
    assert s.kafka_bootstrap.startswith("127.0.0.1:")
    assert s.clickhouse.startswith("chdb://")
    assert s.redis_url.startswith("redis://127.0.0.1")


@pytest.mark.parametrize(
    ("env", "setting"),
    [
        ({"SHADOWPIPE_REDIS_URL": "http://x"}, "SHADOWPIPE_REDIS_URL"),
        ({"SHADOWPIPE_CLICKHOUSE_URL": "ftp://x"}, "SHADOWPIPE_CLICKHOUSE_URL"),
        ({"SHADOWPIPE_KAFKA_BOOTSTRAP": "nohost"}, "SHADOWPIPE_KAFKA_BOOTSTRAP"),
        ({"SHADOWPIPE_PARTITIONS": "0"}, "SHADOWPIPE_PARTITIONS"),
        ({"SHADOWPIPE_KAFKA_SECURITY_PROTOCOL": "TLS"}, "SHADOWPIPE_KAFKA_SECURITY_PROTOCOL"),
    ],
)
def test_malformed_setting_is_named(env: dict[str, str], setting: str) -> None:
    with pytest.raises(ConfigError) as err:
        Settings.load(env=env)
    assert err.value.setting == setting
    assert str(err.value).startswith(setting)


def test_security_pass_through() -> None:
    s = Settings.load(env={
        "SHADOWPIPE_KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
        "SHADOWPIPE_KAFKA_SASL_MECHANISM": "SCRAM-SHA-512",
        "SHADOWPIPE_KAFKA_SASL_USERNAME": "u",
        "SHADOWPIPE_KAFKA_SASL_PASSWORD": "p",
    })
    conf = s.kafka_config()
    assert conf["security.protocol"] == "SASL_SSL"
    assert conf["sasl.mechanism"] == "SCRAM-SHA-512"
    assert conf["sasl.username"] == "u" and conf["sasl.password"] == "p"
    assert "ssl.ca.location" not in conf


def test_to_env_round_trips() -> None:
    s = Settings.load(env={"SHADOWPIPE_SEGMENTS": "a,b", "SHADOWPIPE_WINDOW_S": "30"})
    assert Settings.load(env=s.to_env()) == s
    assert env_name("window_s") in s.to_env()


def test_unreachable_setting_stops_startup_with_one_line(tmp_path) -> None:
    """Nothing listens on the port: exit non-zero, one line naming setting and service."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.run(
        [sys.executable, "-m", "shadowpipe.cli", "smoke", "--no-stack",
         "--kafka-bootstrap", f"127.0.0.1:{port}"],
        capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "SHADOWPIPE_KAFKA_BOOTSTRAP" in lines[0] and "smoke" in lines[0]
    assert "Traceback" not in proc.stderr


def test_every_command_has_working_help() -> None:
    """`--help` formats every setting's help text (argparse chokes on a bare %)."""
    from shadowpipe.cli import build_parser

    parser = build_parser()
    stack = [parser]
    while stack:
        current = stack.pop()
        current.format_help()
        for action in current._actions:
            if hasattr(action, "choices") and isinstance(action.choices, dict):
                stack.extend(action.choices.values())
