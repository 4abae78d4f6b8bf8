"""Queue entries are signed by the balancer that dispatches them (broker.lua.queue_signature), and
the signing key may be deleted and made anew (docs/OPERATIONS.md) without stopping dispatch."""

from __future__ import annotations

import redis

from balancer.service import Balancer
from broker.keys import Keys
from broker.lua import queue_entry
from broker.settings import Settings
from broker.signing import PREVIOUS_KEY_S, REFRESH_S, SigningKey, sign
from gpu_workers.echo import EchoEngine
from gpu_workers.group import WorkerGroup
from tests.gpu_workers.helpers import FakeMonotonic, events, finals, run_until


def test_dispatched_entries_verify_also_after_the_key_is_made_anew(
        r: redis.Redis, keys: Keys, prefix: str, mono: FakeMonotonic) -> None:
    settings = Settings(prefix=prefix, balancer_block_ms=1, worker_block_ms=1, groups_refresh_s=1.0)
    balancer = Balancer(r, settings=settings, name="b1", monotonic=mono, redis_uptime_s=lambda: 1e9)
    balancer.setup()
    group = WorkerGroup(r, EchoEngine(), settings=settings, name="g1", monotonic=mono)
    group.register()
    balancer.refresh_groups()
    r.xadd(keys.requests, {"id": "q1", "prompt": "abc", "max_tokens": "3"})
    balancer.tick()
    [(_id, fields)] = r.xrange(keys.group_queue("g1"))
    assert queue_entry(fields, signing=SigningKey(r, keys)).request.id == "q1"  # signed: it verifies
    run_until(lambda: (balancer.tick(), group.tick()), lambda: bool(finals(events(r, keys.result("q1")))))

    r.delete(keys.signing_key)  # an operator's reset: the next reader makes a new key
    group = WorkerGroup(r, EchoEngine(), settings=settings, name="g1", monotonic=mono)  # restarted: no key kept
    group.register()
    mono.advance(settings.groups_refresh_s)  # the balancer re-reads the key with its next refresh
    r.xadd(keys.requests, {"id": "q2", "prompt": "xyz", "max_tokens": "3"})
    run_until(lambda: (balancer.tick(), group.tick()), lambda: bool(finals(events(r, keys.result("q2")))))
    assert [e["event"] for e in finals(events(r, keys.result("q2")))] == ["done"] and not r.xlen(keys.dead)


def test_the_key_before_a_change_stays_good_for_a_while(r: redis.Redis, keys: Keys, mono: FakeMonotonic) -> None:
    """What was signed just before the key was made anew verifies for PREVIOUS_KEY_S, then no more;
    a signature under no key of the pipeline never does."""
    reader = SigningKey(r, keys, monotonic=mono)
    old = reader.get()
    r.delete(keys.signing_key)
    new = SigningKey(r, keys).get()
    mono.advance(REFRESH_S)
    assert reader.verifies(b"x", sign(new, b"x"))  # read again on the miss
    assert reader.verifies(b"x", sign(old, b"x")) and not reader.verifies(b"x", sign(b"k" * 64, b"x"))
    mono.advance(PREVIOUS_KEY_S)
    assert not reader.verifies(b"x", sign(old, b"x")) and reader.verifies(b"x", sign(new, b"x"))
