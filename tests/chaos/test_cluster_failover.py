"""SIGKILL a Redis Cluster master mid-run: its replica is promoted, and the balancer, the groups and the
clients carry on against it (a cluster of its own: the session's stays whole).

What is acknowledged before the kill and replicated is answered. Replication is asynchronous and
ryzanstein sends no WAIT, so what the killed master acknowledged in its last instant and had not yet
sent to its replica may be lost (docs/OPERATIONS.md, "Redis Cluster"); on loopback that window is well
under a millisecond, and the test keeps its own submissions out of it with WAIT (the client's choice).
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from broker.connection import connect
from broker.keys import Keys
from broker.settings import Settings
from producer.client import Client
from tests.integration.conftest import Procs, all_finished, wait_for, wait_groups
from tests.integration.test_backends import STARTUP_S, check_answered_once
from tests.redis_cluster import LocalCluster

pytestmark = [pytest.mark.chaos, pytest.mark.integration]


@pytest.fixture
def cluster() -> Iterator[LocalCluster]:
    with LocalCluster() as own:
        yield own


@pytest.fixture
def procs_on(cluster: LocalCluster, keys: Keys, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Procs]:
    log_dir = tmp_path / "logs"
    log_dir.mkdir()
    env = {**os.environ, "RYZ_REDIS_URL": cluster.url, "RYZ_PREFIX": keys.prefix, "PYTHONUNBUFFERED": "1"}
    manager = Procs(env, log_dir)
    yield manager
    manager.stop_all()
    report = getattr(request.node, "rep_call", None)
    if report is not None and report.failed:
        print(manager.logs(), file=sys.stderr)


def submit_replicated(cluster: LocalCluster, keys: Keys, n: int, *, tag: str, replicas: int = 1) -> dict[str, str]:
    """``n`` streamed requests (distinct prompts) written to the ingress master and acknowledged by
    ``replicas`` replicas (WAIT): outside the window of unreplicated writes. id -> prompt."""
    prompts = {f"{tag}{i}": f"{i:03d} {tag} " + "x" * 30 for i in range(n)}
    with cluster.node(cluster.master_of(keys.requests)) as conn:
        pipe = conn.pipeline(transaction=False)
        for rid, prompt in prompts.items():
            pipe.xadd(keys.requests, {"id": rid, "prompt": prompt, "stream": "1", "max_tokens": "64"})
        pipe.execute()
        assert conn.wait(replicas, 1500) >= replicas
    return prompts


@pytest.mark.parametrize("victim", ["ingress", "registry"])
def test_master_sigkill_mid_run(cluster: LocalCluster, procs_on: Procs, keys: Keys, victim: str) -> None:
    r = connect(cluster.url, Settings())
    procs_on.balancer()
    procs_on.worker("g1", RYZ_ECHO_TOKEN_DELAY_MS="20")
    procs_on.worker("g2", RYZ_ECHO_TOKEN_DELAY_MS="20")
    wait_groups(r, keys, {"g1", "g2"}, timeout=STARTUP_S)
    before = submit_replicated(cluster, keys, 60, tag="b")
    wait_for(lambda: sum(r.exists(keys.result(rid)) for rid in before) >= 5, what="streams under way")
    port = cluster.master_of(keys.requests if victim == "ingress" else keys.groups)
    killed_at = time.monotonic()
    cluster.kill(port)
    cluster.wait_healthy(timeout_s=30)
    promoted_s = time.monotonic() - killed_at
    assert port not in cluster.primaries()

    after = submit_replicated(cluster, keys, 20, tag="a", replicas=0)  # the promoted master has no replica
    client = Client(cluster.url, prefix=keys.prefix)
    assert client.generate("after the failover", max_tokens=32, timeout=60).text == "after the failover"
    client.close()
    everything = {**before, **after}
    wait_for(lambda: all_finished(r, keys, list(everything)), timeout=90, what="every request")
    check_answered_once(r, keys, everything)
    assert r.xpending(keys.requests, "balancers")["pending"] == 0
    print(f"{victim} master killed: replica promoted in {promoted_s:.2f}s (cluster-node-timeout 500 ms)")
    r.close()

