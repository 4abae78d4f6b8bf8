"""broker.wire: batches on a connection of our own give what redis-py's pipelines give."""

from __future__ import annotations

import socket

import pytest
import redis
from redis.exceptions import NoScriptError, ResponseError

from broker.embedded import EmbeddedRedis
from broker.wire import Batch, Wire, stream_reply


def test_stream_reads_are_shaped_as_redis_py_shapes_them(r: redis.Redis) -> None:
    first = r.xadd("s", {"a": "1", "b": "2"})
    r.xadd("s", {"c": "3"})
    r.xgroup_create("s", "grp", id="0")
    batch = Batch()
    batch.xread({"s": "0-0"}, count=10)
    batch.xreadgroup("grp", "me", {"s": ">"}, count=1)
    batch.xread({"missing": "0-0"}, count=1)
    plain, grouped, nothing = Wire(r).execute(batch)
    assert plain == r.xread({"s": "0-0"}, count=10)
    assert grouped == [[b"s", [(first, {b"a": b"1", b"b": b"2"})]]]
    assert nothing is None


def test_a_blocking_read_that_times_out_gives_none(r: redis.Redis) -> None:
    r.xgroup_create("q", "grp", id="$", mkstream=True)
    batch = Batch()
    batch.xreadgroup("grp", "me", {"q": ">"}, count=5, block=5)
    assert Wire(r).execute(batch) == [None]


def test_acks_ahead_of_a_blocking_read_take_effect_before_it_blocks(r: redis.Redis) -> None:
    entry = r.xadd("q", {"x": "1"})
    r.xgroup_create("q", "grp", id="0")
    r.xreadgroup("grp", "me", {"q": ">"})
    batch = Batch()
    batch.xack("q", "grp", entry)
    batch.xdel("q", entry)
    batch.xreadgroup("grp", "me", {"q": ">"}, block=5)
    assert Wire(r).execute(batch) == [1, 1, None]
    assert r.xlen("q") == 0 and r.xpending("q", "grp")["pending"] == 0


def test_error_replies_come_back_in_place_and_the_rest_still_runs(r: redis.Redis) -> None:
    r.set("plain", "x")
    sha = r.script_load("return redis.call('INCR', KEYS[1])")
    batch = Batch()
    batch.evalsha("0" * 40, 0)
    batch.xread({"plain": "0-0"})  # WRONGTYPE
    batch.evalsha(sha, 1, "n")
    missing, wrong, counted = Wire(r).execute(batch)
    assert isinstance(missing, NoScriptError)
    assert isinstance(wrong, ResponseError) and "WRONGTYPE" in str(wrong)
    assert counted == 1 and r.get("n") == b"1"


def test_an_empty_batch_sends_nothing(r: redis.Redis) -> None:
    wire = Wire(r)
    assert wire.execute(Batch()) == []
    assert wire._conn is None


def test_a_lost_connection_is_raised_then_made_again() -> None:
    with EmbeddedRedis() as server:
        client = redis.Redis.from_url(server.url)
        wire = Wire(client)
        batch = Batch()
        batch.xread({"s": "0-0"})
        assert wire.execute(batch) == [None]
        # the server drops every client (as a restart would): the next batch fails, the one after works
        client.client_kill_filter(skipme=True, _type="normal")
        with pytest.raises((redis.ConnectionError, ConnectionError, OSError)):
            wire.execute(batch)
        assert wire.execute(batch) == [None]
        wire.close()
        client.close()


def test_replies_of_a_failed_batch_never_leak_into_the_next(r: redis.Redis) -> None:
    """A batch that fails midway drops its connection, so no stale reply is read as the next one's."""
    wire = Wire(r)
    batch = Batch()
    batch.evalsha(r.script_load("return 1"), 0)
    assert wire.execute(batch) == [1]
    conn = wire._conn
    real_read = conn.read_response
    calls = 0

    def fail_once(*args: object, **kwargs: object) -> object:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise TimeoutError("timed out")
        return real_read(*args, **kwargs)

    conn.read_response = fail_once
    with pytest.raises(socket.timeout):
        wire.execute(batch)
    assert wire._conn is None
    assert wire.execute(batch) == [1]


def test_stream_reply_takes_resp2_lists_and_resp3_maps() -> None:
    resp2 = [[b"s", [[b"1-0", [b"a", b"1"]], [b"2-0", None]]]]
    resp3 = {b"s": [[b"1-0", [b"a", b"1"]], [b"2-0", None]]}
    expected = [[b"s", [(b"1-0", {b"a": b"1"}), (b"2-0", None)]]]
    assert stream_reply(resp2) == expected
    assert stream_reply(resp3) == expected
    assert stream_reply(None) is None and stream_reply([]) is None
