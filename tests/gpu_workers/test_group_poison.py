"""A worker group's queue follows the balancer's rule for entries it cannot handle: the request ends
with an error where one can be written, else the entry goes to ``{p}:dead``; it is acknowledged
and the group serves on (issue "Shared use without trust")."""

from __future__ import annotations

from typing import Any

import pytest
import redis

from broker.keys import QUEUE_GROUP, Keys
from broker.lua import queue_signature
from broker.settings import Settings
from broker.signing import SigningKey
from gpu_workers.echo import EchoEngine
from gpu_workers.group import CONSUMER, WorkerGroup
from gpu_workers.intake import MAX_DELIVERIES
from tests.gpu_workers.helpers import FakeMonotonic, enqueue, events, finals, make_request, run_until


@pytest.fixture
def r(any_redis: redis.Redis) -> redis.Redis:
    return any_redis


def make_group(r: redis.Redis, prefix: str, mono: FakeMonotonic, **overrides: Any) -> WorkerGroup:
    group = WorkerGroup(r, EchoEngine(), settings=Settings(prefix=prefix, worker_block_ms=1, **overrides),
                        name="g1", monotonic=mono)
    group.register()
    return group


def dead(r: redis.Redis, keys: Keys) -> list[dict[str, str]]:
    """The dead letters (they may carry the entry's binary fields)."""
    return [{k.decode(): v.decode("utf-8", "replace") for k, v in f.items()} for _id, f in r.xrange(keys.dead)]


def queue_settled(r: redis.Redis, keys: Keys, group: WorkerGroup) -> bool:
    group._flush_acks()
    queue = keys.group_queue("g1")
    return r.xlen(queue) == 0 and r.xpending(queue, QUEUE_GROUP)["pending"] == 0


def test_a_malformed_queue_entry_goes_to_dead_and_the_group_serves_on(
        r: redis.Redis, keys: Keys, prefix: str, mono: FakeMonotonic) -> None:
    group = make_group(r, prefix, mono)
    junk = b"\xc1not msgpack"  # signed: a balancer's bug, not a client's forgery
    r.xadd(keys.group_queue("g1"), {"r": junk, "e": "1", "s": queue_signature(SigningKey(r, keys).get(), junk, 1, 0)})
    enqueue(r, keys, "g1", make_request(keys, "good", "hello", max_tokens=3))
    run_until(group.tick, lambda: bool(finals(events(r, keys.result("good")))), limit=20)
    assert finals(events(r, keys.result("good")))[0]["event"] == "done"
    [letter] = dead(r, keys)
    assert letter["source"] == keys.group_queue("g1") and "malformed" in letter["reason"]
    assert queue_settled(r, keys, group)


@pytest.mark.parametrize("signature", [None, "00" * 32, "signed under another key"])
def test_a_queue_entry_the_pipeline_did_not_sign_is_refused_unread(
        r: redis.Redis, keys: Keys, prefix: str, mono: FakeMonotonic, signature: str | None) -> None:
    """A client that can write a group's queue (no ACL recipe) puts a well-formed request there, or
    replays one under a fresh epoch: without the pipeline's signature it runs nowhere, nothing is
    written to the reply stream it names, and it goes to {p}:dead; the group serves on."""
    group = make_group(r, prefix, mono)
    victim = make_request(keys, "victim", "real prompt", max_tokens=3)
    epoch = enqueue(r, keys, "g1", victim)
    forged = make_request(keys, "victim", "forged prompt", max_tokens=3)
    fields: dict[str, Any] = {"r": forged.to_wire(), "e": str(epoch + 1), "c": "0"}
    if signature == "signed under another key":
        fields["s"] = queue_signature(b"k" * 64, forged.to_wire(), epoch + 1, 0)
    elif signature is not None:
        fields["s"] = signature
    r.xadd(keys.group_queue("g1"), fields)
    run_until(group.tick, lambda: bool(finals(events(r, keys.result("victim")))) and queue_settled(r, keys, group),
              limit=30)
    [final] = finals(events(r, keys.result("victim")))
    assert final["event"] == "done" and final["text"] == "rea"
    [letter] = dead(r, keys)
    assert "not signed" in letter["reason"] and letter["id"] == "" and letter["reply_to"] == ""


def test_a_failover_moves_no_forged_queue_entry(r: redis.Redis, keys: Keys, prefix: str, mono: FakeMonotonic) -> None:
    """A balancer failing a dead group over signs what it moves to ingress: an unsigned entry in
    the queue is dropped, not laundered into a signed ingress entry."""
    from balancer.failover import Failover
    from broker.scripts import Scripts

    make_group(r, prefix, mono)
    good = make_request(keys, "good", "hello", max_tokens=3)
    enqueue(r, keys, "g1", good)
    forged = make_request(keys, "forged", "hi", max_tokens=3)
    r.xadd(keys.group_queue("g1"), {"r": forged.to_wire(), "e": "1", "c": "0"})
    failover = Failover(r, Scripts(r), keys, settings=Settings(prefix=prefix), owner="b1", redis_uptime_s=lambda: 1e9)
    assert failover._move("g1") == 1
    [(_id, moved)] = r.xrange(keys.requests)
    assert b"forged" not in moved[b"payload"] and b"good" in moved[b"payload"]


@pytest.mark.parametrize("kind", ["string", "hash"])
def test_a_reply_stream_of_another_type_gets_the_error_on_the_default_stream(
        r: redis.Redis, keys: Keys, prefix: str, mono: FakeMonotonic, kind: str) -> None:
    """The key turned into another type after the balancer checked it: the worker's publish fails."""
    group = make_group(r, prefix, mono)
    enqueue(r, keys, "g1", make_request(keys, "q", "hello", max_tokens=3, reply_to="app:inbox"))
    r.set("app:inbox", "v") if kind == "string" else r.hset("app:inbox", "f", "v")
    run_until(group.tick, lambda: queue_settled(r, keys, group), limit=20)
    [final] = finals(events(r, keys.result("q")))
    assert final["code"] == "invalid_request" and "WRONGTYPE" in final["message"]
    assert dead(r, keys) == []


def test_a_starting_group_gives_up_an_entry_delivered_too_often(
        r: redis.Redis, keys: Keys, prefix: str, mono: FakeMonotonic) -> None:
    """An entry that every incarnation of the group read and never finished (it kills the group)."""
    make_group(r, prefix, mono)
    enqueue(r, keys, "g1", make_request(keys, "killer", "hello", max_tokens=3))
    for _ in range(MAX_DELIVERIES + 1):
        r.xreadgroup(QUEUE_GROUP, CONSUMER, {keys.group_queue("g1"): "0" if _ else ">"})
    group = make_group(r, prefix, mono)
    assert "killer" not in group.held
    [final] = finals(events(r, keys.result("killer")))
    assert final["code"] == "internal" and "delivered" in final["message"]
    assert queue_settled(r, keys, group)
