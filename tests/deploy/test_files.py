"""deploy/ files parse and hang together: YAML documents, compose, Kubernetes, Dockerfiles, systemd units.

Docker and kubectl are not available here: these tests check what can be checked without them
(syntax, references between files and objects, the probes' paths against the real endpoint).
"""

from __future__ import annotations

import re
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from broker.metrics import Probe, new_registry, serve_metrics
from broker.settings import Settings
from tests.deploy.commands import (
    DEPLOY,
    REPO,
    dockerfile_instructions,
    k8s_uses,
    k8s_workloads,
    load_yaml_documents,
    systemd_unit,
)

YAML_FILES = sorted([*DEPLOY.rglob("*.yaml"), *DEPLOY.rglob("*.yml")])
DRAIN_S = Settings().drain_timeout_s


def k8s_objects() -> list[dict[str, Any]]:
    return [doc for path in sorted((DEPLOY / "k8s").glob("*.yaml")) for doc in load_yaml_documents(path)
            if path.name != "kustomization.yaml"]


def containers(workload: dict[str, Any]) -> list[dict[str, Any]]:
    return [c for c in workload["spec"]["template"]["spec"]["containers"] if c["image"].startswith("ryzanstein")]


def duration_s(text: str) -> float:
    match = re.fullmatch(r"(\d+)(s|m)", text)
    assert match, text
    return int(match.group(1)) * (60 if match.group(2) == "m" else 1)


@pytest.mark.parametrize("path", YAML_FILES, ids=lambda p: str(p.relative_to(DEPLOY)))
def test_every_yaml_file_parses(path: Path) -> None:
    docs = load_yaml_documents(path)
    assert docs and all(isinstance(d, dict) for d in docs)


def test_there_are_the_promised_files() -> None:
    names = {str(p.relative_to(DEPLOY)) for p in DEPLOY.rglob("*") if p.is_file()}
    assert {"Dockerfile", "Dockerfile.cuda", "docker-compose.yml", "k8s/kustomization.yaml", "k8s/redis.yaml",
            "k8s/balancer.yaml", "k8s/worker.yaml", "k8s/worker-gpu.yaml", "k8s/worker-multihost.yaml", "k8s/servicemonitor.yaml",
            "k8s/gateway.yaml", "k8s/models.yaml", "monitoring/grafana-dashboard.json", "monitoring/alerts.yml",
            "systemd/ryzanstein-balancer@.service", "systemd/ryzanstein-worker@.service",
            "systemd/ryzanstein-gateway@.service"} <= names


# --- Dockerfiles -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["Dockerfile", "Dockerfile.cuda"])
def test_dockerfile_copies_real_files_and_runs_ryzanstein(name: str) -> None:
    instructions = dockerfile_instructions(DEPLOY / name)
    copied = [a.split()[:-1] for k, a in instructions if k == "COPY"]
    sources = [s for args in copied for s in args if not s.startswith("--")]
    assert sources, "nothing copied"
    for source in sources:  # the build context is the repository root
        assert (REPO / source).exists(), f"{name}: COPY {source}: no such file in the repository"
    listed = re.search(r"^packages = \[(.*)\]$", (REPO / "pyproject.toml").read_text(), flags=re.MULTILINE)
    assert listed, "pyproject.toml: no [tool.setuptools] packages list"
    packages = re.findall(r'"(\w+)"', listed.group(1))
    assert packages
    assert set(packages) <= {Path(s).name for s in sources}, f"{name}: not every package is copied"
    assert ("ENTRYPOINT", '["ryzanstein"]') in instructions
    assert any(k == "HEALTHCHECK" for k, _ in instructions)
    assert ("EXPOSE", "9100") in instructions
    ignored = (REPO / ".dockerignore").read_text().split()
    assert ".venv" in ignored and ".git" in ignored  # a local venv must not end up in the image


def test_cuda_image_builds_on_pytorch_cuda() -> None:
    instructions = dict(dockerfile_instructions(DEPLOY / "Dockerfile.cuda"))
    base = re.fullmatch(r"BASE_IMAGE=(\S+)", instructions["ARG"])
    assert base and base.group(1).startswith("pytorch/pytorch:2.13") and "cuda" in base.group(1)
    assert instructions["FROM"] == "${BASE_IMAGE}"
    cpu_runs = [a for k, a in dockerfile_instructions(DEPLOY / "Dockerfile") if k == "RUN"]
    (torch_run,) = [i for i, a in enumerate(cpu_runs) if "torch==" in a]
    (package_run,) = [i for i, a in enumerate(cpu_runs) if "pip install ." in a]
    # torch first, and from the CPU index, not the CUDA wheels from PyPI
    assert "download.pytorch.org/whl/cpu" in cpu_runs[torch_run] and torch_run < package_run


