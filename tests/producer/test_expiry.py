"""A reader that comes after its result expired is told so (``ResultExpired``, code ``expired``),
not left to time out; one that comes early still waits (producer.expiry)."""

from __future__ import annotations

import asyncio
import time

import pytest
import redis

from broker.errors import ResultExpired
from broker.keys import Keys
from broker.settings import Settings
from producer.async_client import AsyncClient
from producer.client import Client, Handle

# Blocking reads of 100 ms (socket_timeout_s * 500): each check comes after one.
FAST = {"socket_timeout_s": 0.2}


@pytest.fixture
def fast(redis_url: str, prefix: str) -> Settings:
    return Settings(redis_url=redis_url, prefix=prefix, **FAST)


def finish_and_expire(r: redis.Redis, keys: Keys, handle: Handle) -> None:
    """What a balancer, a group and then the result TTL leave of a request: nothing at all."""
    r.xdel(keys.requests, handle.entry_id)
    for key in (handle.reply_to, keys.state(handle.reply_to, handle.id), keys.request_id(handle.id)):
        r.delete(key)


def test_a_result_read_after_it_expired_is_reported_expired(fast: Settings, r: redis.Redis, keys: Keys) -> None:
    with Client(settings=fast) as client:
        handle = client.submit("hi", max_tokens=2)
        assert handle.entry_id
        finish_and_expire(r, keys, handle)
        started = time.monotonic()
        with pytest.raises(ResultExpired) as info:
            client.result(handle, timeout=30)
        assert time.monotonic() - started < 5
        assert info.value.code == "expired" and handle.id in str(info.value)


def test_a_bare_id_is_reported_after_two_empty_reads(fast: Settings, keys: Keys) -> None:
    with Client(settings=fast) as client, pytest.raises(ResultExpired):
        client.result("never-sent-or-long-gone", timeout=30)


def test_a_request_still_queued_is_waited_for(fast: Settings, r: redis.Redis, keys: Keys) -> None:
    """No balancer has seen it yet: its entry is still in the ingress stream. Only the timeout ends it."""
    with Client(settings=fast) as client:
        handle = client.submit("hi", max_tokens=2)
        with pytest.raises(TimeoutError):
            client.result(handle, timeout=0.5)
        r.set(keys.request_id(handle.id), "routed")  # held by a balancer, not yet answered
        r.xdel(keys.requests, handle.entry_id)
        with pytest.raises(TimeoutError):
            client.result(handle, timeout=0.5)


def test_the_async_client_reports_expiry_on_an_own_reply_stream(fast: Settings, keys: Keys) -> None:
    async def main() -> None:
        client = AsyncClient(settings=fast)
        try:
            with pytest.raises(ResultExpired):
                await client.result(Handle("gone", "app:replies"), timeout=30)
        finally:
            await client.close()

    asyncio.run(main())
