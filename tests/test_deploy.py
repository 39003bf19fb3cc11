"""No container engine runs here: check the compose file against the real project."""

import re
import tomllib
from pathlib import Path
from urllib.parse import urlparse

import yaml

from shadowpipe.cli import build_parser
from shadowpipe.config import Settings
from shadowpipe.processors.shadow.challengers import parse_specs
from shadowpipe.processors.verdict.policy import Policy

REPO = Path(__file__).resolve().parents[1]
SETTINGS = set(Settings.load(env={}).to_env())


def _compose() -> dict:
    return yaml.safe_load((REPO / "docker-compose.yml").read_text())


def test_every_service_has_an_image_or_existing_build() -> None:
    services = _compose()["services"]
    assert {"kafka", "redis", "clickhouse", "worker-shadow", "worker-join",
            "worker-monitor", "prometheus", "grafana"} <= set(services)
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


def test_prometheus_scrapes_every_worker_service_on_its_web_port() -> None:
    services = _compose()["services"]
    config = yaml.safe_load((REPO / "deploy" / "prometheus" / "prometheus.yml").read_text())
    (job,) = config["scrape_configs"]
    assert job["metrics_path"] == "/metrics"
    (sd,) = job["dns_sd_configs"]
    workers = {n for n, svc in services.items() if svc.get("command", [""])[0] == "worker"}
    assert set(sd["names"]) == workers == {"worker-shadow", "worker-join", "worker-monitor"}
    for name in workers:
        env = {k: str(v) for k, v in services[name]["environment"].items()}
        assert Settings.load(env=env).web_port == sd["port"], name


def test_grafana_reads_the_compose_clickhouse_and_prometheus() -> None:
    services = _compose()["services"]
    grafana = services["grafana"]
    mounts = dict(v.split(":")[:2] for v in grafana["volumes"] if v.startswith("./"))
    assert mounts["./deploy/grafana/provisioning"] == "/etc/grafana/provisioning"
    provider = yaml.safe_load((REPO / "deploy/grafana/provisioning/dashboards/"
                               "dashboards.yaml").read_text())["providers"][0]
    assert mounts["./deploy/grafana/dashboards"] == provider["options"]["path"]
    assert "grafana-clickhouse-datasource" in grafana["environment"]["GF_INSTALL_PLUGINS"]
    sources = {d["type"]: d for d in yaml.safe_load((
        REPO / "deploy/grafana/provisioning/datasources/datasources.yaml").read_text())[
            "datasources"]}
    assert urlparse(sources["prometheus"]["url"]).hostname in services
    ch = sources["grafana-clickhouse-datasource"]
    workers_ch = urlparse(services["worker-monitor"]["environment"][
        "SHADOWPIPE_CLICKHOUSE_URL"])
    assert (ch["jsonData"]["host"], ch["jsonData"]["port"], ch["jsonData"]["username"]) == (
        workers_ch.hostname, workers_ch.port, workers_ch.username)
    assert ch["jsonData"]["defaultDatabase"] == services["worker-monitor"]["environment"][
        "SHADOWPIPE_CLICKHOUSE_DATABASE"]
    # Grafana interpolates $CLICKHOUSE_PASSWORD from its environment
    assert ch["secureJsonData"]["password"] == "$CLICKHOUSE_PASSWORD"
    assert grafana["environment"]["CLICKHOUSE_PASSWORD"] == services["clickhouse"][
        "environment"]["CLICKHOUSE_PASSWORD"] == workers_ch.password


def test_file_settings_point_into_a_mount_of_the_worker_that_reads_them() -> None:
    services = _compose()["services"]
    for service, setting in (("worker-shadow", "SHADOWPIPE_CHALLENGERS"),
                             ("worker-monitor", "SHADOWPIPE_POLICY")):
        target = services[service]["environment"][setting]
        mounts = [v.split(":") for v in services[service]["volumes"]]
        (src,) = [s for s, dst, *_ in mounts if target.startswith(dst + "/")]
        local = REPO / src / target.split("/", 2)[2]
        assert local.is_file(), (service, setting, local)
    Policy.parse((REPO / "deploy/config/policy.toml").read_text()).for_challenger("x")
    assert parse_specs(tomllib.loads((REPO / "deploy/config/challengers.toml").read_text()), 1)


def test_every_service_the_docs_name_exists() -> None:
    services = set(_compose()["services"])
    text = (REPO / "docs" / "deploy.md").read_text()
    section = text.split("## docker compose", 1)[1].split("\n## ", 1)[0]
    named = set(re.findall(r"^\| `([\w-]+)` \|", section, re.M))
    assert named == services, named ^ services