# --- docker compose --------------------------------------------------------------------------------


def test_compose_redis_persists_and_workers_scale() -> None:
    (compose,) = load_yaml_documents(DEPLOY / "docker-compose.yml")
    services = compose["services"]
    redis_cmd = services["redis"]["command"]
    assert redis_cmd[redis_cmd.index("--appendonly") + 1] == "yes"
    assert any(v.endswith(":/data") for v in services["redis"]["volumes"])
    for name in ("balancer", "worker"):
        service = services[name]
        # scalable: no fixed container name, no host port
        assert "container_name" not in service and "ports" not in service, name
        assert service["environment"]["RYZ_REDIS_URL"].startswith("redis://redis:")
        assert service["depends_on"]["redis"]["condition"] == "service_healthy"
        assert service["build"]["dockerfile"] == "deploy/Dockerfile"
        assert (DEPLOY / service["build"]["context"] / service["build"]["dockerfile"]).is_file()
        assert duration_s(service["stop_grace_period"]) > DRAIN_S
    gpu = services["worker-gpu"]
    assert (DEPLOY / gpu["build"]["context"] / gpu["build"]["dockerfile"]).is_file()
    (device,) = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert device["count"] == int(gpu["command"][gpu["command"].index("--tp") + 1])
    for name in ("prometheus", "grafana"):
        for volume in services[name]["volumes"]:
            assert (DEPLOY / volume.split(":")[0]).is_file(), volume
    # served end to end: a published gateway, a real model from the mounted directory
    gateway = services["gateway"]
    assert gateway["command"][:1] == ["gateway"] and gateway["command"][gateway["command"].index("--host") + 1] == "0.0.0.0"
    (published,) = gateway["ports"]
    assert published.endswith(":" + gateway["command"][gateway["command"].index("--port") + 1])
    assert gateway["healthcheck"]["test"] == ["CMD", "ryzanstein", "health"]  # the whole path
    worker = services["worker"]
    model = worker["command"][worker["command"].index("--model") + 1]
    assert model != "echo" and any(v.endswith(":/models:ro") for v in worker["volumes"])
    assert services["redis"]["ports"] == ["127.0.0.1:${RYZ_REDIS_PORT:-6379}:6379"]


# --- Kubernetes ------------------------------------------------------------------------------------


def test_every_object_is_well_formed_and_kustomization_lists_real_files() -> None:
    objects = k8s_objects()
    for obj in objects:
        assert {"apiVersion", "kind", "metadata"} <= set(obj), obj
        assert obj["metadata"]["name"]
        if obj["kind"] != "Namespace":
            assert obj["metadata"]["namespace"] == "ryzanstein"
    (kustomization,) = load_yaml_documents(DEPLOY / "k8s" / "kustomization.yaml")
    for resource in kustomization["resources"]:
        assert (DEPLOY / "k8s" / resource).is_file(), resource


def test_references_between_objects_resolve() -> None:
    objects = k8s_objects()
    by_kind: dict[str, dict[str, dict[str, Any]]] = {}
    for obj in objects:
        by_kind.setdefault(obj["kind"], {})[obj["metadata"]["name"]] = obj
    workloads = dict(k8s_workloads())
    for where, workload in workloads.items():
        spec = workload["spec"]
        labels = spec["template"]["metadata"]["labels"]
        assert spec["selector"]["matchLabels"].items() <= labels.items(), where
        if workload["kind"] == "StatefulSet":
            service = by_kind["Service"][spec["serviceName"]]
            assert service["spec"]["selector"].items() <= labels.items(), where
        for container in spec["template"]["spec"]["containers"]:
            for env in container.get("env", []):
                secret = env.get("valueFrom", {}).get("secretKeyRef")
                if secret:
                    assert secret["key"] in by_kind["Secret"][secret["name"]]["stringData"], where
            for source in container.get("envFrom", []):
                assert source["configMapRef"]["name"] in by_kind["ConfigMap"], where
    for where, workload in workloads.items():  # every volume claim is defined (no undefined PVC)
        for volume in workload["spec"]["template"]["spec"].get("volumes", []):
            claim = volume.get("persistentVolumeClaim")
            if claim:
                assert claim["claimName"] in by_kind["PersistentVolumeClaim"], where
    for ingress in by_kind["Ingress"].values():
        for rule in ingress["spec"]["rules"]:
            for path in rule["http"]["paths"]:
                backend = path["backend"]["service"]
                ports = {p["name"] for p in by_kind["Service"][backend["name"]]["spec"]["ports"]}
                assert backend["port"]["name"] in ports
    for service in by_kind["Service"].values():  # every Service selects some pods
        assert any(service["spec"]["selector"].items() <= w["spec"]["template"]["metadata"]["labels"].items()
                   for w in workloads.values()), service["metadata"]["name"]


