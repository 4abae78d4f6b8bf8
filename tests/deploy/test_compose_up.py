"""deploy/docker-compose.yml brought up for real, where Docker works: Redis, balancers, a worker
group, and the gateway answer an OpenAI completion on the published port, then the stack stops.
Skipped, saying why, where there is no usable Docker (no daemon, no compose plugin): then only the
static checks of tests/deploy/test_files.py and test_commands.py run."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest

from broker.embedded import free_port
from tests.deploy.commands import DEPLOY

pytestmark = [pytest.mark.slow, pytest.mark.integration]


def _docker_problem() -> str | None:
    """Why the stack cannot be brought up here; None when it can."""
    if shutil.which("docker") is None:
        return "no docker binary on PATH"
    for argv, what in ((["docker", "info"], "the Docker daemon does not answer"),
                       (["docker", "compose", "version"], "the docker compose plugin is missing")):
        try:
            done = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            return f"{what} ({exc})"
        if done.returncode != 0:
            return f"{what}: {(done.stderr or done.stdout).strip().splitlines()[-1][:200]}"
    return None


def _post(url: str, body: dict[str, object]) -> tuple[int, dict[str, object]]:
    request = urllib.request.Request(url, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


def test_the_compose_stack_serves_a_completion_through_the_gateway(tmp_path: Path) -> None:
    problem = _docker_problem()
    if problem is not None:
        print(f"compose stack not brought up: {problem}")
        pytest.skip(f"compose stack not brought up: {problem}")
    port = free_port()
    env = {**os.environ, "RYZ_MODEL": "random:tiny", "RYZ_MODELS_DIR": str(tmp_path), "RYZ_GATEWAY_PORT": str(port),
           "RYZ_REDIS_PORT": str(free_port())}
    compose = ["docker", "compose", "-p", f"ryztest{uuid.uuid4().hex[:6]}", "-f", str(DEPLOY / "docker-compose.yml")]
    try:
        subprocess.run([*compose, "up", "--build", "-d", "--wait", "--wait-timeout", "900"], env=env, check=True,
                       timeout=1800)
        deadline = time.monotonic() + 120
        while True:  # healthy containers; the first request may still race the first heartbeat
            status, body = _post(f"http://127.0.0.1:{port}/v1/completions",
                                 {"model": "random:tiny", "prompt": "hello", "max_tokens": 4, "temperature": 0})
            if status == 200 or time.monotonic() > deadline:
                break
            time.sleep(2)
        assert status == 200, body
        assert body["usage"]["completion_tokens"] >= 1  # type: ignore[index]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=10) as answer:
            assert json.loads(answer.read())["status"] == "ok"
    finally:
        subprocess.run([*compose, "down", "-v", "--timeout", "60"], env=env, check=False, timeout=300)
