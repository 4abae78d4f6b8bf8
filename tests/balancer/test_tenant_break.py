"""Attacks on tenants (broker.sources) found after they landed, on a real Redis (6.2 and 7): one
tenant taking the ids another tenant's requests sent without 'id' get, and a tenant's removal
leaving requests unanswered."""

from __future__ import annotations

import redis

from broker.keys import INGRESS_GROUP, Keys
from ryzanstein.cli import main
from tests.balancer.test_service import fake_group, queued
from tests.balancer.test_tenant_sources import MakeBalancer, make_balancer, send, waiting_ids  # noqa: F401
from tests.gpu_workers.helpers import events, finals, run_until


def test_no_source_takes_the_ids_of_a_tenants_requests_sent_without_id(
        r: redis.Redis, keys: Keys, make_balancer: MakeBalancer) -> None:
    """alice's requests sent without 'id' get ``alice:<entry id>``, predictable from the clock: bob
    (or a shared-stream client) sending those ids first is refused, alice's request is served."""
    r.sadd(keys.tenants, "alice", "bob")
    balancer = make_balancer()
    fake_group(r, keys, "g1")
    balancer.refresh_groups()
    send(r, keys.tenant_requests("bob"), id="alice:9000000000000-0", prompt="squat", reply_to=keys.tenant_space("bob") + "x")
    send(r, keys.requests, id="alice:9000000000000-1", prompt="squat", reply_to="inbox:shared")
    own = send(r, keys.tenant_requests("alice"), id="alice:9000000000001-0", prompt="own, later").decode()
    balancer.tick()  # refused; the own one answered under its entry's id (the id it asked for is not its)
    for stream in (keys.tenant_space("bob") + "x", "inbox:shared", keys.reply_stream(f"alice:{own}", tenant="alice")):
        [refused] = finals(events(r, stream))
        assert refused["code"] == "invalid_request" and "without 'id'" in refused["message"], stream
    r.xadd(keys.tenant_requests("alice"), {"prompt": "mine"}, id="9000000000000-0")
    r.xadd(keys.tenant_requests("alice"), {"prompt": "mine too"}, id="9000000000000-1")
    r.xadd(keys.tenant_requests("alice"), {"id": "alice:1-0", "prompt": "own, earlier"})
    run_until(balancer.tick, lambda: len(queued(r, keys, "g1")) == 3, limit=10)
    assert sorted((req.id, req.tenant) for req, _e in queued(r, keys, "g1")) == [
        ("alice:1-0", "alice"), ("alice:9000000000000-0", "alice"), ("alice:9000000000000-1", "alice")]
    assert not events(r, keys.reply_stream("alice:9000000000000-0", tenant="alice"))  # no duplicate_id


def test_a_removed_tenants_requests_are_answered_not_lost(
        r: redis.Redis, prefix: str, keys: Keys, make_balancer: MakeBalancer, redis_url: str) -> None:
    """alice's a1 waits in b1 (no group), a2 is unread, then alice is removed and b1 dies; a3 comes
    after. b2 answers each once with invalid_request in alice's space and serves none; alice's
    stream is left empty. Added again, alice is served."""
    assert main(["tenant", "add", "alice", "--redis-url", redis_url, "--prefix", prefix]) == 0
    b1 = make_balancer("b1", claim_idle_ms=0)
    send(r, keys.tenant_requests("alice"), id="a1", prompt="hi")
    b1.tick()
    assert waiting_ids(b1) == {"a1"}
    send(r, keys.tenant_requests("alice"), id="a2", prompt="hi")
    assert main(["tenant", "remove", "alice", "--redis-url", redis_url, "--prefix", prefix]) == 0
    send(r, keys.tenant_requests("alice"), id="a3", prompt="hi")
    fake_group(r, keys, "g1")
    b2 = make_balancer("b2", claim_idle_ms=0)
    b2.refresh_groups()
    replies = {rid: keys.reply_stream(rid, tenant="alice") for rid in ("a1", "a2", "a3")}
    run_until(b2.tick, lambda: all(finals(events(r, s)) for s in replies.values()), limit=10)
    for _ in range(3):
        b2.tick()
    for stream in replies.values():
        [refused] = finals(events(r, stream))
        assert refused["code"] == "invalid_request" and "removed" in refused["message"]
    assert queued(r, keys, "g1") == []
    b2.flush_acks()
    assert r.xlen(keys.tenant_requests("alice")) == 0
    assert r.xpending(keys.tenant_requests("alice"), INGRESS_GROUP)["pending"] == 0
    assert main(["tenant", "add", "alice", "--redis-url", redis_url, "--prefix", prefix]) == 0
    send(r, keys.tenant_requests("alice"), id="a4", prompt="back")
    b2.refresh_sources()
    run_until(b2.tick, lambda: [req.id for req, _e in queued(r, keys, "g1")] == ["a4"], limit=10)
