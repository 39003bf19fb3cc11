"""No container engine runs here: check the compose file against the real project."""

import re
from pathlib import Path

import yaml

from shadowpipe.cli import build_parser
from shadowpipe.config import Settings

REPO = Path(__file__).resolve().parents[1]
SETTINGS = set(Settings.load(env={}).to_env())


def _compose() -> dict:
    return yaml.safe_load((REPO / "docker-compose.yml").read_text())


def test_every_service_has_an_image_or_existing_build() -> None:
    services = _compose()["services"]
    assert {"kafka", "redis", "clickhouse", "worker-shadow", "worker-join",
            "worker-monitor"} <= set(services)
    for name, svc in services.items():
        if "build" in svc:
            context = REPO / svc["build"]["context"]
            assert (context / svc["build"]["dockerfile"]).exists(), name
        else:
            assert re.fullmatch(r"[\w./-]+:[\w.-]+", svc["image"]), name


def test_kafka_runs_in_kraft_mode() -> None:
    env = _compose()["services"]["kafka"]["environment"]
    assert "broker,controller" in env["KAFKA_PROCESS_ROLES"]
    assert _compose()["services"]["kafka"]["image"].startswith("apache/kafka:")


def test_shadowpipe_services_use_real_settings_and_commands() -> None:
    parser = build_parser()
    for name, svc in _compose()["services"].items():
        if "build" not in svc:
            continue
        unknown = {k for k in svc["environment"] if k.startswith("SHADOWPIPE_")} - SETTINGS
        assert not unknown, f"{name}: {unknown}"
        Settings.load(env={k: str(v) for k, v in svc["environment"].items()})
        parser.parse_args(svc["command"])  # exits (SystemExit) on an unknown command


def test_dockerfile_copies_what_exists() -> None:
    for line in (REPO / "deploy" / "Dockerfile").read_text().splitlines():
        if line.startswith("COPY "):
            for src in line.split()[1:-1]:
                assert (REPO / src).exists(), src


def test_volume_mounts_exist() -> None:
    for svc in _compose()["services"].values():
        for vol in svc.get("volumes", []):
            src = vol.split(":")[0]
            if src.startswith("./"):
                assert (REPO / src).exists(), src
