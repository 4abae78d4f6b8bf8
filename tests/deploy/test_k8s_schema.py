"""Every Kubernetes manifest, rendered as ``kubectl apply -k deploy/k8s`` would (namespace and image
names set by kustomization.yaml), validates against the Kubernetes API schemas, offline: the
``kubernetes-validate`` package ships them. Custom resources (the Prometheus Operator's
ServiceMonitor, PrometheusRule) have no schema there and are checked for their own fields instead."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest

from tests.deploy.commands import DEPLOY, load_yaml_documents

kubernetes_validate = pytest.importorskip("kubernetes_validate")

K8S = DEPLOY / "k8s"
KUBERNETES_VERSION = "1.31.0"  # a version every maintained cluster serves these APIs at
CUSTOM_KINDS = {"ServiceMonitor", "PrometheusRule"}


def render(path: Path, kustomization: dict[str, Any]) -> list[dict[str, Any]]:
    """The objects of one file as kustomize emits them: namespace and image names replaced."""
    images = {i["name"]: i for i in kustomization.get("images", [])}
    out = []
    for doc in load_yaml_documents(path):
        obj = copy.deepcopy(doc)
        if obj["kind"] != "Namespace" and "namespace" in kustomization:
            obj["metadata"]["namespace"] = kustomization["namespace"]
        pod = obj.get("spec", {}).get("template", {}).get("spec", {})
        for container in pod.get("containers", []):
            name, _, tag = container["image"].partition(":")
            if name in images:
                container["image"] = images[name].get("newName", name) + (f":{tag}" if tag else "")
        out.append(obj)
    return out


def manifests() -> list[tuple[str, dict[str, Any]]]:
    (kustomization,) = load_yaml_documents(K8S / "kustomization.yaml")
    files = sorted(p for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")
    return [(f"{p.name}:{o['kind']}/{o['metadata']['name']}", o) for p in files for o in render(p, kustomization)]


@pytest.mark.parametrize(("where", "obj"), manifests(), ids=lambda v: v if isinstance(v, str) else "")
def test_manifest_validates_against_the_kubernetes_schema(where: str, obj: dict[str, Any]) -> None:
    if obj["kind"] in CUSTOM_KINDS:
        assert obj["apiVersion"].startswith("monitoring.coreos.com/"), where
        assert obj["spec"], where
        return
    # strict: an unknown field (a typo such as `readinesProbe`) fails, as `kubectl apply --validate=strict`
    kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)


def test_rendering_covers_the_gateway_the_models_volume_and_the_workers() -> None:
    kinds = {where.split(":")[1] for where, _ in manifests()}
    assert {"Deployment/gateway", "Service/gateway", "Ingress/gateway", "PersistentVolumeClaim/ryzanstein-models",
            "StatefulSet/worker", "StatefulSet/worker-tp2", "Deployment/balancer"} <= kinds


def test_a_broken_manifest_is_caught() -> None:
    _, deployment = next(m for m in manifests() if m[0].endswith("Deployment/gateway"))
    broken = copy.deepcopy(deployment)
    broken["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSION, strict=True)
