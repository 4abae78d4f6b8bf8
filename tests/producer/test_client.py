"""The blocking client against a real Redis and the in-test responder (tests/producer/conftest.py)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import pytest
import redis

from broker.errors import InvalidRequest, RequestFailed
from broker.keys import Keys
from broker.settings import Settings
from broker.validation import parse_request
from producer.client import Client, Completion, Event, Handle
from producer.request import request_fields
from tests.producer.conftest import Responder


@pytest.fixture
def client(settings: Settings) -> Iterator[Client]:
    with Client(settings=settings) as c:
        yield c


def test_submit_sends_only_the_fields_that_are_set(client: Client, r: redis.Redis, keys: Keys) -> None:
    handle = client.submit("hi there", max_tokens=5)

    [(_entry_id, fields)] = r.xrange(keys.requests)
    assert fields.pop(b"cancel_token").decode() == handle.cancel_token  # a fresh secret per request
    assert fields == {b"id": handle.id.encode(), b"prompt": b"hi there", b"max_tokens": b"5"}
    assert handle == Handle(handle.id, keys.result(handle.id))
    assert len(handle.id) == 32


def test_every_option_survives_the_servers_parser(keys: Keys) -> None:
    fields = request_fields(
        None,
        request_id="req-1",
        prompt_ids=[5, 6],
        max_tokens=7,
        temperature=0.25,
        top_p=0.5,
        top_k=3,
        seed=-9,
        stop=["\n", "END"],
        stop_token_ids=[2, 0],
        model="org/chat-v2",
        stream=True,
        priority=-2,
        timeout_s=1.5,
        reply_to="elsewhere",
        presence_penalty=0.5,
        frequency_penalty=-0.5,
        repetition_penalty=1.25,
        min_p=0.05,
        min_tokens=2,
        ignore_eos=True,
        logit_bias={3: -100, "4": 1.5},
        bad_words=["no", "not this"],
        logprobs=True,
        top_logprobs=4,
        fit_max_tokens=True,
        prompt_logprobs=2,
        n=3,
        best_of=3,
        guided_choice=["yes", "no"],
    )

    request = parse_request(fields, entry_id="1-0", prefix=keys.prefix, max_request_bytes=1 << 20)

    assert request.id == "req-1" and request.prompt_ids == (5, 6) and request.prompt is None
    assert request.sampling.model_dump() == {
        "max_tokens": 7,
        "temperature": 0.25,
        "top_p": 0.5,
        "top_k": 3,
        "seed": -9,
        "stop": ("\n", "END"),
        "stop_token_ids": (2, 0),
        "presence_penalty": 0.5,
        "frequency_penalty": -0.5,
        "repetition_penalty": 1.25,
        "min_p": 0.05,
        "min_tokens": 2,
        "ignore_eos": True,
        "logit_bias": ((3, -100.0), (4, 1.5)),
        "bad_words": ("no", "not this"),
        "fit_max_tokens": True,
        "logprobs": True,
        "top_logprobs": 4,
        "prompt_logprobs": 2,
        "n": 3,
        "best_of": 3,
        "structured": {"kind": "choice", "spec": '["yes", "no"]', "field": "guided_choice"},
    }
    assert request.model == "org/chat-v2"
    assert (request.stream, request.priority, request.timeout_s, request.reply_to) == (
        True,
        -2,
        1.5,
        "elsewhere",
    )
    assert all(isinstance(v, str) for v in fields.values())
    assert request_fields("x", request_id="a", stop="one")["stop"] == '["one"]'


@pytest.mark.parametrize(
    ("prompt", "options"),
    [
        (None, {}),
        ("x", {"prompt_ids": [1]}),
        ("x", {"request_id": "has space"}),
        ("x", {"request_id": "a" * 129}),
    ],
)
def test_caller_mistakes_are_refused_before_sending(
    client: Client, r: redis.Redis, keys: Keys, prompt: str | None, options: dict
) -> None:
    with pytest.raises(InvalidRequest):
        client.submit(prompt, **options)
    assert r.xlen(keys.requests) == 0


def test_generate_reads_the_default_result_stream(
    client: Client, responder: Responder, r: redis.Redis, keys: Keys
) -> None:
    completion = client.generate("the quick brown fox", request_id="fox-1", timeout=5)

    assert completion == Completion(
        id="fox-1",
        text="the quick brown fox",
        token_ids=[1000, 1001, 1002, 1003],
        finish_reason="stop",
        prompt_tokens=4,
        completion_tokens=4,
    )
    assert r.xlen(keys.result("fox-1")) == 1
    assert responder.requests[0].reply_to == keys.result("fox-1")


def test_result_by_id_after_the_fact(client: Client, responder: Responder) -> None:
    handle = client.submit("a b c", max_tokens=2)
    first = client.result(handle.id, timeout=5)
    again = client.result(handle.id, timeout=5)  # the reply stream is still there

    assert first == again
    assert (first.text, first.finish_reason) == ("a b", "length")


def test_requests_sharing_an_explicit_reply_stream_get_their_own_results(
    client: Client, responder: Responder, r: redis.Redis
) -> None:
    one = client.submit("one", reply_to="my:replies")
    two = client.submit("two two", reply_to="my:replies")

    assert two == Handle(two.id, "my:replies")
    assert client.result(two, timeout=5).text == "two two"
    assert client.result(one.id, timeout=5).text == "one"  # by id: the client remembers its reply_to
    assert r.xlen("my:replies") == 2


def test_error_event_raises_request_failed_with_its_code(client: Client, responder: Responder) -> None:
    with pytest.raises(RequestFailed) as failed:
        client.generate("fail:overloaded", request_id="busy-1", timeout=5)

    assert (failed.value.request_id, failed.value.code) == ("busy-1", "overloaded")


def test_request_the_server_refuses_comes_back_as_invalid_request(
    client: Client, responder: Responder
) -> None:
    with pytest.raises(RequestFailed) as failed:
        client.generate("x", top_p=2.0, timeout=5)

    assert failed.value.code == "invalid_request"
    assert "top_p" in failed.value.message


def test_result_times_out(client: Client, responder: Responder) -> None:
    handle = client.submit("hang")
    started = time.monotonic()

    with pytest.raises(TimeoutError, match=handle.id):
        client.result(handle, timeout=0.2)

    assert 0.2 <= time.monotonic() - started < 2.0


def test_stream_yields_deltas_that_join_to_the_final_text(client: Client, responder: Responder) -> None:
    deltas = list(client.stream("streaming is fun", timeout=5))

    assert deltas == ["streaming", " is", " fun"]
    assert responder.requests[0].stream is True


def test_events_come_in_order_and_end_with_the_one_final(client: Client, responder: Responder) -> None:
    handle = client.submit("a b c", stream=True)

    events = list(client.events(handle, timeout=5))

    assert [(e.kind, e.fields.get("index")) for e in events] == [
        ("token", "0"),
        ("token", "1"),
        ("token", "2"),
        ("done", None),
    ]
    assert [e.final for e in events] == [False, False, False, True]
    assert "".join(e.text for e in events[:-1]) == events[-1].text == "a b c"


def test_stream_raises_on_an_error_event(client: Client, responder: Responder) -> None:
    with pytest.raises(RequestFailed) as failed:
        list(client.stream("fail:internal", timeout=5))
    assert failed.value.code == "internal"


def test_cancel_writes_the_id_to_the_cancel_stream(
    client: Client, responder: Responder, r: redis.Redis, keys: Keys
) -> None:
    handle = client.submit("hang")
    client.cancel(handle)
    client.cancel(handle.id)  # by id alone: the client remembers the token of what it sent

    token = handle.cancel_token
    assert token and [fields for _, fields in r.xrange(keys.cancel)] == [
        {b"id": handle.id.encode(), b"token": token.encode()}] * 2
    assert client.result(handle, timeout=5).finish_reason == "cancelled"


def test_a_redis_blip_while_waiting_loses_nothing(
    client: Client, responder: Responder, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_xread = client._redis.xread
    failures = iter([redis.ConnectionError("blip"), redis.TimeoutError("blip")])

    def flaky_xread(*args: object, **kwargs: object) -> object:
        for exc in failures:
            raise exc
        return real_xread(*args, **kwargs)

    monkeypatch.setattr(client._redis, "xread", flaky_xread)

    assert list(client.stream("still all here", timeout=5)) == ["still", " all", " here"]


def test_a_malformed_done_event_is_a_request_failure() -> None:
    event = Event(id="x", kind="done", fields={"id": "x", "event": "done", "text": "t", "token_ids": "[1,"})

    with pytest.raises(RequestFailed) as failed:
        Completion.from_event(event)
    assert failed.value.code == "internal"


def test_entries_that_are_not_events_are_skipped() -> None:
    assert Event.from_entry(b"1-0", {b"foo": b"bar"}) is None
    event = Event.from_entry(b"1-1", {b"id": b"a", b"event": b"token", b"text": b"\xff"})
    assert event is not None and (event.entry_id, event.text, event.final) == ("1-1", "\ufffd", False)


def test_url_and_prefix_arguments_override_settings(redis_url: str) -> None:
    with Client(redis_url, prefix="other", settings=Settings(redis_url="redis://nowhere:1", prefix="x")) as c:
        assert (c.url, c.keys) == (redis_url, Keys("other"))
        assert c._redis.ping()


def test_structured_output_options_become_the_protocol_fields() -> None:
    from broker.validation import parse_request

    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 8}}}
    for options, expected in (
        ({"guided_json": schema}, ("json", "guided_json")),
        ({"guided_json": '{"type": "integer"}'}, ("json", "guided_json")),
        ({"guided_regex": "[a-z]+"}, ("regex", "guided_regex")),
        ({"guided_choice": ("yes", "no")}, ("choice", "guided_choice")),
        ({"guided_grammar": 'root ::= "a"'}, ("grammar", "guided_grammar")),
        ({"response_format": {"type": "json_object"}}, ("json_object", "response_format")),
        ({"structured_outputs": {"choice": ["a"]}}, ("choice", "structured_outputs")),
    ):
        fields = request_fields("x", request_id="a", **options)  # type: ignore[arg-type]
        structured = parse_request(fields, entry_id="1-0", prefix="ryz", max_request_bytes=1 << 20).sampling.structured
        assert structured is not None and (structured.kind, structured.field) == expected, options
    assert request_fields("x", request_id="a", guided_json=schema)["guided_json"] == json.dumps(schema)


def test_a_tenants_client_sends_on_its_tenants_own_streams(settings: Settings, r: redis.Redis, keys: Keys) -> None:
    """RYZ_TENANT / Settings(tenant=...): requests and cancels go to the tenant's own streams
    (broker.sources), never the shared ones; replies come back in the tenant's space."""
    with Client(settings=settings.model_copy(update={"tenant": "alice"})) as tenant_client:
        handle = tenant_client.submit("hi", max_tokens=2)
        tenant_client.cancel(handle)
    [(entry_id, fields)] = r.xrange(keys.tenant_requests("alice"))
    assert handle.entry_id == entry_id.decode() and handle.reply_to == keys.reply_stream(handle.id, tenant="alice")
    assert fields[b"reply_to"] == handle.reply_to.encode()
    assert [f[b"id"] for _e, f in r.xrange(keys.tenant_cancel("alice"))] == [handle.id.encode()]
    assert r.xlen(keys.requests) == 0 and r.xlen(keys.cancel) == 0
