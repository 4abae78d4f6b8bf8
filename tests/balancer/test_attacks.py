"""Attacks on the cancel stream found by a fresh-eyes review of issue "Shared use without trust":
``{p}:cancel`` is as client-writable as ``{p}:requests`` (the ACL recipe grants XADD on both), so
what a balancer and a worker group read from it must be bounded, and no one but a request's owner
may change whether that request can be cancelled. Each test here shows one defect (they fail until
it is fixed), on the bundled Redis 6.2 and the system Redis 7.
"""

from __future__ import annotations

import tracemalloc
from collections.abc import Callable
from typing import Any

import pytest
import redis

from balancer.service import Balancer

MAX_TOKENS_PER_ID = 32  # the first-come cap per id that Cancellations once had
from broker.keys import Keys
from broker.settings import Settings
from gpu_workers.echo import EchoEngine
from gpu_workers.group import WorkerGroup
from tests.gpu_workers.helpers import FakeMonotonic, events, finals

MakeBalancer = Callable[..., Balancer]


@pytest.fixture
def r(any_redis: redis.Redis) -> redis.Redis:
    return any_redis


@pytest.fixture
def make_settings(prefix: str) -> Callable[..., Settings]:
    def make(**overrides: Any) -> Settings:
        return Settings(prefix=prefix, **{"balancer_block_ms": 1, "worker_block_ms": 1, **overrides})

    return make


@pytest.fixture
def make_balancer(r: redis.Redis, make_settings: Callable[..., Settings], mono: FakeMonotonic) -> MakeBalancer:
    def make(name: str = "b1", **overrides: Any) -> Balancer:
        balancer = Balancer(r, settings=make_settings(**overrides), name=name, monotonic=mono,
                            redis_uptime_s=lambda: 1e9)
        balancer.setup()
        return balancer

    return make


def test_wrong_tokens_of_a_stranger_do_not_stop_the_owner_from_cancelling(
        r: redis.Redis, keys: Keys, make_balancer: MakeBalancer) -> None:
    """Defect: ``Cancellations`` keeps at most MAX_TOKENS_PER_ID (32) tokens per request id, first
    come first kept. A stranger who knows (or guesses) an id XADDs 32 cancels with wrong tokens; the
    owner's cancel with the right token is then dropped, and the request runs to the end. Knowing an
    id must not be enough to make a request uncancellable, no more than to cancel it.

    Repro (redis-cli, no group up so the request waits in the balancer):
      XADD ryz:requests * id v1 prompt hello cancel_token RIGHT
      (32x) XADD ryz:cancel * id v1 token wrongN
      XADD ryz:cancel * id v1 token RIGHT     -> v1 never ends 'cancelled'
    """
    balancer = make_balancer()  # no worker group: the request waits, and cancels apply to it there
    r.xadd(keys.requests, {"id": "v1", "prompt": "hello", "cancel_token": "RIGHT"})
    for _ in range(10):  # the first tick may be the reclaim pass's
        balancer.tick()
        if balancer.waiting:
            break
    assert balancer.waiting
    for i in range(MAX_TOKENS_PER_ID):
        r.xadd(keys.cancel, {"id": "v1", "token": f"wrong{i}"})
    r.xadd(keys.cancel, {"id": "v1", "token": "RIGHT"})  # the owner's own cancel
    balancer.tick()
    balancer.tick()
    assert [e.get("finish_reason") for e in finals(events(r, keys.result("v1")))] == ["cancelled"]
    assert not balancer.waiting


def test_wrong_tokens_of_a_stranger_do_not_stop_the_owner_cancelling_in_the_group_queue(
        r: redis.Redis, keys: Keys, make_settings: Callable[..., Settings], make_balancer: MakeBalancer,
        mono: FakeMonotonic) -> None:
    """The same defect in a worker group: a request read from the queue after its cancels checks
    ``Cancellations.matches``, which lost the owner's token behind 32 wrong ones."""
    balancer = make_balancer()
    group = WorkerGroup(redis.Redis(connection_pool=r.connection_pool), EchoEngine(), settings=make_settings(),
                        name="g1", monotonic=mono)
    group.register()
    balancer.refresh_groups()
    r.xadd(keys.requests, {"id": "v2", "prompt": "hello " * 20, "max_tokens": "100", "cancel_token": "RIGHT"})
    balancer.tick()  # dispatched to g1's queue, not yet read by the group
    for i in range(MAX_TOKENS_PER_ID):
        r.xadd(keys.cancel, {"id": "v2", "token": f"wrong{i}"})
    r.xadd(keys.cancel, {"id": "v2", "token": "RIGHT"})
    for _ in range(200):
        if finals(events(r, keys.result("v2"))):
            break
        balancer.tick()
        group.tick()
    assert [e.get("finish_reason") for e in finals(events(r, keys.result("v2")))] == ["cancelled"]


