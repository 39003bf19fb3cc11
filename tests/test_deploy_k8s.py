"""deploy/k8s: every rendered object against the Kubernetes schemas (offline,
kubernetes-validate), and against the project: settings, commands, health paths, consumer
groups and topics. No cluster runs here.

KEDA's ScaledObject and the Prometheus Operator's PodMonitor are CRDs whose schemas are not
shipped offline: they get a structural check of the fields used (known keys, types, and
that each field names something that exists), not a schema validation."""

from __future__ import annotations

import shutil
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from shadowpipe.cli import build_parser
from shadowpipe.config import Settings
from shadowpipe.processors.join.service import INPUT_KINDS
from shadowpipe.processors.join.service import group_id as join_group
from shadowpipe.processors.monitor.agent import group_id as monitor_group
from shadowpipe.processors.runtime.health import paths
from shadowpipe.processors.shadow.challengers import load, parse_specs
from shadowpipe.processors.shadow.service import group_id as shadow_group
from shadowpipe.processors.verdict.policy import Policy
from shadowpipe.processors.worker import PROCESSORS
from tests.k8s_render import render

kubernetes_validate = pytest.importorskip("kubernetes_validate")

K8S = Path(__file__).resolve().parents[1] / "deploy" / "k8s"
FOLDERS = {"base": K8S / "base", "example": K8S / "overlays" / "example"}
SETTINGS = set(Settings.load(env={}).to_env())
# The oldest Kubernetes still commonly run and the newest schemas shipped.
K8S_VERSIONS = ("1.29.0", kubernetes_validate.latest_version())
CRDS = {("keda.sh/v1alpha1", "ScaledObject"), ("monitoring.coreos.com/v1", "PodMonitor")}


@pytest.fixture(scope="module", params=sorted(FOLDERS))
def rendered(request: pytest.FixtureRequest) -> list[dict[str, Any]]:
    return render(FOLDERS[request.param])


def _one(objs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    (obj,) = [o for o in objs if o["kind"] == kind and o["metadata"]["name"] == name]
    return obj


def _settings(objs: list[dict[str, Any]]) -> dict[str, str]:
    return _one(objs, "ConfigMap", "shadowpipe-settings")["data"]


def _pod(deployment: dict[str, Any]) -> dict[str, Any]:
    return deployment["spec"]["template"]["spec"]


def test_every_core_object_validates_against_the_kubernetes_schemas(rendered: list) -> None:
    kinds = set()
    for obj in rendered:
        if (obj["apiVersion"], obj["kind"]) in CRDS:
            continue
        for version in K8S_VERSIONS:
            kubernetes_validate.validate(obj, version, strict=True)  # raises on any error
        kinds.add(obj["kind"])
    assert {"Deployment", "ConfigMap", "Service", "Job"} <= kinds


def test_schema_validation_catches_a_mistake() -> None:
    (bad,) = [o for o in render(FOLDERS["base"]) if o["kind"] == "Deployment"][:1]
    _pod(bad)["containers"][0]["resources"]["requests"]["cpu"] = {"cores": 1}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, K8S_VERSIONS[-1], strict=True)


def test_one_deployment_per_processor_running_its_worker(rendered: list) -> None:
    parser = build_parser()
    port = int(_settings(rendered)["SHADOWPIPE_WEB_PORT"])
    for name in PROCESSORS:
        dep = _one(rendered, "Deployment", f"shadowpipe-{name}")
        assert dep["spec"]["selector"]["matchLabels"].items() <= (
            dep["spec"]["template"]["metadata"]["labels"].items())
        (container,) = _pod(dep)["containers"]
        assert container["args"] == ["worker", name]
        parser.parse_args(container["args"])  # SystemExit on an unknown command
        (web,) = container["ports"]
        assert (web["name"], web["containerPort"]) == ("web", port)
        ready, stats = paths(name)
        assert container["readinessProbe"]["httpGet"] == {"path": ready, "port": "web"}
        assert container["livenessProbe"]["httpGet"] == {"path": stats, "port": "web"}
        assert container["startupProbe"]["httpGet"]["path"] == stats
        assert {"cpu", "memory"} <= set(container["resources"]["requests"])
        assert "memory" in container["resources"]["limits"]


def test_the_monitor_runs_alone(rendered: list) -> None:
    dep = _one(rendered, "Deployment", "shadowpipe-monitor")
    assert dep["spec"]["replicas"] == 1
    assert dep["spec"]["strategy"]["type"] == "Recreate"
    assert _one(rendered, "ScaledObject", "shadowpipe-monitor")["spec"]["maxReplicaCount"] == 1


def test_settings_and_secrets_are_real_settings(rendered: list) -> None:
    data = _settings(rendered)
    assert set(data) <= SETTINGS, set(data) - SETTINGS
    Settings.load(env=data)  # ConfigError on a malformed value
    for secret in (o for o in rendered if o["kind"] == "Secret"):
        keys = set(secret.get("stringData", {})) | set(secret.get("data", {}))
        assert keys <= SETTINGS, keys - SETTINGS
    for obj in rendered:
        for c in _pod(obj).get("containers", []) if obj["kind"] in ("Deployment", "Job") \
                else []:
            for source in c["envFrom"]:
                ref = source.get("configMapRef") or source["secretRef"]
                assert ref.get("optional") or any(
                    o["metadata"]["name"] == ref["name"] for o in rendered), ref


