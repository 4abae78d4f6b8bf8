"""Balancer on the real test Redis, driven by tick()/process()/refresh_groups() in-process.

Groups are either fakes (a HEARTBEAT plus the accepting flag; their queues are read directly) or real
WorkerGroups with the echo engine, ticked by the test.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest
import redis

from balancer.service import PUBLISHER, Balancer
from broker.keys import INGRESS_GROUP, QUEUE_GROUP, Keys
from broker.protocol import GenerationRequest, entry_ms
from broker.registry import GroupLoad, read_groups
from broker.scripts import Scripts
from broker.settings import Settings
from broker.validation import parse_request
from broker.wire import Batch
from gpu_workers.echo import EchoEngine
from gpu_workers.group import CONSUMER, WorkerGroup
from tests.gpu_workers.helpers import (
    FakeClock,
    FakeMonotonic,
    assert_one_clean_completion,
    events,
    finals,
    queue_fields,
    run_until,
    tokens,
)

MakeBalancer = Callable[..., Balancer]


@pytest.fixture
def make_settings(redis_url: str, prefix: str) -> Callable[..., Settings]:
    def make(**overrides: Any) -> Settings:
        base: dict[str, Any] = {"balancer_block_ms": 1, "worker_block_ms": 1}
        return Settings(redis_url=redis_url, prefix=prefix, **{**base, **overrides})

    return make


@pytest.fixture
def make_balancer(
        r: redis.Redis, make_settings: Callable[..., Settings], mono: FakeMonotonic) -> MakeBalancer:
    def make(name: str = "b1", **overrides: Any) -> Balancer:
        # A Redis up for long: the restart grace of failover (tested on its own) does not apply.
        balancer = Balancer(r, settings=make_settings(**overrides), name=name, monotonic=mono,
                            redis_uptime_s=lambda: 1e9)
        balancer.setup()
        return balancer

    return make


def fake_group(r: redis.Redis, keys: Keys, name: str, *, vocab_size: int = 256, max_context: int = 4096,
               running: int = 0, state: str = "ready", accepting: bool = True, age_s: float = 0.0,
               served: list[str] | None = None, weights: str = "") -> None:
    """Register a group the way a WorkerGroup does (HEARTBEAT script), optionally aged ``age_s``;
    it serves the model ``fake`` unless ``served`` names others."""
    load = GroupLoad(name=name, tp=1, model="fake", kv_dtype="none", kv_capacity_tokens=0, kv_used_tokens=0,
                     running=running, waiting=0, queue_depth=0, leader_pid=1, host="h",
                     max_context=max_context, vocab_size=vocab_size, state=state,
                     served_models=served or ["fake"], weights=weights)
    ms = int(Scripts(r).heartbeat(registry=keys.groups, info=keys.group_info(name), group=name,
                                  fields=load.to_fields()))
    if age_s:
        old = ms - int(age_s * 1000)
        r.hset(keys.group_info(name), "heartbeat_ms", old)
        r.zadd(keys.groups, {name: old})
    if accepting:
        r.set(keys.group_accepting(name), "1")


def fill(r: redis.Redis, keys: Keys, group: str, n: int) -> None:
    """Queue entries another balancer put on ``group``."""
    for i in range(n):
        other = GenerationRequest(id=f"other-{group}-{i}", prompt="o", reply_to=keys.result(f"other-{i}"))
        r.xadd(keys.group_queue(group), queue_fields(r, keys, other, 1, 1))


def queued(r: redis.Redis, keys: Keys, group: str) -> list[tuple[GenerationRequest, int]]:
    entries = r.xrange(keys.group_queue(group))
    return [(GenerationRequest.from_wire(f[b"r"]), int(f[b"e"])) for _id, f in entries]


def submit(r: redis.Redis, keys: Keys, **fields: Any) -> bytes:
    return r.xadd(keys.requests, {k: v if isinstance(v, bytes) else str(v) for k, v in fields.items()})


def state(r: redis.Redis, keys: Keys, request_id: str) -> dict[str, str]:
    """The state hash of a request on its default reply stream."""
    raw = r.hgetall(keys.state(keys.result(request_id), request_id))
    return {k.decode(): v.decode() for k, v in raw.items()}


def settled(balancer: Balancer, r: redis.Redis, keys: Keys) -> bool:
    """Every ingress entry acknowledged and deleted, once the balancer sent its deferred acks."""
    balancer.flush_acks()
    return ingress_settled(r, keys)


def ingress_settled(r: redis.Redis, keys: Keys) -> bool:
    """Every ingress entry acknowledged and deleted."""
    return r.xlen(keys.requests) == 0 and r.xpending(keys.requests, INGRESS_GROUP)["pending"] == 0


def only_error(r: redis.Redis, stream: str, code: str) -> dict[str, str]:
    evs = events(r, stream)
    assert len(evs) == 1 and evs[0]["event"] == "error", evs
    assert evs[0]["code"] == code, evs
    return evs[0]


# --- validation and dispatch ----------------------------------------------------------------------


def test_valid_request_lands_on_the_group_queue_once(
        r: redis.Redis, keys: Keys, make_balancer: MakeBalancer) -> None:
    fake_group(r, keys, "g1")
    balancer = make_balancer()
    eid = submit(r, keys, prompt="hello", max_tokens=5, stream=1, temperature="0.5")
    balancer.tick()
    ((request, epoch),) = queued(r, keys, "g1")
    assert (request.id, request.prompt, request.stream) == (eid.decode(), "hello", True)
    assert request.sampling.max_tokens == 5
    assert request.sampling.temperature == 0.5 and request.enqueued_ms == entry_ms(eid)
    assert request.reply_to == keys.result(eid.decode()) and epoch == 1
    assert state(r, keys, request.id) == {"owner": "g1", "epoch": "1"}
    assert settled(balancer, r, keys)
    balancer.tick()
    balancer.process([(eid, {b"prompt": b"hello"})])  # a replay of the same entry
    assert len(queued(r, keys, "g1")) == 1
    assert balancer.counts["dispatched"] == 2  # the replay found it dispatched ('dup') and acked it


BAD_REQUESTS: dict[str, tuple[dict[str, Any], str]] = {
    "zero-max": ({"prompt": "x", "max_tokens": "0"}, "max_tokens"),
    "word-max": ({"prompt": "x", "max_tokens": "many"}, "max_tokens"),
    "utf8": ({"prompt": b"caf\xc3(\xff"}, "prompt"),
    "no-prompt": ({"max_tokens": "3"}, "prompt"),
    "both": ({"prompt": "x", "prompt_ids": "[1]"}, "prompt"),
    "vocab": ({"prompt_ids": "[1, 2, 256]"}, "vocabulary"),
    "context": ({"prompt_ids": json.dumps(list(range(60))), "max_tokens": "5"}, "context length"),
    "huge": ({"prompt": "y" * 600}, "bytes"),
    "temp": ({"prompt": "x", "temperature": "-1"}, "temperature"),
    "stop": ({"prompt": "x", "stop": "not json"}, "stop"),
}


def test_invalid_requests_get_one_error_each_and_leave_valid_ones_alone(
        r: redis.Redis, keys: Keys, prefix: str, make_balancer: MakeBalancer) -> None:
    fake_group(r, keys, "g1", vocab_size=256, max_context=64)
    balancer = make_balancer(max_request_bytes=512)
    submit(r, keys, id="ok-1", prompt="fine", max_tokens=4)
    for rid, (fields, _) in BAD_REQUESTS.items():
        submit(r, keys, id=rid, **fields)
        submit(r, keys, id=f"{rid}-custom", reply_to=f"{prefix}:mine:{rid}", **fields)
    submit(r, keys, id="ok-2", prompt_ids="[1, 2, 255]", max_tokens=4)
    balancer.tick()

    assert sorted(q.id for q, _ in queued(r, keys, "g1")) == ["ok-1", "ok-2"]
    for rid, (_, words) in BAD_REQUESTS.items():
        error = only_error(r, keys.result(rid), "invalid_request")
        assert error["id"] == rid and words in error["message"], error
        assert only_error(r, f"{prefix}:mine:{rid}", "invalid_request")["id"] == f"{rid}-custom"
        assert not r.exists(keys.result(f"{rid}-custom"))
    assert not r.exists(keys.result("ok-1")) and not r.exists(keys.result("ok-2"))
    assert settled(balancer, r, keys)
    assert balancer.counts["invalid_request"] == 2 * len(BAD_REQUESTS)


def test_invalid_requests_sharing_a_reply_stream_each_get_an_error(
        r: redis.Redis, keys: Keys, make_balancer: MakeBalancer) -> None:
    balancer = make_balancer()
    shared = keys.client_replies("c1")
    for rid in ("bad-1", "bad-2", "bad-3"):
        submit(r, keys, id=rid, prompt="x", max_tokens="0", reply_to=shared)
    balancer.tick()
    assert sorted(e["id"] for e in events(r, shared)) == ["bad-1", "bad-2", "bad-3"]


def test_error_for_an_unusable_id_goes_to_the_entry_id(
        r: redis.Redis, keys: Keys, make_balancer: MakeBalancer) -> None:
    fake_group(r, keys, "g1")
    balancer = make_balancer()
    eid = submit(r, keys, payload=b"\xc1not msgpack")
    balancer.tick()
    assert only_error(r, keys.result(eid.decode()), "invalid_request")["id"] == eid.decode()
    assert settled(balancer, r, keys)


def test_priority_order_within_a_batch(r: redis.Redis, keys: Keys, make_balancer: MakeBalancer) -> None:
    fake_group(r, keys, "g1")
    balancer = make_balancer()
    for rid, priority in (("p5", 5), ("m3a", -3), ("p0", 0), ("m3b", -3), ("dflt", None)):
        fields = {"id": rid, "prompt": "x"} | ({"priority": priority} if priority is not None else {})
        submit(r, keys, **fields)
    balancer.tick()
    assert [q.id for q, _ in queued(r, keys, "g1")] == ["m3a", "m3b", "p0", "dflt", "p5"]


def test_requests_spread_over_equal_groups(r: redis.Redis, keys: Keys, make_balancer: MakeBalancer) -> None:
    for name in ("g1", "g2", "g3"):
        fake_group(r, keys, name)
    fake_group(r, keys, "draining", state="draining")
    fake_group(r, keys, "dead", age_s=60)
    balancer = make_balancer()
    for n in range(9):
        submit(r, keys, id=f"s{n}", prompt="x")
    balancer.tick()
    assert [len(queued(r, keys, g)) for g in ("g1", "g2", "g3", "draining", "dead")] == [3, 3, 3, 0, 0]


# --- requests the balancer itself ends --------------------------------------------------------------


def test_no_live_group_waits_then_fails_unavailable(
        r: redis.Redis, keys: Keys, make_balancer: MakeBalancer) -> None:
    balancer = make_balancer(no_group_wait_s=5.0)
    t0 = 1_700_000_000_000
    balancer.clock = FakeClock(t0)  # type: ignore[assignment]
    submit(r, keys, id="w", prompt="anyone?")
    balancer.tick()
    assert list(balancer.waiting) and not r.exists(keys.result("w"))
    assert r.xpending(keys.requests, INGRESS_GROUP)["pending"] == 1  # not acked while it waits
    balancer.clock.ms = t0 + 4_999
    balancer.process([])
    assert list(balancer.waiting) and not r.exists(keys.result("w"))
    balancer.clock.ms = t0 + 5_000
    balancer.process([])
    assert "5.0s" in only_error(r, keys.result("w"), "unavailable")["message"]
    assert not balancer.waiting and settled(balancer, r, keys)


def test_waiting_request_goes_to_a_group_that_appears(
        r: redis.Redis, keys: Keys, make_balancer: MakeBalancer) -> None:
    balancer = make_balancer()
    submit(r, keys, id="late", prompt="x")
    balancer.tick()
    assert list(balancer.waiting)
    fake_group(r, keys, "g1")
    balancer.refresh_groups()
    balancer.process([])
    assert [q.id for q, _ in queued(r, keys, "g1")] == ["late"]
    assert settled(balancer, r, keys) and not balancer.waiting


def test_deadline_passed_before_dispatch_is_a_timeout(
        r: redis.Redis, keys: Keys, make_balancer: MakeBalancer) -> None:
    fake_group(r, keys, "g1")
    balancer = make_balancer()
    eid = submit(r, keys, id="late", prompt="x", timeout_s="1.5")
    submit(r, keys, id="in-time", prompt="x", timeout_s="60")
    balancer.clock = FakeClock(entry_ms(eid) + 1_500)  # type: ignore[assignment]
    balancer.tick()
    only_error(r, keys.result("late"), "timeout")
    assert [q.id for q, _ in queued(r, keys, "g1")] == ["in-time"]
    assert settled(balancer, r, keys)


def test_timeout_applies_while_waiting_for_a_group(
        r: redis.Redis, keys: Keys, make_balancer: MakeBalancer) -> None:
    balancer = make_balancer(no_group_wait_s=30.0)
    eid = submit(r, keys, id="t", prompt="x", timeout_s="2")
    balancer.clock = FakeClock(entry_ms(eid) + 100)  # type: ignore[assignment]
    balancer.tick()
    assert list(balancer.waiting)
    balancer.clock.ms = entry_ms(eid) + 2_000
    balancer.process([])
    only_error(r, keys.result("t"), "timeout")
    assert settled(balancer, r, keys)


def test_cancelled_before_dispatch(r: redis.Redis, keys: Keys, make_balancer: MakeBalancer) -> None:
    fake_group(r, keys, "g1")
    balancer = make_balancer()
    submit(r, keys, id="c", prompt="x")
    submit(r, keys, id="kept", prompt="x")
    r.xadd(keys.cancel, {"id": "c"})
    balancer.tick()
    (done,) = events(r, keys.result("c"))
    assert (done["event"], done["finish_reason"]) == ("done", "cancelled")
    assert (done["token_ids"], done["text"]) == ("[]", "")
    assert [q.id for q, _ in queued(r, keys, "g1")] == ["kept"]
    assert settled(balancer, r, keys)


def test_cancelled_while_waiting_for_a_group(r: redis.Redis, keys: Keys, make_balancer: MakeBalancer) -> None:
    balancer = make_balancer()
    submit(r, keys, id="c", prompt="x")
    balancer.tick()
    r.xadd(keys.cancel, {"id": "c"})
    balancer.tick()
    assert [e["finish_reason"] for e in events(r, keys.result("c"))] == ["cancelled"]
    assert not balancer.waiting and settled(balancer, r, keys)


# --- crash safety: reclaim and duplicate processing ------------------------------------------------


def read_as(r: redis.Redis, keys: Keys, consumer: str, *, count: int = 1, idle_ms: int = 0) -> list[bytes]:
    """Entries read by another (dead) balancer and never acked; ``idle_ms`` ages them."""
    ((_stream, entries),) = r.xreadgroup(INGRESS_GROUP, consumer, {keys.requests: ">"}, count=count)
    ids = [eid for eid, _ in entries]
    if idle_ms:
        r.xclaim(keys.requests, INGRESS_GROUP, consumer, 0, ids, idle=idle_ms, justid=True)
    return ids


def test_entries_of_a_dead_balancer_are_claimed_once_idle(
        r: redis.Redis, keys: Keys, make_balancer: MakeBalancer) -> None:
    fake_group(r, keys, "g1")
    balancer = make_balancer(claim_idle_ms=5_000)
    submit(r, keys, id="orphan", prompt="x")
    submit(r, keys, id="recent", prompt="x")
    read_as(r, keys, "dead", idle_ms=6_000)
    (recent,) = read_as(r, keys, "slow")
    balancer.tick()
    assert [(q.id, e) for q, e in queued(r, keys, "g1")] == [("orphan", 1)]
    assert state(r, keys, "orphan")["epoch"] == "1"
    # the other balancer's entry is not idle long enough to be taken from it
    balancer.flush_acks()
    info = r.xpending_range(keys.requests, INGRESS_GROUP, min="-", max="+", count=10)
    assert [(p["message_id"], p["consumer"]) for p in info] == [(recent, b"slow")]


def test_entry_dispatched_by_a_balancer_that_died_before_acking_runs_once(
        r: redis.Redis, keys: Keys, make_balancer: MakeBalancer) -> None:
    fake_group(r, keys, "g1")
    dead = make_balancer("dead")
    dead._ack = lambda entry_ids: None  # type: ignore[method-assign]  # dies right after dispatching
    submit(r, keys, id="once", prompt="x")
    dead.tick()
    assert len(queued(r, keys, "g1")) == 1
    (eid,) = [e for e, _ in r.xrange(keys.requests)]
    r.xclaim(keys.requests, INGRESS_GROUP, "dead", 0, [eid], idle=10_000, justid=True)
    heir = make_balancer("heir")
    heir.tick()
    assert [(q.id, e) for q, e in queued(r, keys, "g1")] == [("once", 1)]
    assert state(r, keys, "once") == {"owner": "g1", "epoch": "1"}
    assert settled(heir, r, keys)


def test_resubmitted_id_goes_nowhere_but_its_first_group(
        r: redis.Redis, keys: Keys, make_balancer: MakeBalancer, monkeypatch: pytest.MonkeyPatch) -> None:
    """A new request is claimed and queued in one round trip; a re-submitted id (claimed already)
    has that eager queue entry taken back, its cost too, and stays where its claim says."""
    fake_group(r, keys, "g1")
    fake_group(r, keys, "g2")
    balancer = make_balancer()
    balancer.refresh_groups()
    submit(r, keys, id="twice", prompt="x")
    balancer.tick()
    ((home, _),) = [(g, q) for g in ("g1", "g2") for q in queued(r, keys, g)]
    other = "g2" if home == "g1" else "g1"
    cost = int(r.get(keys.group_queue_tokens(home)))
    monkeypatch.setattr(type(balancer.router), "pick", lambda self, **_: self.find(other))
    # Its id's holder gone (expired, or pinned by an older release): only the claim tells.
    r.delete(keys.request_id("twice"))
    submit(r, keys, id="twice", prompt="x")
    balancer.tick()
    assert [(q.id, e) for q, e in queued(r, keys, home)] == [("twice", 1)]
    # the eager entry went to the other group's queue (the stream exists) and was taken back
    assert r.exists(keys.group_queue(other)) and queued(r, keys, other) == []
    assert int(r.get(keys.group_queue_tokens(other)) or 0) == 0
    assert int(r.get(keys.group_queue_tokens(home))) == cost
    assert state(r, keys, "twice") == {"owner": home, "epoch": "1"}
    assert settled(balancer, r, keys)


def test_same_entry_processed_by_two_balancers_dispatches_once(
        r: redis.Redis, keys: Keys, make_balancer: MakeBalancer) -> None:
    fake_group(r, keys, "g1")
    fake_group(r, keys, "g2")
    first, second = make_balancer("b1"), make_balancer("b2")
    for b in (first, second):
        b.refresh_groups()
    submit(r, keys, id="dup", prompt="x")
    ((_s, entries),) = r.xreadgroup(INGRESS_GROUP, "b1", {keys.requests: ">"})
    first.process(entries)
    second.router._turn = first.router._turn  # would pick the other group: the pinned owner still wins
    second.process(entries)
    assert len(queued(r, keys, "g1")) + len(queued(r, keys, "g2")) == 1
    assert state(r, keys, "dup")["epoch"] == "1"
    first.flush_acks()
    assert settled(second, r, keys)


# --- re-routing: closed groups, failover, forgetting ----------------------------------------------


def test_group_that_stopped_accepting_is_taken_over(
        r: redis.Redis, keys: Keys, make_balancer: MakeBalancer) -> None:
    fake_group(r, keys, "closing", accepting=False)  # still ready in its last heartbeat
    fake_group(r, keys, "busy", running=5)
    balancer = make_balancer()
    submit(r, keys, id="moved", prompt="x")
    balancer.tick()  # routed to "closing" (least loaded): DISPATCH answers closed; routed again at once
    assert [(q.id, e) for q, e in queued(r, keys, "busy")] == [("moved", 2)]
    assert not balancer.waiting
    assert state(r, keys, "moved") == {"owner": "busy", "epoch": "2"}
    assert queued(r, keys, "closing") == [] and settled(balancer, r, keys)


def test_dead_group_is_failed_over_to_a_live_one(r: redis.Redis, keys: Keys, prefix: str,
                                                make_balancer: MakeBalancer) -> None:
    fake_group(r, keys, "doomed")
    balancer = make_balancer(dead_after_s=3.0)
    for n in range(3):
        submit(r, keys, id=f"f{n}", prompt="x", stream=1)
    balancer.tick()
    balancer.flush_acks()
    assert len(queued(r, keys, "doomed")) == 3
    r.xgroup_create(keys.group_queue("doomed"), QUEUE_GROUP, id="0")
    r.xreadgroup(QUEUE_GROUP, CONSUMER, {keys.group_queue("doomed"): ">"}, count=1)  # one was in flight

    fake_group(r, keys, "doomed", age_s=10)  # its heartbeat stopped 10 s ago
    fake_group(r, keys, "alive")
    balancer.refresh_groups()
    assert not r.exists(keys.group_accepting("doomed")) and not r.exists(keys.group_queue("doomed"))
    moved = [parse_request(f, entry_id=e.decode(), prefix=prefix, max_request_bytes=1 << 20,
                          signing_key=r.get(keys.signing_key))
             for e, f in r.xrange(keys.requests)]
    assert sorted((q.id, q.takeover_from, q.takeover_epoch) for q in moved) == [
        ("f0", "doomed", 1), ("f1", "doomed", 1), ("f2", "doomed", 1)]
    statuses = {g.name: g for g in read_groups(r, keys, dead_after_s=3.0)}
    assert not statuses["doomed"].alive  # still listed, as dead

    other = make_balancer("b2", dead_after_s=3.0)
    other.refresh_groups()  # a second balancer notices too: nothing left to move
    assert r.xlen(keys.requests) == 3

    balancer.tick()
    assert sorted((q.id, e) for q, e in queued(r, keys, "alive")) == [("f0", 2), ("f1", 2), ("f2", 2)]
    for n in range(3):
        assert state(r, keys, f"f{n}") == {"owner": "alive", "epoch": "2"}
    assert settled(balancer, r, keys)
    balancer.refresh_groups()
    assert r.xlen(keys.requests) == 0  # the same dead heartbeat is failed over once


def test_long_dead_groups_are_forgotten(r: redis.Redis, keys: Keys, make_balancer: MakeBalancer) -> None:
    fake_group(r, keys, "ancient", age_s=700)
    fake_group(r, keys, "recently-dead", age_s=30)
    fake_group(r, keys, "alive")
    balancer = make_balancer(forget_dead_after_s=600.0)
    balancer.refresh_groups()
    assert r.zscore(keys.groups, "ancient") is None and not r.exists(keys.group_info("ancient"))
    assert {g.name: g.alive for g in read_groups(r, keys, dead_after_s=3.0)} == {
        "recently-dead": False, "alive": True}


# --- with real worker groups ----------------------------------------------------------------------


@pytest.fixture
def make_group(
        r: redis.Redis, make_settings: Callable[..., Settings], mono: FakeMonotonic,
) -> Callable[..., WorkerGroup]:
    def make(name: str, **overrides: Any) -> WorkerGroup:
        group = WorkerGroup(r, EchoEngine(), settings=make_settings(**overrides), name=name, monotonic=mono)
        group.register()
        return group

    return make


def test_request_through_balancer_and_worker_group(r: redis.Redis, keys: Keys, make_balancer: MakeBalancer,
                                                   make_group: Callable[..., WorkerGroup]) -> None:
    group = make_group("g1")
    balancer = make_balancer()
    submit(r, keys, id="e2e", prompt="héllo, wörld", stream=1, max_tokens=100)
    balancer.tick()
    run_until(group.tick, lambda: bool(finals(events(r, keys.result("e2e")))))
    done = assert_one_clean_completion(events(r, keys.result("e2e")), text="héllo, wörld")
    assert done["finish_reason"] == "stop"
    assert settled(balancer, r, keys)


def test_handed_back_request_continues_on_another_group_without_duplicates(
        r: redis.Redis, keys: Keys, make_balancer: MakeBalancer,
        make_group: Callable[..., WorkerGroup]) -> None:
    leaving = make_group("leaving")
    balancer = make_balancer()
    prompt = "a request that moves between groups"
    submit(r, keys, id="mover", prompt=prompt, stream=1, max_tokens=200)
    submit(r, keys, id="waiter", prompt="queued behind it", stream=1)
    balancer.tick()
    balancer.flush_acks()
    for _ in range(5):
        leaving.tick()
    assert len(tokens(events(r, keys.result("mover")))) == 5
    leaving.drain()
    leaving.drain()
    leaving.run()  # hands back both at once
    assert r.xlen(keys.requests) == 2

    staying = make_group("staying")
    balancer.refresh_groups()
    balancer.tick()
    assert sorted((q.id, q.takeover_from, e) for q, e in queued(r, keys, "staying")) == [
        ("mover", "leaving", 2), ("waiter", "leaving", 2)]
    run_until(staying.tick, lambda: all(finals(events(r, keys.result(x))) for x in ("mover", "waiter")))
    assert_one_clean_completion(events(r, keys.result("mover")), text=prompt)
    assert_one_clean_completion(events(r, keys.result("waiter")), text="queued behind it")
    assert settled(balancer, r, keys)


def test_handed_back_request_cancelled_before_redispatch(
        r: redis.Redis, keys: Keys, make_balancer: MakeBalancer,
        make_group: Callable[..., WorkerGroup]) -> None:
    leaving = make_group("leaving")
    balancer = make_balancer()
    submit(r, keys, id="gone", prompt="cancel me while I move", stream=1)
    balancer.tick()
    leaving.tick()
    leaving.tick()
    leaving.drain()
    leaving.drain()
    leaving.run()
    r.xadd(keys.cancel, {"id": "gone"})
    balancer.tick()
    evs = events(r, keys.result("gone"))
    assert [e["event"] for e in evs] == ["token", "token", "done"]
    assert evs[-1]["finish_reason"] == "cancelled"
    # it reports what its stream carried (the balancer has no tokenizer: the record of PUBLISH)
    assert (evs[-1]["text"], evs[-1]["token_ids"]) == ("ca", "[99,97]")
    assert_one_clean_completion(evs)
    assert state(r, keys, "gone")["owner"] == PUBLISHER
    assert settled(balancer, r, keys)


# --- reading ingress ------------------------------------------------------------------------------


def record_read_blocks(monkeypatch: pytest.MonkeyPatch) -> list[int | None]:
    """Each ingress read's BLOCK from now on, in order: the blocking XREADGROUP's milliseconds, or
    None for the non-blocking READ_INGRESS script."""
    blocks: list[int | None] = []
    real_read, real_script_read = Batch.xreadgroup, Balancer._read_ingress

    def xreadgroup(self: Batch, *a: Any, **k: Any) -> int:
        blocks.append(k.get("block"))
        return real_read(self, *a, **k)

    def read_ingress(self: Balancer, client: Any, *args: Any, **kwargs: Any) -> list[tuple[str, int]]:
        blocks.append(None)
        return real_script_read(self, client, *args, **kwargs)

    monkeypatch.setattr(Batch, "xreadgroup", xreadgroup)
    monkeypatch.setattr(Balancer, "_read_ingress", read_ingress)
    return blocks


def test_ingress_read_blocks_unless_a_waiting_request_can_be_routed(
        r: redis.Redis, keys: Keys, make_balancer: MakeBalancer, monkeypatch: pytest.MonkeyPatch) -> None:
    balancer = make_balancer(balancer_block_ms=7)
    blocks = record_read_blocks(monkeypatch)
    balancer.scripts.load()
    submit(r, keys, id="w", prompt="x")
    balancer.tick()  # the blocking read takes one entry, then reads on without blocking (None)
    balancer.tick()  # waiting, but no group: nothing to gain from spinning
    assert blocks == [7, None, 7] and list(balancer.waiting)

    fake_group(r, keys, "closing", accepting=False)
    balancer.refresh_groups()
    balancer.tick()  # "closing" looks routable: no block; routed there, it refuses and is paused
    balancer.tick()  # the only group is paused: block again
    assert blocks[3:] == [None, 7] and list(balancer.waiting)

    fake_group(r, keys, "open")
    balancer.refresh_groups()
    blocks.clear()
    balancer._read()
    assert blocks == [None]  # a waiting request can go somewhere now: do not wait for new ones
    balancer.process([])
    assert [q.id for q, _ in queued(r, keys, "open")] == ["w"]


# --- admission control ------------------------------------------------------------------------------


def test_requests_past_every_groups_bound_are_overloaded_at_once(
        r: redis.Redis, keys: Keys, make_balancer: MakeBalancer) -> None:
    fake_group(r, keys, "g1")
    fake_group(r, keys, "g2")
    balancer = make_balancer(group_max_requests=2)
    for n in range(7):
        submit(r, keys, id=f"o{n}", prompt="x", priority=0 if n < 5 else -1)  # the last two go first
    balancer.tick()
    accepted = {q.id for g in ("g1", "g2") for q, _ in queued(r, keys, g)}
    assert len(accepted) == 4 and {"o5", "o6"} <= accepted
    rejected = [f"o{n}" for n in range(7) if f"o{n}" not in accepted]
    for rid in rejected:
        assert "queue bound" in only_error(r, keys.result(rid), "overloaded")["message"]
    assert balancer.counts["overloaded"] == 3 and not balancer.waiting
    assert settled(balancer, r, keys)


def test_the_token_bound_counts_prompt_and_max_tokens(
        r: redis.Redis, keys: Keys, make_balancer: MakeBalancer) -> None:
    fake_group(r, keys, "g1")
    balancer = make_balancer(group_max_tokens=100)
    submit(r, keys, id="big", prompt="x" * 40, max_tokens=50)  # 90 tokens
    submit(r, keys, id="fits", prompt="y", max_tokens=9)  # 10 more: exactly at the bound
    submit(r, keys, id="over", prompt="z", max_tokens=1)
    balancer.tick()
    assert [q.id for q, _ in queued(r, keys, "g1")] == ["big", "fits"]
    only_error(r, keys.result("over"), "overloaded")
    assert int(r.get(keys.group_queue_tokens("g1"))) == 100


def test_the_total_bound_holds_across_groups(r: redis.Redis, keys: Keys, make_balancer: MakeBalancer) -> None:
    for name in ("g1", "g2", "g3"):
        fake_group(r, keys, name)
    balancer = make_balancer(total_max_requests=4)
    for n in range(6):
        submit(r, keys, id=f"t{n}", prompt="x")
    balancer.tick()
    assert sum(len(queued(r, keys, g)) for g in ("g1", "g2", "g3")) == 4
    assert "bounds" in only_error(r, keys.result("t5"), "overloaded")["message"]


def test_requests_waiting_for_a_group_are_bounded_too(
        r: redis.Redis, keys: Keys, make_balancer: MakeBalancer) -> None:
    balancer = make_balancer(total_max_requests=3)
    for n in range(5):
        submit(r, keys, id=f"w{n}", prompt="x")
    balancer.tick()  # no group yet: three wait, the others cannot
    assert len(balancer.waiting) == 3
    for n in (3, 4):
        assert "wait for a worker group" in only_error(r, keys.result(f"w{n}"), "overloaded")["message"]


def test_a_group_full_in_redis_but_not_in_the_balancers_view_sends_the_request_elsewhere(
        r: redis.Redis, keys: Keys, make_balancer: MakeBalancer) -> None:
    fake_group(r, keys, "g1")
    fake_group(r, keys, "g2")
    fill(r, keys, "g2", 3)  # busier, so g1 is picked first
    balancer = make_balancer(group_max_requests=4)
    balancer.refresh_groups()
    fill(r, keys, "g1", 4)  # another balancer filled g1 after this one read its queue
    submit(r, keys, id="re", prompt="x")
    ((_s, entries),) = r.xreadgroup(INGRESS_GROUP, "b1", {keys.requests: ">"})
    balancer.process(entries)
    assert [(q.id, e) for q, e in queued(r, keys, "g2")][3:] == [("re", 2)]  # taken over from g1's epoch
    assert settled(balancer, r, keys)


def test_moved_requests_are_admitted_past_the_bounds(
        r: redis.Redis, keys: Keys, make_balancer: MakeBalancer) -> None:
    fake_group(r, keys, "doomed")
    balancer = make_balancer(group_max_requests=2, total_max_requests=2)
    submit(r, keys, id="m1", prompt="x")
    submit(r, keys, id="m2", prompt="x")
    balancer.tick()
    fake_group(r, keys, "doomed", age_s=10)
    fake_group(r, keys, "full")
    fill(r, keys, "full", 2)
    balancer.refresh_groups()  # fails "doomed" over
    balancer.tick()
    assert sorted(q.id for q, _ in queued(r, keys, "full"))[:2] == ["m1", "m2"]
    assert balancer.counts["overloaded"] == 0


# --- migration: the new group continues from what the stream carries ----------------------------------


def test_a_request_moved_mid_stream_is_dispatched_with_its_published_tokens(
        r: redis.Redis, keys: Keys, make_balancer: MakeBalancer,
        make_group: Callable[..., WorkerGroup]) -> None:
    first = make_group("first")
    balancer = make_balancer()
    prompt = "naïve café, déjà vu"
    submit(r, keys, id="mig", prompt=prompt, stream=1, max_tokens=100)
    balancer.tick()
    for _ in range(6):
        first.tick()
    published = [int(e["token_id"]) for e in tokens(events(r, keys.result("mig")))]
    assert published == list(prompt.encode()[:6])
    # first stalls; its heartbeat ages past dead_after_s; a balancer fails it over
    r.hset(keys.group_info("first"), "heartbeat_ms", 1)
    r.zadd(keys.groups, {"first": 1})
    second = make_group("second")
    balancer.refresh_groups()
    balancer.tick()
    ((moved, epoch),) = queued(r, keys, "second")
    assert (moved.output_ids, epoch) == (tuple(published), 2)
    run_until(second.tick, lambda: bool(finals(events(r, keys.result("mig")))))
    assert_one_clean_completion(events(r, keys.result("mig")), text=prompt)
    # first wakes up: fenced, then finds its queue gone and starts afresh
    evs = events(r, keys.result("mig"))
    first._step_engine()
    first._publish()
    assert events(r, keys.result("mig")) == evs and first.fenced == 1
    with pytest.raises(redis.ResponseError, match="NOGROUP"):
        first.tick()


def test_balancer_detections_are_recorded(r: redis.Redis, keys: Keys, make_balancer: MakeBalancer) -> None:
    fake_group(r, keys, "gone", age_s=4)
    balancer = make_balancer(dead_after_s=3.0)
    balancer.refresh_groups()
    assert balancer.counts["failovers"] == 1
    (detection,) = balancer.detections_ms
    assert 4000 <= detection < 5000


def test_no_failover_while_redis_has_just_restarted(
        r: redis.Redis, keys: Keys, make_settings: Callable[..., Settings], mono: FakeMonotonic) -> None:
    uptime = [1.0]
    balancer = Balancer(r, settings=make_settings(), name="b1", monotonic=mono, redis_uptime_s=lambda: uptime[0])
    balancer.setup()
    fake_group(r, keys, "quiet", age_s=10)  # its last heartbeat is from before the restart
    balancer.refresh_groups()
    assert r.exists(keys.group_accepting("quiet")) and balancer.counts["failovers"] == 0
    uptime[0] = 4.5  # it had the time to reconnect and heartbeat, and did not
    balancer.refresh_groups()
    assert not r.exists(keys.group_accepting("quiet")) and balancer.counts["failovers"] == 1


def test_no_failover_of_a_group_that_heartbeat_since_it_was_read(
        r: redis.Redis, keys: Keys, make_balancer: MakeBalancer) -> None:
    fake_group(r, keys, "slow", age_s=10)
    balancer = make_balancer()
    real_age = balancer.failover.heartbeat_age_ms
    balancer.failover.heartbeat_age_ms = (  # type: ignore[method-assign]
        lambda group: (fake_group(r, keys, "slow"), real_age(group))[1])  # it beats just then
    balancer.refresh_groups()
    assert r.exists(keys.group_accepting("slow")) and balancer.counts["failovers"] == 0


# --- stats ------------------------------------------------------------------------------------------


def test_stats_key_reports_the_batch_size_histogram(
        r: redis.Redis, keys: Keys, make_balancer: MakeBalancer) -> None:
    fake_group(r, keys, "g1")
    balancer = make_balancer(balancer_batch_wait_ms=0.0)
    submit(r, keys, id="one", prompt="x")
    balancer.tick()
    for n in range(5):
        submit(r, keys, id=f"five{n}", prompt="x")
    balancer.tick()
    balancer.write_stats()
    stats = {k.decode(): v.decode() for k, v in r.hgetall(keys.balancer_stats("b1")).items()}
    assert json.loads(stats["batch_sizes"]) == {"1": 1, "5-8": 1}
    assert json.loads(stats["counts"])["dispatched"] == 6
    assert 0 < r.pttl(keys.balancer_stats("b1")) <= 10_000
    assert r.zrange(keys.balancers, 0, -1) == [b"b1"]


def test_a_busy_balancer_waits_briefly_for_a_larger_batch(
        r: redis.Redis, keys: Keys, make_settings: Callable[..., Settings], mono: FakeMonotonic) -> None:
    fake_group(r, keys, "g1")
    waits: list[float] = []

    def sleep(seconds: float) -> None:
        waits.append(seconds)
        for n in range(3):  # what arrives meanwhile
            submit(r, keys, id=f"late{len(waits)}-{n}", prompt="x")

    balancer = Balancer(r, settings=make_settings(balancer_batch_wait_ms=4.0), name="b1", monotonic=mono,
                        sleep=sleep, redis_uptime_s=lambda: 1e9)
    balancer.setup()
    for _ in range(3):
        submit(r, keys, id=f"idle{_}", prompt="x")
        balancer.tick()
        mono.advance(1.0)
    assert waits == []  # one request at a time: never a wait
    for tick in range(20):  # a burst: 4 entries every millisecond
        for n in range(4):
            submit(r, keys, id=f"burst{tick}-{n}", prompt="x")
        balancer.tick()
        mono.advance(0.001)
    assert waits and max(waits) <= 0.004
    assert max(balancer.batch_sizes) == 7  # 4 read, then 3 more after the wait


def test_a_lost_ingress_consumer_group_is_created_again(
        r: redis.Redis, keys: Keys, make_balancer: MakeBalancer) -> None:
    import threading
    import time

    fake_group(r, keys, "g1")
    balancer = make_balancer()
    r.delete(keys.requests)  # Redis came back without its data (no persistence)
    submit(r, keys, id="after", prompt="x")  # the stream exists again, without the consumer group
    runner = threading.Thread(target=balancer.run)
    runner.start()
    try:
        deadline = time.monotonic() + 10
        while not queued(r, keys, "g1") and time.monotonic() < deadline:
            time.sleep(0.02)  # the balancer runs on its own thread: watch what it does in Redis
    finally:
        balancer.stop.set()
        runner.join(10)
    assert [q.id for q, _ in queued(r, keys, "g1")] == ["after"]
