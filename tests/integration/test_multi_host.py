"""A tensor-parallel group across two hosts: torchrun with a c10d rendezvous on each of two network
namespaces joined by a veth pair (tests/integration/netns.py), gloo over that link, Redis on a
third. The group serves exact greedy tokens; a rank killed on host B stops the whole group, and its
work fails over to another group with every request answered once and right.

Needs root and ``ip netns`` (skipped otherwise, e.g. on CI runners without root)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from broker.keys import QUEUE_GROUP, Keys
from broker.registry import read_groups
from gpu_workers.engine import EXIT_ENGINE_FAILED
from tests.integration import test_tensor_parallel
from tests.integration.conftest import Procs, all_finished, final_events, wait_for, wait_groups
from tests.integration.netns import Host, NetnsUnavailable, TwoHosts, netns_of
from tests.integration.test_tensor_parallel import KV, children, gone, redis_ms, submit, tokens_of

pytestmark = pytest.mark.integration
RDZV_PORT = 29400  # host A's namespace is new: nothing else listens there
STARTUP_S = 240.0  # two ranks and a rendezvous on two cores that other work shares
DEAD_AFTER_S = 20.0

# the same model and one-process reference tokens as the one-host groups
model_dir = test_tensor_parallel.model_dir
reference = test_tensor_parallel.reference


@pytest.fixture(scope="module")
def hosts() -> Iterator[TwoHosts]:
    try:
        with TwoHosts() as made:
            yield made
    except NetnsUnavailable as e:
        pytest.skip(f"no network namespaces here: {e}")


@pytest.fixture
def net(hosts: TwoHosts, prefix: str, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Procs]:
    """Processes on the hosts' Redis; stopped after the test (torchrun's ranks too), logs printed on failure."""
    log_dir = tmp_path / "logs"
    log_dir.mkdir()
    env = {**os.environ, "RYZ_REDIS_URL": hosts.redis_url, "RYZ_PREFIX": prefix, "PYTHONUNBUFFERED": "1"}
    procs = Procs(env, log_dir)
    yield procs
    ranks = [pid for p in procs.started for pid in children(p.pid)]
    procs.stop_all()
    for pid in ranks:  # a torchrun killed in the stop leaves its ranks behind
        if not gone(pid):
            os.kill(pid, signal.SIGKILL)
    report = getattr(request.node, "rep_call", None)
    if report is not None and report.failed:
        print(procs.logs())


@pytest.fixture
def r(hosts: TwoHosts) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(hosts.redis_url)
    yield client
    client.close()


def run_on(procs: Procs, host: Host, name: str, *argv: str) -> subprocess.Popen[bytes]:
    """``python argv`` in ``host``'s namespace, on its own way to Redis."""
    log = open(procs.log_dir / f"{len(procs.started):02d}-{name}.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(host.argv(sys.executable, *argv), env={**procs.env, "RYZ_REDIS_URL": host.redis_url},
                            stdout=log, stderr=subprocess.STDOUT)
    log.close()
    procs.started.append(proc)
    return proc


def torchrun(procs: Procs, hosts: TwoHosts, host: Host, model_dir: Path, *, rendezvous: str,
             tp_timeout_s: float) -> subprocess.Popen[bytes]:
    """One host's torchrun of a 2-rank group "mh", one rank per host, meeting at host A's address.
    c10d ranks the hosts by --local-addr, so A (.1) holds rank 0, the leader; static (the form of
    deploy/k8s/worker-multihost.yaml) by --node-rank."""
    if rendezvous == "c10d":
        meet = ["--rdzv-backend", "c10d", "--rdzv-id", "mh", "--rdzv-endpoint", f"{hosts.a.address}:{RDZV_PORT}",
                "--rdzv-conf", f"is_host={int(host is hosts.a)}", "--local-addr", host.address]
    else:
        meet = ["--node-rank", str(int(host is hosts.b)), "--master-addr", hosts.a.address,
                "--master-port", str(RDZV_PORT)]
    return run_on(procs, host, f"torchrun-{host.name}", "-m", "torch.distributed.run",
                  "--nnodes", "2", "--nproc-per-node", "1", *meet,
                  "-m", "gpu_workers", "--model", str(model_dir), "--group", "mh", "--threads", "1",
                  "--tp-timeout", str(tp_timeout_s), *KV)


def start_group(procs: Procs, hosts: TwoHosts, model_dir: Path, r: redis.Redis, keys: Keys, *,
                rendezvous: str = "c10d", tp_timeout_s: float = 30.0) -> tuple[subprocess.Popen[bytes], subprocess.Popen[bytes], int, int]:
    """Both hosts' torchrun and a balancer (root namespace); waits for the group. Returns the two
    torchruns and the pids of the leader (rank 0, on A) and of the rank on B. The balancer fails a
    group over DEAD_AFTER_S after its last heartbeat: time for a test to look at the dead group's queue."""
    on_a = torchrun(procs, hosts, hosts.a, model_dir, rendezvous=rendezvous, tp_timeout_s=tp_timeout_s)
    on_b = torchrun(procs, hosts, hosts.b, model_dir, rendezvous=rendezvous, tp_timeout_s=tp_timeout_s)
    procs.balancer(RYZ_DEAD_AFTER_S=str(DEAD_AFTER_S))
    wait_groups(r, keys, {"mh"}, timeout=STARTUP_S)
    (leader,) = children(on_a.pid)
    (rank_b,) = children(on_b.pid)
    (group,) = read_groups(r, keys, dead_after_s=30.0)
    assert group.leader_pid == leader and group.tp == 2 and group.host == hosts.a.hostname
    assert group.rank_hosts == [hosts.a.hostname, hosts.b.hostname]
    assert netns_of(leader) == hosts.a.netns and netns_of(rank_b) == hosts.b.netns
    return on_a, on_b, leader, rank_b


