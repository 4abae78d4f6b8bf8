"""Ingress and cancel streams per tenant (broker.sources), on a real Redis (6.2 and 7): every balancer
reads every tenant's stream fairly, in one consumer group per stream with crash recovery per stream;
a request's tenant is its stream (ids, reply_to, cancels); what a tenant does to its own stream
touches only its own requests; no source takes the ids of another's requests sent without id; a
removed tenant's requests are answered. The ACL side runs in tests/integration/test_tenants.py."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import redis

from balancer.service import Balancer
from broker.keys import INGRESS_GROUP, Keys
from broker.protocol import GenerationRequest
from broker.settings import Settings
from broker.signing import SigningKey
from broker.sources import shares
from broker.validation import parse_request
from gpu_workers.echo import EchoEngine
from gpu_workers.group import WorkerGroup
from ryzanstein.cli import main
from tests.balancer.test_service import fake_group, queued
from tests.gpu_workers.helpers import FakeMonotonic, events, finals, run_until

MakeBalancer = Callable[..., Balancer]


@pytest.fixture
def make_balancer(r: redis.Redis, prefix: str, mono: FakeMonotonic) -> MakeBalancer:
    def make(name: str = "b1", **overrides: Any) -> Balancer:
        settings = Settings(prefix=prefix, **{"balancer_block_ms": 1, "worker_block_ms": 1, **overrides})
        balancer = Balancer(r, settings=settings, name=name, monotonic=mono, redis_uptime_s=lambda: 1e9)
        balancer.setup()
        return balancer

    return make


def send(r: redis.Redis, to: str, **fields: Any) -> bytes:
    return r.xadd(to, {k: str(v) for k, v in fields.items()})


def waiting_ids(balancer: Balancer) -> set[str]:
    return {w.request.id for w in balancer.waiting.values()}


def test_shares_split_a_read_evenly_and_rotate_the_remainder() -> None:
    assert shares(10, 3, start=0) == [4, 3, 3] and shares(10, 3, start=1) == [3, 4, 3]
    assert shares(2, 5, start=4) == [1, 0, 0, 0, 1] and sum(shares(7, 1)) == 7 and shares(5, 0) == []


def test_a_tenant_flooding_its_stream_delays_no_other(
        r: redis.Redis, keys: Keys, make_balancer: MakeBalancer) -> None:
    """alice puts 300 requests on her stream before bob sends one: bob's is read in the first tick,
    and one read takes no more than its bound, whatever alice sent."""
    r.sadd(keys.tenants, "alice", "bob")
    balancer = make_balancer()  # no group: what it reads waits
    for n in range(300):
        send(r, keys.tenant_requests("alice"), id=f"a{n}", prompt="flood")
    send(r, keys.tenant_requests("bob"), id="b0", prompt="mine")
    send(r, keys.requests, id="s0", prompt="shared")
    balancer.tick()
    read = waiting_ids(balancer)
    assert {"b0", "s0"} <= read and len(read) <= balancer._read_count
    balancer.tick()
    assert len(waiting_ids(balancer)) <= 2 * balancer._read_count


def test_a_lone_busy_stream_still_fills_a_read(r: redis.Redis, keys: Keys, make_balancer: MakeBalancer) -> None:
    """Shares left unused by idle streams go to the busy one: with 20 idle tenants, alice's backlog
    fills a whole read (max-min fairness, not 1/21 of it)."""
    r.sadd(keys.tenants, "alice", *(f"idle{n}" for n in range(20)))
    balancer = make_balancer()
    for n in range(300):
        send(r, keys.tenant_requests("alice"), id=f"a{n}", prompt="flood")
    balancer.tick()
    assert len(balancer.waiting) == balancer._read_count > 21


def test_a_tenants_request_is_bound_to_its_stream(r: redis.Redis, keys: Keys, make_balancer: MakeBalancer) -> None:
    """Its id without 'id' is '<tenant>:<entry id>', its default reply stream in the tenant's space,
    a reply_to outside that space is refused there; it is queued with its tenant."""
    r.sadd(keys.tenants, "alice")
    balancer = make_balancer()
    fake_group(r, keys, "g1")
    balancer.refresh_groups()
    entry = send(r, keys.tenant_requests("alice"), prompt="hi").decode()
    send(r, keys.tenant_requests("alice"), id="out", prompt="hi", reply_to="inbox:elsewhere")
    send(r, keys.tenant_requests("alice"), id="own", prompt="hi", reply_to=keys.client_replies("c1", tenant="alice"))
    shared = send(r, keys.requests, prompt="shared one").decode()
    balancer.tick()
    balancer.tick()
    by_id = {req.id: req for req, _epoch in queued(r, keys, "g1")}
    assert set(by_id) == {f"alice:{entry}", "own", shared} and by_id[shared].reply_to == keys.result(shared)
    assert by_id[f"alice:{entry}"].reply_to == keys.reply_stream(f"alice:{entry}", tenant="alice")
    assert by_id[f"alice:{entry}"].tenant == "alice" and by_id["own"].tenant == "alice"
    assert by_id[shared].tenant is None
    [refused] = finals(events(r, keys.reply_stream("out", tenant="alice")))
    assert refused["code"] == "invalid_request" and "alice" in refused["message"]
    assert not r.exists("inbox:elsewhere")
    balancer.flush_acks()
    assert r.xlen(keys.tenant_requests("alice")) == 0 and r.xlen(keys.requests) == 0


def test_an_entry_id_ahead_of_the_clock_on_a_tenants_stream_squats_no_shared_id(
        r: redis.Redis, keys: Keys, make_balancer: MakeBalancer) -> None:
    """alice names her stream's entry ids herself: an explicit id shaped like a later entry id of the
    shared stream is refused even when her own entry id is later still."""
    r.sadd(keys.tenants, "alice")
    balancer = make_balancer()
    r.xadd(keys.tenant_requests("alice"), {"id": "9000000000000-0", "prompt": "squat"}, id="9500000000000-0")
    r.xadd(keys.tenant_requests("alice"), {"id": "9500000000000-0", "prompt": "squat"}, id="9500000000000-1")
    balancer.tick()
    for entry_id in ("9500000000000-0", "9500000000000-1"):  # answered under the entry's own id, in her space
        [refused] = finals(events(r, keys.reply_stream(f"alice:{entry_id}", tenant="alice")))
        assert refused["code"] == "invalid_request" and "entry id" in refused["message"]
    assert not r.exists(keys.request_id("9000000000000-0"), keys.request_id("9500000000000-0"))  # held by neither


def test_cancels_apply_within_their_tenant_only(r: redis.Redis, keys: Keys, make_balancer: MakeBalancer) -> None:
    """Requests without a token: bob's cancels end bob's requests only, the shared stream's neither."""
    r.sadd(keys.tenants, "alice", "bob")
    balancer = make_balancer()
    fake_group(r, keys, "g1")
    balancer.refresh_groups()
    send(r, keys.cancel, id="x1")
    send(r, keys.cancel, id="x2")
    send(r, keys.tenant_cancel("bob"), id="x1")
    send(r, keys.tenant_cancel("bob"), id="x2")
    send(r, keys.tenant_requests("alice"), id="x1", prompt="alice's")
    send(r, keys.tenant_requests("bob"), id="x2", prompt="bob's")
    balancer.tick()
    balancer.tick()
    [bob_final] = finals(events(r, keys.reply_stream("x2", tenant="bob")))
    assert bob_final.get("finish_reason") == "cancelled"
    assert [(req.id, req.tenant) for req, _e in queued(r, keys, "g1")] == [("x1", "alice")]