def test_cancel_entries_with_huge_ids_are_not_read_whole_nor_remembered(
        r: redis.Redis, keys: Keys, make_balancer: MakeBalancer) -> None:
    """Defect (issue case 7's kind, on the other client-writable stream): a balancer reads
    ``{p}:cancel`` with XREAD COUNT 1000 and no bound in bytes, and remembers every id it reads for
    HORIZON_MS (10 minutes), even ids that no request can have (ids are at most 128 characters).
    20 cancels with 4 MB ids: the balancer holds 80 MB after one tick (peak 160 MB); a few clients
    push every balancer and every worker group to many GB, for 10 minutes.

    Repro: for i in 1..20: XADD ryz:cancel * id <4 MB string>; watch a balancer's RSS.
    """
    balancer = make_balancer(balancer_read_bytes=8 << 20)  # the operator's bound on one read's memory
    balancer.tick()
    for i in range(10):
        r.xadd(keys.cancel, {"id": f"{i}" + "x" * (4 << 20)})
    tracemalloc.start()
    try:
        balancer.tick()
        held, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert held < 1 << 20, f"{held / 1e6:.0f} MB of cancel ids kept after the read"
    assert peak < 2 * balancer.settings.balancer_read_bytes, f"one tick peaked at {peak / 1e6:.0f} MB"


def test_reply_to_cannot_be_another_requests_tenant_result_stream(
        r: redis.Redis, keys: Keys, make_settings: Callable[..., Settings], make_balancer: MakeBalancer,
        mono: FakeMonotonic) -> None:
    """Defect (issue case 3's kind): ``reply_to_problem`` refuses another request's default result
    stream only in its plain form ``{p}:result:<id>``; the default result stream of a tenant's
    request, ``{p}:t:<tenant>:result:<id>`` (what ``Client(tenant=...)`` reads, Keys.reply_stream),
    is accepted for any id. An attacker's ``done`` lands there, first, and a raw reader of that
    stream (or any reader that does not filter by id) takes it as its answer.

    Repro: XADD ryz:requests * id evil prompt "you are hacked" reply_to ryz:t:alice:result:victim
           -> ryz:t:alice:result:victim holds {id: evil, event: done, text: "you are hacked"}
    """
    balancer = make_balancer()
    group = WorkerGroup(redis.Redis(connection_pool=r.connection_pool), EchoEngine(), settings=make_settings(),
                        name="g1", monotonic=mono)
    group.register()
    balancer.refresh_groups()
    victim = keys.reply_stream("victim", tenant="alice")
    r.xadd(keys.requests, {"id": "evil", "prompt": "you are hacked", "reply_to": victim})
    for _ in range(100):
        if finals(events(r, victim)) or finals(events(r, keys.result("evil"))):
            break
        balancer.tick()
        group.tick()
    assert events(r, victim) == [], "another tenant request's result stream was written"
    [error] = finals(events(r, keys.result("evil")))
    assert error["event"] == "error" and error["code"] == "invalid_request"


def test_an_explicit_entry_id_in_the_future_does_not_move_a_requests_clock(
        r: redis.Redis, keys: Keys, make_balancer: MakeBalancer) -> None:
    """``XADD ryz:requests <far future>-0 ...`` is allowed to any writer of the stream; the entry
    id's time must not become the request's enqueue time (its timeout would never come, its queue
    time would be negative), nor that of the requests after it, whose ``*`` ids Redis now puts
    after it."""
    balancer = make_balancer()
    now_ms = int(r.time()[0]) * 1000
    future = now_ms + 10 * 365 * 86_400_000
    r.xadd(keys.requests, {"id": "early", "prompt": "a", "timeout_s": "5"}, id=f"{future}-0")
    r.xadd(keys.requests, {"id": "later", "prompt": "b"})  # an ordinary client's XADD *
    for _ in range(10):
        balancer.tick()
        if len(balancer.waiting) == 2:
            break
    stamps = {w.request.id: w.request.enqueued_ms for w in balancer.waiting.values()}
    assert set(stamps) == {"early", "later"}
    assert all(now_ms - 60_000 <= ms <= now_ms + 60_000 for ms in stamps.values()), stamps
