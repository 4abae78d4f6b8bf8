"""A worker group's queue follows the balancer's rule for entries it cannot handle: the request ends
with an error where one can be written, else the entry goes to ``{p}:dead``; it is acknowledged
and the group serves on (issue "Shared use without trust")."""

from __future__ import annotations

from typing import Any

import pytest
import redis

from broker.keys import QUEUE_GROUP, Keys
from broker.settings import Settings
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
    r.xadd(keys.group_queue("g1"), {"r": b"\xc1not msgpack", "e": "1"})
    enqueue(r, keys, "g1", make_request(keys, "good", "hello", max_tokens=3))
    run_until(group.tick, lambda: bool(finals(events(r, keys.result("good")))), limit=20)
    assert finals(events(r, keys.result("good")))[0]["event"] == "done"
    [letter] = dead(r, keys)
    assert letter["source"] == keys.group_queue("g1") and "malformed" in letter["reason"]
    assert queue_settled(r, keys, group)


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