def test_a_tenant_deleting_its_stream_stops_no_one(r: redis.Redis, keys: Keys, make_balancer: MakeBalancer) -> None:
    """DEL of a tenant's stream (its consumer group with it): the balancer makes it again and serves
    the others meanwhile, and the tenant's later requests too."""
    r.sadd(keys.tenants, "alice")
    balancer = make_balancer()
    fake_group(r, keys, "g1")
    balancer.refresh_groups()
    r.delete(keys.tenant_requests("alice"))
    send(r, keys.requests, id="s1", prompt="shared")
    balancer.tick()  # NOGROUP on alice's stream: made again, the shared one read
    balancer.tick()
    send(r, keys.tenant_requests("alice"), id="a1", prompt="again")
    run_until(balancer.tick, lambda: {"s1", "a1"} <= {req.id for req, _e in queued(r, keys, "g1")}, limit=10)
    assert r.xinfo_groups(keys.tenant_requests("alice"))[0]["name"] == INGRESS_GROUP.encode()


def test_a_stopped_balancers_tenant_entries_are_claimed_by_another(
        r: redis.Redis, keys: Keys, make_balancer: MakeBalancer) -> None:
    """Crash recovery per stream: b1 reads a tenant's entry and dies; b2 claims it (XAUTOCLAIM on
    that stream) and dispatches it; the entry is acknowledged on the tenant's stream."""
    r.sadd(keys.tenants, "alice")
    b1 = make_balancer("b1", claim_idle_ms=0)
    send(r, keys.tenant_requests("alice"), id="a1", prompt="hi")
    b1.tick()  # no group: it waits in b1, pending on b1
    assert waiting_ids(b1) == {"a1"} and r.xpending(keys.tenant_requests("alice"), INGRESS_GROUP)["pending"] == 1
    fake_group(r, keys, "g1")
    b2 = make_balancer("b2", claim_idle_ms=0)
    b2.refresh_groups()
    run_until(b2.tick, lambda: [req.id for req, _e in queued(r, keys, "g1")] == ["a1"], limit=10)
    b2.flush_acks()
    assert r.xlen(keys.tenant_requests("alice")) == 0
    assert r.xpending(keys.tenant_requests("alice"), INGRESS_GROUP)["pending"] == 0