def test_each_host_picks_the_interface_towards_the_rendezvous(hosts: TwoHosts) -> None:
    """Host B has two links besides loopback: gloo must bind to the one host A is reached by, and
    host A (the rendezvous is its own address) to the one that holds it; GLOO_SOCKET_IFNAME wins."""
    probe = ("import os, sys; from gpu_workers.parallel.network import choose_gloo_interface as c; "
             "env = dict(os.environ); print(c(sys.argv[1], 29400, env), env.get('GLOO_SOCKET_IFNAME'))")
    for host in (hosts.b, hosts.a):
        out = subprocess.run(host.argv(sys.executable, "-c", probe, hosts.a.address), capture_output=True,
                             text=True, timeout=60, check=True).stdout
        assert out.split()[-1] == host.interface and f"address='{host.address}'" in out
    told = subprocess.run(hosts.b.argv(sys.executable, "-c", probe, hosts.a.address), capture_output=True, text=True,
                          timeout=60, check=True, env={**os.environ, "GLOO_SOCKET_IFNAME": "lo"}).stdout.split()
    assert told == ["None", "lo"]


@pytest.mark.parametrize("rendezvous", ["c10d", "static"])
def test_group_across_two_hosts_serves_exact_tokens(net: Procs, hosts: TwoHosts, r: redis.Redis, keys: Keys,
                                                    model_dir: Path, reference: list[list[int]], rendezvous: str) -> None:
    start_group(net, hosts, model_dir, r, keys, rendezvous=rendezvous)
    ids = submit(r, keys)
    wait_for(lambda: all_finished(r, keys, ids), timeout=STARTUP_S, what="the two-host group to serve")
    for rid, expected in zip(ids, reference):
        (done,) = final_events(r, keys.result(rid))
        assert done[b"event"] == b"done" and json.loads(done[b"token_ids"]) == expected
        assert tokens_of(r, keys.result(rid)) == list(enumerate(expected))
    (group,) = read_groups(r, keys, dead_after_s=30.0)
    assert len(group.rank_weight_bytes) == 2 and group.rank_weight_bytes[0] == group.rank_weight_bytes[1] > 0


@pytest.mark.chaos
def test_rank_killed_on_host_b_stops_the_group_and_its_work_fails_over(
    net: Procs, hosts: TwoHosts, r: redis.Redis, keys: Keys, model_dir: Path, reference: list[list[int]]
) -> None:
    # A 60 s --tp-timeout: an exit within seconds can only come from the closed connection being seen.
    on_a, on_b, leader, rank_b = start_group(net, hosts, model_dir, r, keys, tp_timeout_s=60.0)
    ids = submit(r, keys)
    wait_for(lambda: all(tokens_of(r, keys.result(rid)) for rid in ids), timeout=60, what="generation to start")

    lost_ms = redis_ms(r)
    os.kill(rank_b, signal.SIGKILL)
    began = time.monotonic()
    wait_for(lambda: gone(leader), timeout=30, what="the leader on host A to exit")
    stopped_s = time.monotonic() - began
    assert stopped_s < 15.0, f"the leader took {stopped_s:.1f}s: the lost rank was not seen at once"
    # nothing wrong or final went out; every request waits in the dead group's queue
    assert int(r.hget(keys.group_info("mh"), "heartbeat_ms")) <= lost_ms + stopped_s * 1000 + 1000
    for rid, expected in zip(ids, reference):
        assert final_events(r, keys.result(rid)) == []
        published = tokens_of(r, keys.result(rid))
        assert published == list(enumerate(expected[: len(published)]))
    assert r.xpending(keys.group_queue("mh"), QUEUE_GROUP)["pending"] == len(ids)

    # both torchruns end (no restarts), and A's reports its rank 0 exited with "a rank was lost"
    assert on_a.wait(timeout=60) != 0 and on_b.wait(timeout=60) != 0
    log_a = (net.log_dir / "00-torchrun-A.log").read_text(errors="replace")
    assert re.search(rf"exitcode\s*:\s*{EXIT_ENGINE_FAILED} \(pid: {leader}\)", log_a), log_a[-2000:]

    # a one-process group on host A takes the work over, continuing each stream where it stopped
    run_on(net, hosts.a, "solo", "-m", "gpu_workers", "--model", str(model_dir), "--group", "solo",
           "--threads", "1", *KV)
    wait_for(lambda: all_finished(r, keys, ids), timeout=STARTUP_S, what="failover to finish every request")
    for rid, expected in zip(ids, reference):
        (done,) = final_events(r, keys.result(rid))
        assert done[b"event"] == b"done" and json.loads(done[b"token_ids"]) == expected
        assert tokens_of(r, keys.result(rid)) == list(enumerate(expected))  # no token twice, none skipped
