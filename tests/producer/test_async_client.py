"""The asyncio client: one shared reply stream, one dispatcher, against a real Redis and the responder."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import redis

from broker.errors import InvalidRequest, RequestFailed
from broker.keys import Keys
from broker.settings import Settings
from producer.async_client import AsyncClient
from producer.client import ClientClosed, Handle
from tests.producer.conftest import Responder


def run_with(settings: Settings, body: Callable[[AsyncClient], Awaitable[Any]], **kwargs: Any) -> Any:
    """Run ``body(client)`` on a fresh event loop, closing the client after."""

    async def main() -> Any:
        async with AsyncClient(settings=settings, **kwargs) as client:
            return await asyncio.wait_for(body(client), 20)

    return asyncio.run(main())


def test_many_concurrent_requests_share_one_reply_stream(
    settings: Settings, responder: Responder, r: redis.Redis, keys: Keys
) -> None:
    n = 300
    seen: dict[str, Any] = {}

    async def body(client: AsyncClient) -> list[Any]:
        results = await asyncio.gather(
            *(client.generate(f"request number {i}", timeout=10) for i in range(n))
        )
        seen["client_keys"] = r.keys(f"{keys.prefix}:client:*")
        seen["reply_to"] = client.reply_to
        seen["pending"] = dict(client._pending)
        return results

    results = run_with(settings, body)

    assert [c.text for c in results] == [f"request number {i}" for i in range(n)]
    assert len({c.id for c in results}) == n
    assert seen["client_keys"] == [seen["reply_to"].encode()]
    assert r.keys(f"{keys.prefix}:result:*") == []
    assert {q.reply_to for q in responder.requests} == {seen["reply_to"]}
    assert set(responder.finals.values()) == {1} and len(responder.finals) == n
    assert seen["pending"] == {}


def test_concurrent_streams_get_each_token_exactly_once(settings: Settings, responder: Responder) -> None:
    async def collect(client: AsyncClient, i: int) -> list[str]:
        return [d async for d in client.stream(f"stream {i} of many", timeout=10)]

    async def body(client: AsyncClient) -> list[list[str]]:
        return await asyncio.gather(*(collect(client, i) for i in range(100)))

    streams = run_with(settings, body)

    assert streams == [["stream", f" {i}", " of", " many"] for i in range(100)]


def test_events_in_order_with_one_final(settings: Settings, responder: Responder) -> None:
    async def body(client: AsyncClient) -> list[tuple[str, str | None]]:
        handle = await client.submit("x y", stream=True)
        return [(e.kind, e.fields.get("index")) async for e in client.events(handle, timeout=5)]

    assert run_with(settings, body) == [("token", "0"), ("token", "1"), ("done", None)]


def test_result_of_an_id_this_client_did_not_submit(
    settings: Settings, responder: Responder, r: redis.Redis, keys: Keys
) -> None:
    r.xadd(keys.requests, {"id": "foreign-1", "prompt": "from someone else"})

    async def body(client: AsyncClient) -> str:
        return (await client.result("foreign-1", timeout=5)).text

    assert run_with(settings, body) == "from someone else"


def test_explicit_reply_to_is_read_from_that_stream(
    settings: Settings, responder: Responder, r: redis.Redis
) -> None:
    async def body(client: AsyncClient) -> tuple[Handle, str, str]:
        handle = await client.submit("own stream", reply_to="mine")
        by_handle = (await client.result(handle, timeout=5)).text
        by_id = (await client.result(handle.id, timeout=5)).text
        return handle, by_handle, by_id

    handle, by_handle, by_id = run_with(settings, body)

    assert handle.reply_to == "mine" and by_handle == by_id == "own stream"
    assert r.xlen("mine") == 1


def test_the_shared_stream_is_trimmed_behind_the_dispatcher(
    settings: Settings, responder: Responder, r: redis.Redis
) -> None:
    n = 400

    async def body(client: AsyncClient) -> tuple[int, str]:
        await asyncio.gather(*(client.generate(f"p{i}", timeout=10) for i in range(n)))
        return r.xlen(client.reply_to), client.reply_to

    length, reply_to = run_with(settings, body, trim_every=50)

    assert sum(responder.finals.values()) == n  # one event each went onto the shared stream
    assert 0 < length < n / 2  # approximate trimming keeps at most a partly consumed macro node or two
    assert r.exists(reply_to) == 0  # closing deletes it


def test_error_event_raises_request_failed(settings: Settings, responder: Responder) -> None:
    async def body(client: AsyncClient) -> None:
        await client.generate("fail:timeout", timeout=5)

    with pytest.raises(RequestFailed) as failed:
        run_with(settings, body)
    assert failed.value.code == "timeout"


def test_streaming_error_raises_request_failed(settings: Settings, responder: Responder) -> None:
    async def body(client: AsyncClient) -> None:
        async for _ in client.stream("fail:overloaded", timeout=5):
            pass

    with pytest.raises(RequestFailed) as failed:
        run_with(settings, body)
    assert failed.value.code == "overloaded"


def test_timeout_keeps_later_events_for_the_next_wait(settings: Settings, responder: Responder) -> None:
    async def body(client: AsyncClient) -> str:
        handle = await client.submit("hang")
        with pytest.raises(TimeoutError):
            await client.result(handle, timeout=0.1)
        await client.cancel(handle)
        return (await client.result(handle, timeout=5)).finish_reason

    assert run_with(settings, body) == "cancelled"


def test_the_dispatcher_rides_out_redis_errors(settings: Settings, responder: Responder) -> None:
    async def body(client: AsyncClient) -> list[str]:
        real_xread = client._redis.xread
        failures = iter(
            [redis.ConnectionError("blip"), redis.TimeoutError("blip"), redis.ConnectionError("x")]
        )
        calls = []

        async def flaky_xread(*args: Any, **kwargs: Any) -> Any:
            calls.append(args)
            for exc in failures:
                raise exc
            return await real_xread(*args, **kwargs)

        client._redis.xread = flaky_xread  # type: ignore[method-assign]
        results = await asyncio.gather(*(client.generate(f"survivor {i}", timeout=10) for i in range(50)))
        assert len(calls) > 3
        return [c.text for c in results]

    assert run_with(settings, body) == [f"survivor {i}" for i in range(50)]


def test_a_killed_connection_loses_no_event(settings: Settings, responder: Responder, r: redis.Redis) -> None:
    async def body(client: AsyncClient) -> list[str]:
        first = [asyncio.ensure_future(client.generate(f"before {i}", timeout=10)) for i in range(20)]
        await asyncio.gather(*first)
        await asyncio.sleep(0)  # let the dispatcher block again
        r.client_kill_filter(_type="normal", skip_me=True)
        rest = await asyncio.gather(*(client.generate(f"after {i}", timeout=10) for i in range(20)))
        return [c.text for c in rest]

    assert run_with(settings, body) == [f"after {i}" for i in range(20)]


def test_closing_fails_waiting_requests_and_stops_the_dispatcher(
    settings: Settings, responder: Responder
) -> None:
    async def main() -> None:
        client = AsyncClient(settings=settings)
        handle = await client.submit("hang")
        waiter = asyncio.ensure_future(client.result(handle, timeout=5))
        await asyncio.sleep(0)  # the waiter starts waiting
        dispatcher = client._dispatcher
        await client.close()
        with pytest.raises(ClientClosed):
            await waiter
        assert dispatcher is not None and dispatcher.done()
        with pytest.raises(ClientClosed):
            await client.submit("too late")

    asyncio.run(main())


def test_an_id_already_in_flight_is_refused(settings: Settings, responder: Responder) -> None:
    async def body(client: AsyncClient) -> None:
        await client.submit("hang", request_id="same")
        with pytest.raises(InvalidRequest):
            await client.submit("hang", request_id="same")

    run_with(settings, body)


def test_a_refused_xadd_fails_that_submit_only(settings: Settings, r: redis.Redis, keys: Keys) -> None:
    r.set(keys.cancel, "not a stream")

    async def body(client: AsyncClient) -> bool:
        handle = await client.submit("hang")
        with pytest.raises(redis.ResponseError, match="WRONGTYPE"):
            await client.cancel(handle)
        return handle.id in client._pending

    assert run_with(settings, body) is True


def test_an_async_tenants_client_sends_on_its_tenants_own_streams(
    settings: Settings, r: redis.Redis, keys: Keys
) -> None:
    async def body(client: AsyncClient) -> Handle:
        handle = await client.submit("hi", max_tokens=2)
        await client.cancel(handle)
        return handle

    handle = run_with(settings.model_copy(update={"tenant": "alice"}), body)
    [(_entry_id, fields)] = r.xrange(keys.tenant_requests("alice"))
    assert fields[b"reply_to"].decode().startswith(keys.tenant_space("alice"))
    assert [f[b"id"] for _e, f in r.xrange(keys.tenant_cancel("alice"))] == [handle.id.encode()]
    assert r.xlen(keys.requests) == 0 and r.xlen(keys.cancel) == 0
