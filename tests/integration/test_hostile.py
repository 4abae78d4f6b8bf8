"""The issue's failing inputs on real processes (a balancer and an echo group on the bundled Redis
6.2): a deleted pending entry and a poisoning reply_to leave the pipeline serving, each request
answered once, no process exited, and no error loop in the logs."""

from __future__ import annotations

import redis

from broker.keys import INGRESS_GROUP, Keys
from tests.integration.conftest import Procs, final_events, wait_for, wait_groups


def test_the_issues_cases_1_and_2_on_real_processes(procs: Procs, r: redis.Redis, keys: Keys) -> None:
    # case 1: two entries read by a balancer that dies; one is XDELed; then balancers start
    r.xgroup_create(keys.requests, INGRESS_GROUP, id="0", mkstream=True)
    r.xadd(keys.requests, {"id": "kept", "prompt": "still here"})
    deleted = r.xadd(keys.requests, {"id": "deleted", "prompt": "gone"})
    r.xreadgroup(INGRESS_GROUP, "died", {keys.requests: ">"})
    r.xdel(keys.requests, deleted)
    balancer = procs.balancer(RYZ_CLAIM_IDLE_MS="300")
    group = procs.worker("g1")
    wait_groups(r, keys, {"g1"})
    # case 2, as the issue wrote it
    r.xadd(keys.requests, {"id": "step1", "prompt": "hi", "max_tokens": "2",
                           "reply_to": keys.state(keys.result("victim7"), "victim7")})
    r.xadd(keys.requests, {"id": "victim7", "prompt": "hello", "max_tokens": "3"})
    wait_for(lambda: all(final_events(r, keys.result(i)) for i in ("kept", "victim7", "step1")),
             what="answers to kept, victim7 and step1")
    r.xadd(keys.requests, {"id": "after", "prompt": "new one"})
    wait_for(lambda: final_events(r, keys.result("after")), what="a request sent afterwards")

    assert final_events(r, keys.result("kept"))[0][b"text"] == b"still here"
    assert final_events(r, keys.result("victim7"))[0][b"text"] == b"hel"
    (refused,) = final_events(r, keys.result("step1"))
    assert refused[b"code"] == b"invalid_request" and b"reply_to" in refused[b"message"]
    assert r.type(keys.state(keys.result("victim7"), "victim7")) == b"hash"
    wait_for(lambda: r.xpending(keys.requests, INGRESS_GROUP)["pending"] == 0, what="nothing left pending")
    assert balancer.poll() is None and group.poll() is None
    assert procs.logs().count("ERROR") <= 2, procs.logs()