def test_a_moved_request_keeps_its_tenant_only_when_signed(r: redis.Redis, keys: Keys) -> None:
    """Failover puts a tenant's request back on the shared stream with a signed ``_tenant``; an
    unsigned one is refused like any internal field."""
    key = SigningKey(r, keys).get()
    request = GenerationRequest(id="m1", prompt="hi", reply_to=keys.reply_stream("m1", tenant="alice"), tenant="alice")
    fields = {k.encode() if isinstance(k, str) else k: v for k, v in request.to_ingress(
        from_owner="g1", epoch=1, signing_key=key).items()}
    moved = parse_request(fields, entry_id="1-0", prefix=keys.prefix, max_request_bytes=1 << 20, signing_key=key)
    assert moved.tenant == "alice" and moved.reply_to == request.reply_to
    with pytest.raises(Exception, match="internal to the pipeline"):
        parse_request(fields, entry_id="1-0", prefix=keys.prefix, max_request_bytes=1 << 20, signing_key=b"x" * 64)


def alice_streaming_in_a_group(r: redis.Redis, keys: Keys, balancer: Balancer,
                               mono: FakeMonotonic) -> tuple[WorkerGroup, str]:
    """An echo group ``g1`` streaming alice's long request ``long`` (sent on her stream): the group and
    the reply stream (an AsyncClient's of alice) its tokens go to."""
    group = WorkerGroup(r, EchoEngine(), settings=balancer.settings, name="g1", monotonic=mono)
    group.register()
    balancer.refresh_groups()
    reply = keys.client_replies("a", tenant="alice")
    send(r, keys.tenant_requests("alice"), id="long", prompt="word " * 60, max_tokens=200, stream=1, reply_to=reply)
    run_until(lambda: (balancer.tick(), group.tick()), lambda: len(events(r, reply)) >= 2, limit=50)
    return group, reply


def test_a_worker_group_takes_cancels_from_the_tenants_stream_only(
        r: redis.Redis, keys: Keys, make_balancer: MakeBalancer, mono: FakeMonotonic) -> None:
    """Running in a group, alice's request is not ended by a cancel of its id on bob's or the shared
    cancel stream, and is by one on hers."""
    r.sadd(keys.tenants, "alice", "bob")
    balancer = make_balancer()
    group, reply = alice_streaming_in_a_group(r, keys, balancer, mono)
    send(r, keys.tenant_cancel("bob"), id="long")
    send(r, keys.cancel, id="long")
    for _ in range(3):
        group.tick()
    assert not finals(events(r, reply))
    send(r, keys.tenant_cancel("alice"), id="long")
    run_until(lambda: (balancer.tick(), group.tick()), lambda: bool(finals(events(r, reply))), limit=20)
    assert [e.get("finish_reason") for e in finals(events(r, reply))] == ["cancelled"]


def test_the_tenant_command_adds_lists_and_removes(
        redis_url: str, r: redis.Redis, keys: Keys, capsys: pytest.CaptureFixture[str]) -> None:
    common = ["--redis-url", redis_url, "--prefix", keys.prefix]
    assert main(["tenant", "add", "alice", "--password", "pw", *common]) == 0
    assert capsys.readouterr().out.strip() == (
        f"ACL SETUSER alice on >pw resetkeys clearselectors ~{keys.prefix}:t:alice:* %R~{{{keys.prefix}:t:alice:* "
        "resetchannels -@all +xadd +xread +xrange +xrevrange +xtrim +del +exists +ping +hello")
    assert main(["tenant", "add", "bob", *common]) == 0 and "ACL SETUSER bob on >" in capsys.readouterr().out
    assert main(["tenant", "list", *common]) == 0 and capsys.readouterr().out.split() == ["alice", "bob"]
    assert main(["tenant", "remove", "alice", *common]) == 0
    assert r.smembers(keys.tenants) == {b"bob"}
    assert main(["tenant", "add", "no:colons", *common]) == 2


