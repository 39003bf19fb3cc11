"""Render deploy/k8s kustomizations in Python, for machines without kustomize/kubectl.

Only what deploy/k8s uses is implemented: ``resources`` (files and kustomization
folders), ``namespace``, ``labels`` (metadata only), ``images``, ``patches`` (strategic
merge by kind and name: maps merge, lists of named items merge by ``name``) and
``replacements`` with ``*`` over list items. Anything else is refused, so a new feature in
the manifests cannot be silently ignored here. tests/test_deploy_k8s.py compares this
rendering with ``kubectl kustomize`` where kubectl exists.

>>> from pathlib import Path
>>> objs = render(Path(__file__).parents[1] / "deploy" / "k8s" / "base")
>>> sorted({o["kind"] for o in objs})[:2]
['ConfigMap', 'Deployment']
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

KNOWN = {"apiVersion", "kind", "namespace", "labels", "resources", "images", "patches",
         "replacements"}
CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding",
                  "CustomResourceDefinition"}


def render(folder: Path) -> list[dict[str, Any]]:
    """Every object of the kustomization in ``folder``, as kustomize would emit it."""
    spec = yaml.safe_load((folder / "kustomization.yaml").read_text())
    unknown = set(spec) - KNOWN
    if unknown:
        raise NotImplementedError(f"{folder}: kustomization fields {sorted(unknown)}")
    objs: list[dict[str, Any]] = []
    for res in spec.get("resources", []):
        path = (folder / res).resolve()
        objs += render(path) if path.is_dir() else _load(path)
    for patch in spec.get("patches", []):
        _apply_patch(objs, _load(folder / patch["path"]))
    for rep in spec.get("replacements", []):
        _replace(objs, rep)
    for obj in objs:
        _transform(obj, spec)
    return objs


def _load(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _transform(obj: dict[str, Any], spec: dict[str, Any]) -> None:
    meta = obj.setdefault("metadata", {})
    if "namespace" in spec and obj["kind"] not in CLUSTER_SCOPED:
        meta["namespace"] = spec["namespace"]
    for group in spec.get("labels", []):
        if group.get("includeSelectors") or group.get("includeTemplates"):
            raise NotImplementedError("labels into selectors/templates")
        meta.setdefault("labels", {}).update(group["pairs"])
    for image in spec.get("images", []):
        for container in _containers(obj):
            name, _, tag = container["image"].partition(":")
            if name == image["name"]:
                new = image.get("newName", name)
                container["image"] = f"{new}:{image.get('newTag', tag)}" if (
                    "newTag" in image or tag) else new


def _containers(obj: dict[str, Any]) -> list[dict[str, Any]]:
    pod = obj.get("spec", {}).get("template", {}).get("spec", {})
    return pod.get("containers", []) + pod.get("initContainers", [])


def _apply_patch(objs: list[dict[str, Any]], patches: list[dict[str, Any]]) -> None:
    for patch in patches:
        matches = [o for o in objs if o["kind"] == patch["kind"]
                   and o["metadata"]["name"] == patch["metadata"]["name"]]
        if len(matches) != 1:
            raise ValueError(f"patch target {patch['kind']}/{patch['metadata']['name']}: "
                             f"{len(matches)} matches")
        _merge(matches[0], patch)


def _merge(into: dict[str, Any], patch: dict[str, Any]) -> None:
    for key, value in patch.items():
        old = into.get(key)
        if isinstance(old, dict) and isinstance(value, dict):
            _merge(old, value)
        elif (isinstance(old, list) and isinstance(value, list) and value
              and all(isinstance(v, dict) and "name" in v for v in old + value)):
            by_name = {v["name"]: v for v in old}
            for item in value:
                if item["name"] in by_name:
                    _merge(by_name[item["name"]], item)
                else:
                    old.append(copy.deepcopy(item))
        else:
            into[key] = copy.deepcopy(value)


def _replace(objs: list[dict[str, Any]], rep: dict[str, Any]) -> None:
    src = rep["source"]
    (source,) = [o for o in objs if o["kind"] == src["kind"]
                 and o["metadata"]["name"] == src["name"]]
    value = _get(source, src["fieldPath"].split("."))
    for target in rep["targets"]:
        for obj in objs:
            if all(obj.get(k) == v if k != "name" else obj["metadata"]["name"] == v
                   for k, v in target["select"].items()):
                for path in target["fieldPaths"]:
                    _set(obj, path.split("."), value)


def _get(node: Any, path: list[str]) -> Any:
    for key in path:
        node = node[key]
    return node


def _set(node: Any, path: list[str], value: Any) -> None:
    head, rest = path[0], path[1:]
    if head == "*":
        for item in node:
            _set(item, rest, value)
    elif not rest:
        node[head] = value
    else:
        _set(node[head], rest, value)
