"""The Python clients clean up after their callers: an abandoned request is cancelled on the
server; errors are typed by code; overloaded/unavailable requests are retried with backoff; a
Completion says who served it and when. Against the protocol stub (tests/producer/conftest.py),
whose ``hang`` requests run until cancelled."""

from __future__ import annotations

import asyncio
import time

import pytest

from broker.errors import (
    DuplicateId,
    InvalidRequest,
    ModelNotFound,
    Overloaded,
    RequestFailed,
    RequestTimeout,
    RyzansteinError,
    Unavailable,
    WaitTimeout,
)
from broker.keys import Keys
from producer.async_client import AsyncClient
from producer.client import Client, retry_delay
from producer.request import Completion, Event
from tests.producer.conftest import Responder


def wait_until(condition, timeout: float = 5.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)


async def until(condition, timeout: float = 5.0) -> None:  # type: ignore[no-untyped-def]
    """wait_until for a coroutine: the event loop runs meanwhile (the client's writer sends then)."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


@pytest.mark.parametrize("code,kind", [
    ("invalid_request", InvalidRequest), ("overloaded", Overloaded), ("timeout", RequestTimeout),
    ("unavailable", Unavailable), ("model_not_found", ModelNotFound), ("duplicate_id", DuplicateId),
    ("something_new", RequestFailed),
])
def test_error_events_raise_the_kind_of_their_code(code: str, kind: type[Exception]) -> None:
    event = Event("r1", "error", {"id": "r1", "event": "error", "code": code, "message": "m"})
    with pytest.raises(kind) as caught:
        event.raise_for_error()
    error = caught.value
    assert isinstance(error, RequestFailed) and isinstance(error, RyzansteinError)  # old callers still catch it
    assert (error.code, error.request_id, error.message) == (code, "r1", "m")


def test_a_wait_past_its_timeout_cancels_the_request(redis_url: str, keys: Keys, responder: Responder) -> None:
    with Client(redis_url, prefix=keys.prefix) as client:
        handle = client.submit("hang")
        wait_until(lambda: handle.id in responder.hanging)
        with pytest.raises(WaitTimeout) as caught:
            client.result(handle, timeout=0.2)
        assert isinstance(caught.value, TimeoutError) and caught.value.code == "timeout"
        wait_until(lambda: handle.id not in responder.hanging)  # the stub got the cancel
        assert client.result(handle, timeout=5).finish_reason == "cancelled"
        # told not to, the client leaves it running, and can wait on
        kept = client.submit("hang")
        with pytest.raises(WaitTimeout):
            client.result(kept, timeout=0.1, cancel_abandoned=False)
        time.sleep(0.2)
        assert kept.id in responder.hanging
        client.cancel(kept)
        assert client.result(kept, timeout=5).finish_reason == "cancelled"


def test_a_stream_given_up_is_cancelled(redis_url: str, keys: Keys, responder: Responder) -> None:
    with Client(redis_url, prefix=keys.prefix) as client:
        deltas = client.stream("hang", timeout=0.2)
        with pytest.raises(WaitTimeout):
            next(deltas)
        wait_until(lambda: not responder.hanging and len(responder.requests) == 1)
        # closed before its end
        deltas = client.stream("hang", timeout=5)
        wait_until(lambda: len(responder.hanging) == 1)
        deltas.close()
        wait_until(lambda: not responder.hanging)
        # left with break after a delta: the stub has answered already, so the cancel finds it done
        for delta in client.stream("two words"):
            assert delta == "two"
            break
        assert len(responder.requests) == 3


def test_async_cancellation_and_timeouts_cancel_the_request(redis_url: str, keys: Keys,
                                                            responder: Responder) -> None:
    async def main() -> None:
        async with AsyncClient(redis_url, prefix=keys.prefix) as client:
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(client.generate("hang"), 0.3)  # cancels the waiting task
            await until(lambda: not responder.hanging)
            with pytest.raises(WaitTimeout):
                await client.generate("hang", timeout=0.2)
            await until(lambda: not responder.hanging)

            async def first_delta() -> str:
                async for delta in client.stream("hang"):
                    return delta
                return ""

            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(first_delta(), 0.3)
            await until(lambda: not responder.hanging)
            # the cancelled requests' final events are dropped when they come, not kept for no one
            await until(lambda: not client._pending)
            assert (await client.generate("still works")).text == "still works"

    asyncio.run(main())
    assert len(responder.requests) == 4


def test_retries_with_backoff_for_overloaded_and_unavailable(redis_url: str, keys: Keys,
                                                             responder: Responder) -> None:
    with Client(redis_url, prefix=keys.prefix, max_retries=2, retry_backoff_s=0.01) as client:
        with pytest.raises(Overloaded):
            client.generate("fail:overloaded", request_id="job7")
        assert [r.id for r in responder.requests] == ["job7", "job7.retry1", "job7.retry2"]
        with pytest.raises(InvalidRequest):
            client.generate("fail:invalid_request")  # not worth retrying
        assert len(responder.requests) == 4

    async def main() -> None:
        async with AsyncClient(redis_url, prefix=keys.prefix, max_retries=1, retry_backoff_s=0.01) as client:
            with pytest.raises(Unavailable):
                await client.generate("fail:unavailable")

    asyncio.run(main())
    assert len(responder.requests) == 6
    with Client(redis_url, prefix=keys.prefix) as client, pytest.raises(Overloaded):  # the default: no retry
        client.generate("fail:overloaded")
    assert len(responder.requests) == 7


def test_retry_delay_doubles_up_to_a_cap_with_jitter() -> None:
    delays = [retry_delay(n, 0.5) for n in range(8)]
    for n, delay in enumerate(delays):
        full = min(8.0, 0.5 * 2**n)
        assert 0.75 * full <= delay <= full


def test_completion_reads_who_served_it_and_when() -> None:
    fields = {"id": "r", "event": "done", "text": "x", "token_ids": "[1]", "finish_reason": "stop",
              "prompt_tokens": "2", "completion_tokens": "1", "model": "m", "group": "g1", "queue_s": "0.25",
              "ttft_s": "0.5", "total_s": "1.5"}
    done = Completion.from_event(Event("r", "done", fields))
    assert (done.model, done.group, done.queue_s, done.ttft_s, done.total_s) == ("m", "g1", 0.25, 0.5, 1.5)
    bare = Completion.from_event(Event("r", "done", {k: v for k, v in fields.items() if k not in
                                                    ("model", "group", "queue_s", "ttft_s", "total_s")}))
    assert bare.model is None and "model" not in bare.to_json()


@pytest.mark.parametrize("option,value", [("max_tokens", "many"), ("temperature", "hot"), ("min_tokens", None),
                                          ("logit_bias", {"1": "x"}), ("top_logprobs", 1.5j)])
def test_bad_option_types_are_invalid_requests_naming_the_option(option: str, value: object) -> None:
    from producer.request import request_fields

    if value is None:
        value = object()
    with pytest.raises(InvalidRequest) as caught:
        request_fields("p", request_id="r", **{option: value})  # type: ignore[arg-type]
    assert f"'{option}'" in str(caught.value)