def test_mounted_challengers_and_policy_are_valid_where_the_settings_point(
        rendered: list) -> None:
    data = _settings(rendered)
    files = _one(rendered, "ConfigMap", "shadowpipe-files")["data"]
    for name in ("shadow", "monitor"):
        pod = _pod(_one(rendered, "Deployment", f"shadowpipe-{name}"))
        (mount,) = pod["containers"][0]["volumeMounts"]
        (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
        assert volume["configMap"]["name"] == "shadowpipe-files"
        for setting in ("SHADOWPIPE_CHALLENGERS", "SHADOWPIPE_POLICY"):
            path = Path(data[setting])
            assert str(path.parent) == mount["mountPath"] and path.name in files, setting
    specs = parse_specs(tomllib.loads(files["challengers.toml"]), 1000)
    assert [load(s) for s in specs]  # the base's callable control really loads
    assert Policy.parse(files["policy.toml"]).for_challenger("any")


def _workers() -> dict[str, tuple[str, set[str]]]:
    """Each worker's consumer group and input topics, from the code."""
    s = Settings.load(env={})
    return {"shadow": (shadow_group(s), {s.topic("inference")}),
            "join": (join_group(s), {s.topic(k) for k in INPUT_KINDS}),
            "monitor": (monitor_group(s), {s.topic("joined")})}


# Keys of KEDA's ScaledObject spec and kafka trigger metadata used or allowed here (KEDA
# docs, scalers/apache-kafka): anything else is a typo KEDA would ignore or reject.
SCALED_OBJECT_KEYS = {"scaleTargetRef", "minReplicaCount", "maxReplicaCount",
                      "cooldownPeriod", "pollingInterval", "triggers", "advanced"}
KAFKA_KEYS = {"bootstrapServers", "consumerGroup", "topic", "lagThreshold",
              "activationLagThreshold", "offsetResetPolicy", "allowIdleConsumers",
              "scaleToZeroOnInvalidOffset", "limitToPartitionsWithLag"}


def test_keda_scales_each_worker_on_its_own_group_and_topics(rendered: list) -> None:
    data = _settings(rendered)
    for name, (group, topics) in _workers().items():
        obj = _one(rendered, "ScaledObject", f"shadowpipe-{name}")
        spec = obj["spec"]
        assert set(spec) <= SCALED_OBJECT_KEYS, set(spec) - SCALED_OBJECT_KEYS
        assert _one(rendered, "Deployment", spec["scaleTargetRef"]["name"])
        assert 1 <= spec["minReplicaCount"] <= spec["maxReplicaCount"]
        # more consumers than partitions sit idle
        assert spec["maxReplicaCount"] <= int(data["SHADOWPIPE_PARTITIONS"])
        seen = set()
        for trigger in spec["triggers"]:
            meta = trigger["metadata"]
            assert trigger["type"] == "kafka" and set(meta) <= KAFKA_KEYS, meta
            assert meta["bootstrapServers"] == data["SHADOWPIPE_KAFKA_BOOTSTRAP"]
            assert meta["consumerGroup"] == group
            assert all(isinstance(v, str) for v in meta.values())  # KEDA wants strings
            assert int(meta["lagThreshold"]) > 0
            seen.add(meta["topic"])
        assert seen == topics, name


def test_prometheus_scrapes_every_worker_pod_on_its_web_port(rendered: list) -> None:
    (monitor,) = [o for o in rendered if o["kind"] == "PodMonitor"]
    spec = monitor["spec"]
    assert set(spec) <= {"selector", "podMetricsEndpoints", "namespaceSelector", "jobLabel"}
    (endpoint,) = spec["podMetricsEndpoints"]
    assert endpoint["path"] == "/metrics" and endpoint["port"] == "web"
    for name in PROCESSORS:
        labels = _one(rendered, "Deployment", f"shadowpipe-{name}")["spec"]["template"][
            "metadata"]["labels"]
        assert all(_matches(expr, labels) for expr in spec["selector"]["matchExpressions"])
        assert spec["selector"].get("matchLabels", {}).items() <= labels.items()


def _matches(expr: dict[str, Any], labels: dict[str, str]) -> bool:
    assert expr["operator"] in ("In", "NotIn", "Exists", "DoesNotExist")
    present = expr["key"] in labels
    return {"In": present and labels.get(expr["key"]) in expr.get("values", []),
            "NotIn": labels.get(expr["key"]) not in expr.get("values", []),
            "Exists": present, "DoesNotExist": not present}[expr["operator"]]


def test_the_overlay_changes_what_it_says() -> None:
    base, example = render(FOLDERS["base"]), render(FOLDERS["example"])
    assert {o["metadata"]["namespace"] for o in example} == {"ml-shadow"}
    images = {c["image"] for o in example if o["kind"] in ("Deployment", "Job")
              for c in _pod(o)["containers"]}
    assert images == {"registry.example.com/ml/shadowpipe:0.1.0"}
    # a patch merges: the rest of the base's settings stay
    assert _settings(base).keys() <= _settings(example).keys()


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="no kubectl: only the Python "
                    "rendering (tests/k8s_render.py) is checked")
@pytest.mark.parametrize("folder", sorted(FOLDERS))
def test_python_rendering_equals_kubectl_kustomize(folder: str) -> None:
    out = subprocess.run(["kubectl", "kustomize", str(FOLDERS[folder])], capture_output=True,
                         text=True, check=True, timeout=120).stdout
    key = lambda o: (o["kind"], o["metadata"]["name"])  # noqa: E731
    assert sorted(yaml.safe_load_all(out), key=key) == sorted(render(FOLDERS[folder]), key=key)