def test_ryzanstein_pods_have_meaningful_probes_and_are_scraped() -> None:
    config = next(o for o in k8s_objects() if o["kind"] == "ConfigMap")["data"]
    metrics_port = int(config["RYZ_METRICS_PORT"])
    paths = set()
    for where, workload in k8s_workloads():
        pod = workload["spec"]["template"]
        if workload["metadata"]["name"] == "gateway":  # HTTP, no metrics endpoint: its /health is the path's
            (container,) = containers(workload)
            assert container["readinessProbe"]["httpGet"] == {"path": "/health", "port": "http"}
            assert container["livenessProbe"]["tcpSocket"] == {"port": "http"}
            continue
        for container in containers(workload):
            ports = {p["name"]: p["containerPort"] for p in container["ports"]}
            assert ports["metrics"] == metrics_port, where
            assert container["readinessProbe"]["httpGet"]["path"] == "/readyz", where
            assert container["livenessProbe"]["httpGet"]["path"] == "/livez", where
            for kind in ("readinessProbe", "livenessProbe", "startupProbe"):
                if kind in container:
                    assert container[kind]["httpGet"]["port"] in ports, f"{where}: {kind} on an unknown port"
                    paths.add(container[kind]["httpGet"]["path"])
            assert container["resources"]["requests"], where
            annotations = pod["metadata"]["annotations"]
            assert annotations["prometheus.io/scrape"] == "true"
            assert int(annotations["prometheus.io/port"]) == metrics_port
    # the probed paths are served, and answer by state (not 404)
    probe = Probe(ready_within_s=3.0, live_within_s=60.0)
    server = serve_metrics(new_registry(), probe, host="127.0.0.1", port=0)
    assert server is not None
    try:
        for path in [*paths, "/metrics"]:
            try:
                status = urllib.request.urlopen(f"http://127.0.0.1:{server.port}{path}", timeout=5).status
            except urllib.error.HTTPError as exc:
                status = exc.code
            assert status in (200, 503), path
    finally:
        server.close()


def test_worker_groups_drain_before_they_are_killed_and_gpu_groups_get_their_gpus() -> None:
    for where, workload in k8s_workloads():
        if workload["metadata"]["name"].startswith("worker"):
            assert workload["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > DRAIN_S, where
            assert "startupProbe" in containers(workload)[0], where  # model loading is not a hang
    for use in k8s_uses():
        if "--tp" not in use.argv:
            continue
        tp = int(use.argv[use.argv.index("--tp") + 1])
        name = use.where.split(":")[1]
        workload = next(w for where, w in k8s_workloads() if where.endswith(f":{name}"))
        resources = containers(workload)[0]["resources"]
        if "--device" in use.argv and use.argv[use.argv.index("--device") + 1] == "cuda":
            assert resources["limits"]["nvidia.com/gpu"] == tp, use.where
            assert resources["requests"]["nvidia.com/gpu"] == tp, use.where
        else:
            assert "nvidia.com/gpu" not in resources.get("limits", {}), use.where


def test_service_monitor_scrapes_the_metrics_ports() -> None:
    monitor = next(o for o in k8s_objects() if o["kind"] == "ServiceMonitor")
    wanted = set(monitor["spec"]["selector"]["matchExpressions"][0]["values"])
    services = {o["metadata"]["name"]: o for o in k8s_objects() if o["kind"] == "Service"}
    assert wanted <= set(services)
    for name in wanted:
        assert monitor["spec"]["endpoints"][0]["port"] in {p["name"] for p in services[name]["spec"]["ports"]}
        assert monitor["spec"]["selector"]["matchLabels"].items() <= services[name]["metadata"]["labels"].items()


# --- systemd ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", sorted((DEPLOY / "systemd").glob("*.service")), ids=lambda p: p.name)
def test_systemd_units(path: Path) -> None:
    unit = systemd_unit(path)
    assert set(unit.sections()) == {"Unit", "Service", "Install"}
    service = unit["Service"]
    assert service["ExecStart"].startswith("/opt/ryzanstein/.venv/bin/ryzanstein ")
    assert service["EnvironmentFile"] == "/etc/ryzanstein/ryzanstein.env"
    assert service["Restart"] == "always" and service["KillSignal"] == "SIGTERM"
    assert "%i" in service["ExecStart"]  # the instance names the metrics port: instances never collide
    if "worker" in path.name:
        assert float(service["TimeoutStopSec"]) > DRAIN_S
    assert service["RestartPreventExitStatus"] == "2"  # a configuration error is not restarted in a loop