def test_tenant_streams_are_the_pipelines_own_keys(keys: Keys) -> None:
    for key in (keys.tenants, keys.tenant_requests("alice"), keys.tenant_cancel("alice")):
        assert keys.is_internal(key) and keys.reply_to_problem(key, "r1") is not None
    assert not keys.is_internal(keys.reply_stream("r1", tenant="alice"))
    assert not keys.is_internal(f"{keys.prefix}:t:alice:x:requests")  # a stream of alice's own choosing
    assert keys.reply_to_problem(keys.result("r1"), "r1", tenant="alice") is not None
    assert keys.reply_to_problem(keys.reply_stream("r1", tenant="alice"), "r1", tenant="alice") is None


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


def test_a_shared_request_writes_nothing_into_a_tenants_keys(
        r: redis.Redis, keys: Keys, make_balancer: MakeBalancer) -> None:
    """A client of ``{p}:requests`` naming alice's AsyncClient stream (or a key her user reads, under
    ``{<space>``) as reply_to would put events where alice takes them as answers: refused, answered on
    its own default stream."""
    r.sadd(keys.tenants, "alice")
    balancer = make_balancer()
    fake_group(r, keys, "g1")
    balancer.refresh_groups()
    targets = [keys.client_replies("uuid1", tenant="alice"), "{" + keys.tenant_space("alice") + "x}:y"]
    for n, target in enumerate(targets):
        send(r, keys.requests, id=f"s{n}", prompt="hi", reply_to=target)
    balancer.tick()
    for n, target in enumerate(targets):
        [refused] = finals(events(r, keys.reply_stream(f"s{n}")))
        assert refused["code"] == "invalid_request" and "tenant's key" in refused["message"]
        assert not r.exists(target)
    assert queued(r, keys, "g1") == []


def test_a_removed_tenants_request_in_flight_can_still_be_cancelled(
        r: redis.Redis, keys: Keys, make_balancer: MakeBalancer, mono: FakeMonotonic) -> None:
    """alice is removed while her request runs in a group: her cancel still ends it."""
    r.sadd(keys.tenants, "alice")
    balancer = make_balancer()
    group, reply = alice_streaming_in_a_group(r, keys, balancer, mono)
    r.smove(keys.tenants, keys.tenants_removed, "alice")  # what `ryzanstein tenant remove` does
    group.heartbeat(force=True)  # the group reads the tenants again
    send(r, keys.tenant_cancel("alice"), id="long")
    run_until(lambda: (balancer.tick(), group.tick()), lambda: bool(finals(events(r, reply))), limit=20)
    assert [e.get("finish_reason") for e in finals(events(r, reply))] == ["cancelled"]


def test_a_request_dispatched_before_its_tenants_removal_is_not_answered_again(
        r: redis.Redis, keys: Keys, make_balancer: MakeBalancer) -> None:
    """b1 queues alice's a1 and dies before acknowledging it; alice is removed; b2 claims the entry:
    a1 stays with its group, no second (removal) answer, the entry acknowledged."""
    r.sadd(keys.tenants, "alice")
    fake_group(r, keys, "g1")
    b1 = make_balancer("b1", claim_idle_ms=0)
    b1.refresh_groups()
    send(r, keys.tenant_requests("alice"), id="a1", prompt="hi")
    b1.tick()
    assert [req.id for req, _e in queued(r, keys, "g1")] == ["a1"]
    r.smove(keys.tenants, keys.tenants_removed, "alice")
    b2 = make_balancer("b2", claim_idle_ms=0)
    b2.refresh_groups()
    run_until(b2.tick, lambda: b2.counts["reclaimed"] >= 1, limit=10)
    b2.tick()
    b2.flush_acks()
    assert events(r, keys.reply_stream("a1", tenant="alice")) == [] and events(r, keys.dead) == []
    assert r.xlen(keys.tenant_requests("alice")) == 0 and [req.id for req, _e in queued(r, keys, "g1")] == ["a1"]

def test_ingress_shards_are_shared_sources() -> None:
    from broker.sources import sources

    keys = Keys("p")
    found = sources(keys, ["acme"], shards=3)
    assert [s.stream for s in found] == ["p:requests", "p:requests:0", "p:requests:1", "p:requests:2",
                                         "p:t:acme:requests"]
    assert [s.cancel for s in found[:4]] == ["p:cancel"] * 4 and found[4].cancel == "p:t:acme:cancel"
    assert [s.tenant for s in found] == [None, None, None, None, "acme"]
    assert [s.default_id("1-0") for s in found] == ["1-0", "1-0", "1-0", "1-0", "acme:1-0"]
    assert [s.stream for s in sources(keys, shards=1)] == ["p:requests"]  # the default: one stream
    assert all(keys.is_internal(s.stream) for s in found)
