"""broker.consumer: the stream consumer both service loops use, on the real test Redis, and its
retry loop with the waits recorded instead of slept."""

from __future__ import annotations

import redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError

from broker.connection import RedisClock
from broker.consumer import Next, StreamConsumer, serve
from broker.keys import Keys
from broker.scripts import Scripts
from broker.settings import Settings
from broker.wire import Batch


def consumer(r: redis.Redis, keys: Keys, *, horizon_ms: int = 600_000) -> StreamConsumer:
    def ack(batch: Batch, stream: str, ids: list[bytes]) -> None:
        batch.xack(stream, "g", *ids)
        batch.xdel(stream, *ids)

    return StreamConsumer(r, Scripts(r), stream="s", group="g", consumer="c", cancel_stream=keys.cancel,
                          cancel_horizon_ms=horizon_ms, clock=RedisClock(r.time), ack=ack)


def read_new(c: StreamConsumer) -> list[bytes]:
    got = c.read(lambda batch: batch.xreadgroup("g", "c", {"s": ">"}, count=10))
    got.check()
    return [eid for _s, entries in got.replies[0] or [] for eid, _f in entries]


def test_acks_go_out_with_the_next_read_and_pending_ones_are_left_out_of_own_pending(
        r: redis.Redis, keys: Keys) -> None:
    c = consumer(r, keys)
    c.create_group()
    first = r.xadd("s", {"x": "1"})
    second = r.xadd("s", {"x": "2"})
    assert read_new(c) == [first, second]
    c.ack([first])
    assert [eid for chunk in c.own_pending() for eid, _f, _n in chunk] == [second]  # first is being acked
    assert r.xlen("s") == 2 and c.acks_due == 1  # not sent yet: no round trip of its own
    third = r.xadd("s", {"x": "3"})
    assert read_new(c) == [third]
    assert c.acks_due == 0 and r.xlen("s") == 2 and r.xpending("s", "g")["pending"] == 2


def test_the_cancel_feed_starts_after_the_last_cancel_and_remembers_for_its_horizon(
        r: redis.Redis, keys: Keys) -> None:
    r.xadd(keys.cancel, {"id": "old"})
    c = consumer(r, keys, horizon_ms=1000)
    c.create_group()
    r.xadd(keys.cancel, {"id": "new", "token": "t"})
    got = c.read(lambda batch: None)
    assert got.cancels == [("new", "t", None)] and got.replies == []
    assert c.cancels.matches("new", "t") and "old" not in c.cancels
    c.cancels.prune(c.clock.now_ms() + 61_000)  # past the 1 s horizon (and the once-a-minute pass)
    assert "new" not in c.cancels


def test_a_redis_without_the_cancel_script_loses_no_entry_and_no_cancel(r: redis.Redis, keys: Keys) -> None:
    """The cancel feed is a script (READ_CANCELS): on a Redis that lost its scripts (a restart, a
    SCRIPT FLUSH), the caller's reads in the same round trip went through and are not sent again
    (a second XREADGROUP '>' would find nothing: the entries would sit unseen in the pending list);
    the cancels come with the next read."""
    c = consumer(r, keys)
    c.create_group()
    entry = r.xadd("s", {"x": "1"})
    r.xadd(keys.cancel, {"id": "r1", "token": "t"})
    r.script_flush()
    got = c.read(lambda batch: batch.xreadgroup("g", "c", {"s": ">"}, count=10))
    got.check()
    assert [eid for _s, entries in got.replies[0] or [] for eid, _f in entries] == [entry]
    assert got.cancels == []
    assert c.read(lambda batch: None).cancels == [("r1", "t", None)]


def test_cancel_entries_are_read_bounded_whatever_their_size(r: redis.Redis, keys: Keys) -> None:
    """Only 'id' and 'token' of a cancel entry are read, and only when short enough to name a
    request: a client writing megabytes to the cancel stream costs a reader nothing of it."""
    c = consumer(r, keys)
    c.create_group()
    r.xadd(keys.cancel, {"id": "x" * (1 << 20), "blob": "y" * (1 << 20)})
    r.xadd(keys.cancel, {"id": "r2", "token": "t" * 300, "extra": "z" * 1000})
    r.xadd(keys.cancel, {"id": "r3"})
    # the 1 MiB id names no request; r2's token is longer than any request's (256 bytes): no cancel
    assert c.read(lambda batch: None).cancels == [("r3", None, None)]
    assert "r2" not in c.cancels


def test_serve_backs_off_on_a_lost_connection_and_hands_nogroup_to_its_caller() -> None:
    failures: list[Exception] = [RedisConnectionError("gone"), ResponseError("NOGROUP no such group"),
                                 RuntimeError("a bug")]
    waits: list[float] = []
    seen: list[str] = []

    def iteration() -> bool:
        if failures:
            raise failures.pop(0)
        return False  # done

    def on_nogroup(exc: ResponseError) -> Next:
        seen.append(str(exc))
        return Next.RETRY

    serve(iteration, settings=Settings(reconnect_base_s=0.5, reconnect_cap_s=0.5), what="test",
          stopped=lambda: False, wait=waits.append, on_nogroup=on_nogroup)
    assert seen == ["NOGROUP no such group"]
    assert len(waits) == 2 and all(0.25 <= w <= 0.5 for w in waits)  # the lost connection and the bug


def test_serve_leaves_when_the_caller_says_so() -> None:
    calls: list[int] = []

    def iteration() -> bool:
        calls.append(1)
        raise ResponseError("NOGROUP gone")

    serve(iteration, settings=Settings(), what="test", stopped=lambda: False, wait=lambda _s: None,
          on_nogroup=lambda _exc: Next.LEAVE)
    assert calls == [1]


def test_one_read_takes_a_bounded_share_of_the_tenants_cancel_streams(r: redis.Redis, keys: Keys) -> None:
    """Three tenants each with 1000 cancel entries: one read takes CANCEL_READ_COUNT of the shared
    stream and as many of the tenants' together (a third each), not 1000 of each: the cost of a
    read does not grow with the tenants; the next reads take the rest."""
    from broker.consumer import CANCEL_READ_COUNT

    c = consumer(r, keys)
    c.create_group()
    tenants = ["alice", "bob", "carol"]
    c.set_streams([], {keys.tenant_cancel(t): t for t in tenants})
    c.read(lambda batch: None)  # (loads the scripts)
    for t in tenants:
        pipe = r.pipeline(transaction=False)
        for n in range(CANCEL_READ_COUNT):
            pipe.xadd(keys.tenant_cancel(t), {"id": f"{t}{n}"})
        pipe.execute()
    got = c.read(lambda batch: None).cancels
    assert len(got) <= CANCEL_READ_COUNT and {cancel.tenant for cancel in got} == set(tenants)
    assert all(abs(sum(x.tenant == t for x in got) - CANCEL_READ_COUNT // 3) <= 1 for t in tenants)
    total = len(got)
    while total < 3 * CANCEL_READ_COUNT:
        more = c.read(lambda batch: None).cancels
        assert more
        total += len(more)
    assert total == 3 * CANCEL_READ_COUNT
