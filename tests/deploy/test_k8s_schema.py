"""Every Kubernetes manifest, rendered as ``kubectl apply -k deploy/k8s`` would (namespace and image
names set by kustomization.yaml), validates against the Kubernetes API schemas, offline: the
``kubernetes-validate`` package ships them. Custom resources (the Prometheus Operator's
ServiceMonitor, PrometheusRule; the LeaderWorkerSet of groups across nodes) have no schema there and
are checked for their own fields instead, a LeaderWorkerSet's pod templates as Pods."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest

from ryzanstein.cli import build_parser
from tests.deploy.commands import DEPLOY, expand, load_yaml_documents

kubernetes_validate = pytest.importorskip("kubernetes_validate")

K8S = DEPLOY / "k8s"
KUBERNETES_VERSION = "1.31.0"  # a version every maintained cluster serves these APIs at
CUSTOM_KINDS = {"ServiceMonitor", "PrometheusRule", "LeaderWorkerSet"}


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
    if obj["kind"] == "LeaderWorkerSet":
        assert obj["apiVersion"] == "leaderworkerset.x-k8s.io/v1", where
        for role, pod in lws_pods(obj).items():
            kubernetes_validate.validate(pod, KUBERNETES_VERSION, strict=True)
            assert pod["metadata"]["namespace"] == obj["metadata"]["namespace"], f"{where}: {role}"
        return
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


# --- groups across nodes (LeaderWorkerSet) ---------------------------------------------------------


def lws_pods(lws: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The leader's and the workers' pod templates of a LeaderWorkerSet, each as the Pod it makes."""
    spec = lws["spec"]["leaderWorkerTemplate"]
    return {role: {"apiVersion": "v1", "kind": "Pod",
                   "metadata": {**spec[f"{role}Template"].get("metadata", {}), "name": f"{lws['metadata']['name']}-0",
                                "namespace": lws["metadata"]["namespace"]},
                   "spec": spec[f"{role}Template"]["spec"]}
            for role in ("leader", "worker")}


def leader_worker_sets() -> list[dict[str, Any]]:
    return [obj for _, obj in manifests() if obj["kind"] == "LeaderWorkerSet"]


def torchrun_args(container: dict[str, Any], *, size: int, index: int) -> tuple[Any, list[str]]:
    """torchrun's parsed arguments and the worker's argv, with LWS's variables as in pod ``index``."""
    from torch.distributed.run import get_args_parser

    assert container["command"] == ["torchrun"], container["name"]
    values = {"LWS_GROUP_SIZE": str(size), "LWS_WORKER_INDEX": str(index),
              "LWS_LEADER_ADDRESS": "worker-0.worker.ryzanstein", "POD_NAME": f"worker-0-{index}"}
    args = get_args_parser().parse_args([expand(a, values) for a in container["args"]])
    return args, args.training_script_args


def test_a_leader_worker_set_runs_one_group_across_its_pods() -> None:
    """Every pod runs the same torchrun and worker arguments, meeting at the leader pod's address
    with node rank = the pod's index (so the leader pod holds rank 0, which talks to Redis and is
    probed); --tp is every rank of the group; the worker arguments parse with the real parser."""
    (lws,) = leader_worker_sets()
    size = lws["spec"]["leaderWorkerTemplate"]["size"]
    assert size >= 2 and lws["spec"]["leaderWorkerTemplate"]["restartPolicy"] == "RecreateGroupOnPodRestart"
    pods = lws_pods(lws)
    (leader,) = pods["leader"]["spec"]["containers"]
    (worker,) = pods["worker"]["spec"]["containers"]
    assert leader["args"] == worker["args"]  # same model, same limits: their collectives pair up
    for index, container in enumerate([leader] + [worker] * (size - 1)):
        args, worker_argv = torchrun_args(container, size=size, index=index)
        assert args.module and args.training_script == "gpu_workers"
        assert int(args.nnodes) == size and args.node_rank == index and args.rdzv_backend == "static"
        assert args.master_addr == "worker-0.worker.ryzanstein" and args.master_port > 0
        parsed = build_parser().parse_args(["worker", *worker_argv])
        assert parsed.tp == size * int(args.nproc_per_node) and parsed.device == "cuda"
        gpus = container["resources"]["limits"]["nvidia.com/gpu"]
        assert gpus == int(args.nproc_per_node)
    assert {p["containerPort"] for p in leader["ports"]} >= {9100, torchrun_args(leader, size=size, index=0)[0].master_port}
    assert leader["readinessProbe"]["httpGet"]["path"] == "/readyz" and "readinessProbe" not in worker
    secrets = {o["metadata"]["name"]: o for _, o in manifests() if o["kind"] == "Secret"}
    (redis_url,) = [e["valueFrom"]["secretKeyRef"] for e in leader["env"] if e["name"] == "RYZ_REDIS_URL"]
    assert redis_url["key"] in secrets[redis_url["name"]]["stringData"]
    claims = {o["metadata"]["name"] for _, o in manifests() if o["kind"] == "PersistentVolumeClaim"}
    for pod in pods.values():
        assert pod["spec"]["terminationGracePeriodSeconds"] > 30  # the leader drains (drain_timeout_s)
        assert {v["persistentVolumeClaim"]["claimName"] for v in pod["spec"]["volumes"]
                if "persistentVolumeClaim" in v} <= claims
