"""Stopping when Redis went first: one SIGTERM stops a worker group or a balancer whose Redis is
gone, with no traceback; the embedded broker stays up until its clients have left."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis

from broker.cli import wait_for_clients
from broker.embedded import EmbeddedRedis
from broker.keys import Keys
from tests.integration.conftest import wait_for, wait_groups

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]


def _spawn(module: str, url: str, log: Path, *args: str) -> subprocess.Popen[bytes]:
    env = {**os.environ, "RYZ_REDIS_URL": url, "RYZ_PREFIX": "shut", "PYTHONUNBUFFERED": "1"}
    with open(log, "wb") as out:
        return subprocess.Popen([sys.executable, "-m", module, *args], env=env, cwd=REPO, stdout=out,
                                stderr=subprocess.STDOUT)


def test_one_sigterm_stops_a_worker_and_a_balancer_whose_redis_is_gone(tmp_path: Path) -> None:
    server = EmbeddedRedis().start()
    procs = []
    try:
        procs = [_spawn("gpu_workers", server.url, tmp_path / "worker.log", "--model", "echo", "--group", "g1"),
                 _spawn("balancer", server.url, tmp_path / "balancer.log")]
        r = redis.Redis.from_url(server.url)
        wait_groups(r, Keys("shut"), {"g1"})
        wait_for(lambda: r.zcard(Keys("shut").balancers) == 1, what="the balancer's first read")
        r.close()
        server.kill()  # the broker went first
        time.sleep(0.5)  # both loops meet the dead connection and start retrying
        for proc in procs:
            proc.send_signal(signal.SIGTERM)  # once
        for proc in procs:
            assert proc.wait(15) == 0
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        server.stop()
    worker_log = (tmp_path / "worker.log").read_text()
    assert "redis unreachable while draining" in worker_log, worker_log
    for log in ("worker.log", "balancer.log"):
        assert "Traceback" not in (tmp_path / log).read_text(), (tmp_path / log).read_text()


def test_the_broker_waits_for_its_clients_to_leave() -> None:
    now = [0.0]

    def clock() -> float:
        now[0] += 0.05
        return now[0]

    with EmbeddedRedis() as server:  # of its own: other tests' clients stay connected to the shared one
        client = redis.Redis.from_url(server.url)
        client.ping()
        assert wait_for_clients(server.url, within_s=0.3, poll_s=0.0, monotonic=clock) == 1  # gave up
        client.close()
        assert wait_for_clients(server.url, within_s=5.0, poll_s=0.0, monotonic=clock) == 0
