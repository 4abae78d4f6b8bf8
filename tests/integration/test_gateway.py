"""The OpenAI-compatible gateway as users meet it: the official ``openai`` package against live
``ryzanstein gateway`` processes, in front of a real balancer and echo worker group on a real Redis.

One stack serves the whole module (starting processes is the slow part): a balancer, one echo group,
and three gateways — the default one, one limited to one request in flight and with a ChatML
template, and one on a prefix where no group runs.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest
import redis

from broker.embedded import EmbeddedRedis
from broker.keys import Keys
from tests.integration.conftest import Procs, wait_for, wait_groups

pytestmark = pytest.mark.integration

CHATML = (
    "{{ bos_token }}{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
LONG = 200_000  # an echo request this long runs for many seconds: long enough to be cut off


@dataclass
class Stack:
    r: redis.Redis
    keys: Keys
    url: str  # the default gateway's /v1
    limited_url: str  # --max-concurrency 1, ChatML template
    empty_url: str  # a prefix without worker groups
    procs: Procs


def _spawn_gateway(procs: Procs, *args: str, env: dict[str, str] | None = None) -> Path:
    log = procs.log_dir / f"{len(procs.started):02d}-producer.log"  # the name Procs.spawn gives it
    procs.spawn("producer", "gateway", "--port", "0", *args, env=env)
    return log


def _served_url(log: Path) -> str | None:
    for line in log.read_text(errors="replace").splitlines() if log.exists() else []:
        if line.startswith("ryzanstein gateway: serving "):
            return line.split()[3]
    return None


@pytest.fixture(scope="module")
def stack(redis_server: EmbeddedRedis, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    # Module-scoped, so not on the per-test `redis_url` fixture (it flushes the server): own prefixes.
    prefix = f"gw{uuid.uuid4().hex[:8]}"
    keys = Keys(prefix)
    tmp = tmp_path_factory.mktemp("gateway")
    (tmp / "logs").mkdir()
    (tmp / "model").mkdir()
    (tmp / "model" / "tokenizer_config.json").write_text(
        json.dumps({"chat_template": CHATML, "bos_token": "<s>", "eos_token": "</s>"}))
    env = {**os.environ, "RYZ_REDIS_URL": redis_server.url, "RYZ_PREFIX": prefix, "PYTHONUNBUFFERED": "1"}
    procs = Procs(env, tmp / "logs")
    r = redis.Redis.from_url(redis_server.url)
    try:
        procs.balancer()
        procs.worker("gw-g1")
        logs = [
            _spawn_gateway(procs),
            _spawn_gateway(procs, "--max-concurrency", "1", "--model-dir", str(tmp / "model")),
            _spawn_gateway(procs, env={"RYZ_PREFIX": f"{prefix}-empty"}),
        ]
        wait_groups(r, keys, {"gw-g1"})
        urls = [wait_for(lambda log=log: _served_url(log), timeout=30, what=f"gateway in {log.name}") for log in logs]
        yield Stack(r, keys, *urls, procs=procs)
    finally:
        procs.stop_all()
        r.close()
        print(procs.logs())  # shown for a failing test


def _client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=30)


def _root(url: str) -> str:
    return url.removesuffix("/v1")


# --- completions and chat -----------------------------------------------------------------------


def test_models_and_health(stack: Stack) -> None:
    client = _client(stack.url)
    assert [m.id for m in client.models.list().data] == ["echo"]
    assert client.models.retrieve("echo").owned_by == "ryzanstein"
    health = httpx.get(f"{_root(stack.url)}/health", timeout=10)
    assert health.status_code == 200
    assert health.json()["status"] == "ok" and health.json()["models"] == ["echo"]


def test_completion_with_usage(stack: Stack) -> None:
    client = _client(stack.url)
    prompt = "Hello, gateway"
    done = client.completions.create(model="echo", prompt=prompt, max_tokens=64, temperature=0, seed=3, top_p=0.9)
    assert done.object == "text_completion"
    assert done.choices[0].text == prompt  # echo answers with the prompt
    assert done.choices[0].finish_reason == "stop"
    assert done.usage is not None
    assert (done.usage.prompt_tokens, done.usage.completion_tokens) == (len(prompt), len(prompt))
    assert done.usage.total_tokens == 2 * len(prompt)

    cut = client.completions.create(model="echo", prompt=prompt, max_tokens=5)
    assert (cut.choices[0].text, cut.choices[0].finish_reason) == ("Hello", "length")
    assert cut.usage is not None and cut.usage.completion_tokens == 5

    ids = client.completions.create(model="echo", prompt=[104, 105], max_tokens=8)  # token ids
    assert ids.choices[0].text == "hi"


def test_stop_strings(stack: Stack) -> None:
    client = _client(stack.url)
    one = client.completions.create(model="echo", prompt="Hello world. Bye", max_tokens=64, stop=".")
    assert (one.choices[0].text, one.choices[0].finish_reason) == ("Hello world", "stop")
    many = client.completions.create(model="echo", prompt="one two three", max_tokens=64, stop=["three", "zzz"])
    assert many.choices[0].text == "one two "
    chunks = list(client.completions.create(model="echo", prompt="Hello world. Bye", max_tokens=64, stop=".",
                                            stream=True))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == "Hello world"


def test_chat_uses_the_fallback_template(stack: Stack) -> None:
    client = _client(stack.url)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
    done = client.chat.completions.create(model="echo", messages=messages, max_tokens=100)  # type: ignore[arg-type]
    expected = "system: Be brief.\nuser: Hi there\nassistant:"  # echo answers with the rendered prompt
    assert done.object == "chat.completion"
    assert done.choices[0].message.role == "assistant"
    assert done.choices[0].message.content == expected
    assert done.usage is not None and done.usage.prompt_tokens == len(expected)

    short = client.chat.completions.create(model="echo", messages=messages,  # type: ignore[arg-type]
                                           max_completion_tokens=6)
    assert (short.choices[0].message.content, short.choices[0].finish_reason) == ("system", "length")


def test_chat_uses_the_model_directory_template(stack: Stack) -> None:
    client = _client(stack.limited_url)
    messages = [{"role": "user", "content": "Hi"}]
    done = client.chat.completions.create(model="echo", messages=messages, max_tokens=200)  # type: ignore[arg-type]
    assert done.choices[0].message.content == "<s><|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"


@pytest.mark.parametrize("kind", ["completion", "chat"])
def test_streaming_deltas_join_to_the_full_text(stack: Stack, kind: str) -> None:
    client = _client(stack.url)
    if kind == "completion":
        args = {"prompt": "streamed token by token", "max_tokens": 64}
        full = client.completions.create(model="echo", **args)  # type: ignore[call-overload]
        chunks = list(client.completions.create(model="echo", stream=True, stream_options={"include_usage": True},
                                                **args))
        deltas = [c.choices[0].text for c in chunks if c.choices]
        full_text = full.choices[0].text
    else:
        args = {"messages": [{"role": "user", "content": "stream me"}], "max_tokens": 64}
        full = client.chat.completions.create(model="echo", **args)  # type: ignore[call-overload]
        chunks = list(client.chat.completions.create(model="echo", stream=True,
                                                     stream_options={"include_usage": True}, **args))
        assert chunks[0].choices[0].delta.role == "assistant"
        deltas = [c.choices[0].delta.content or "" for c in chunks if c.choices]
        full_text = full.choices[0].message.content or ""
    assert len([d for d in deltas if d]) == len(full_text)  # echo: one character per token, each its chunk
    assert "".join(deltas) == full_text
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["stop"]
    usages = [c.usage for c in chunks if c.usage is not None]
    assert usages == [full.usage]
    assert chunks[-1].choices == [] and chunks[-1].usage == full.usage  # the usage chunk comes last
    assert len({c.id for c in chunks}) == 1


def test_stream_ends_with_done_marker(stack: Stack) -> None:
    body = {"model": "echo", "prompt": "raw", "max_tokens": 8, "stream": True}
    with httpx.stream("POST", f"{stack.url}/completions", json=body, timeout=30) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line for line in response.iter_lines() if line]
    assert events[-1] == "data: [DONE]"
    assert all(e.startswith("data: ") for e in events)


# --- errors -------------------------------------------------------------------------------------


def test_bad_parameters_are_400_in_openai_shape(stack: Stack) -> None:
    client = _client(stack.url)
    cases = [
        ({"prompt": "x", "temperature": -1}, "temperature"),
        ({"prompt": "x", "top_p": 0}, "top_p"),
        ({"prompt": "x", "max_tokens": 0}, "max_tokens"),
        ({"prompt": "x", "n": 0}, "n"),
        ({"prompt": "x", "n": 2, "best_of": 3, "stream": True}, "best_of"),
        ({"prompt": "x", "logprobs": 30}, "logprobs"),
        ({"prompt": ["a", "b"]}, "prompt"),
        ({"prompt": "x", "stop": [""]}, "stop"),
        ({"prompt": "x", "presence_penalty": 2.5}, "presence_penalty"),
        ({"prompt": "x", "logit_bias": {"1": 101}}, "logit_bias"),
        ({"prompt": "x", "extra_body": {"repetition_penalty": 0}}, "repetition_penalty"),
        ({"prompt": "x", "extra_body": {"min_p": 1.5}}, "min_p"),
        ({"prompt": "x", "max_tokens": 4, "extra_body": {"min_tokens": 5}}, "min_tokens"),
        ({"prompt": "x", "extra_body": {"bad_words": [" "]}}, "bad_words"),
        ({"prompt": "x", "extra_body": {"guided_choice": []}}, "guided_choice"),
        ({"prompt": "x", "extra_body": {"response_format": {"type": "xml"}}}, "response_format"),
        ({"prompt": "x", "extra_body": {"guided_whitespace_pattern": " "}}, "guided_whitespace_pattern"),
        ({"prompt": "x", "extra_body": {"ignore_eos": True, "use_beam_search": True}}, "use_beam_search"),
    ]
    for args, param in cases:
        with pytest.raises(openai.BadRequestError) as caught:
            client.completions.create(model="echo", **args)  # type: ignore[call-overload]
        assert caught.value.status_code == 400
        assert caught.value.code == "invalid_request", args
        assert caught.value.param == param, args
        assert caught.value.type == "invalid_request_error"
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="echo", messages=[{"role": "wizard", "content": "x"}])  # type: ignore[list-item]
    assert caught.value.param == "messages"
    raw = httpx.post(f"{stack.url}/completions", content=b"{not json", timeout=10)
    assert raw.status_code == 400
    assert set(raw.json()["error"]) == {"message", "type", "param", "code"}


def test_unknown_model_is_404(stack: Stack) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        _client(stack.url).completions.create(model="gpt-4o", prompt="x")
    assert caught.value.code == "model_not_found" and caught.value.param == "model"


@pytest.mark.parametrize("stream", [False, True])
def test_error_from_the_worker_group_is_400_before_any_stream(stack: Stack, stream: bool) -> None:
    # Token 300 is outside the echo vocabulary: only the worker group knows that.
    with pytest.raises(openai.BadRequestError) as caught:
        _client(stack.url).completions.create(model="echo", prompt=[104, 300], stream=stream)
    assert "outside the vocabulary" in caught.value.message


def test_deadline_past_is_504(stack: Stack) -> None:
    with pytest.raises(openai.APIStatusError) as caught:
        _client(stack.url).completions.create(model="echo", prompt="a" * LONG, max_tokens=LONG,
                                              extra_body={"timeout_s": 0.3})
    assert caught.value.status_code == 504
    assert caught.value.code == "timeout"


def test_deadline_past_mid_stream_ends_the_stream_with_an_error(stack: Stack) -> None:
    received = []
    with pytest.raises(openai.APIError) as caught:  # raised while iterating the stream
        stream = _client(stack.url).completions.create(model="echo", prompt="a" * LONG, max_tokens=LONG,
                                                       stream=True, extra_body={"timeout_s": 1.0})
        for chunk in stream:
            received.append(chunk.choices[0].text)
    assert received and set("".join(received)) == {"a"}  # tokens came, then the error
    assert caught.value.code == "timeout"


def test_no_live_group_is_503(stack: Stack) -> None:
    client = _client(stack.empty_url)
    with pytest.raises(openai.InternalServerError) as caught:
        client.completions.create(model="echo", prompt="x")
    assert caught.value.status_code == 503 and caught.value.code == "unavailable"
    assert client.models.list().data == []
    health = httpx.get(f"{_root(stack.empty_url)}/health", timeout=10)
    assert health.status_code == 503
    assert health.json()["status"] == "unavailable"
    assert health.json()["reason"] == "no balancer is running; no live worker group"


def test_over_max_concurrency_is_429(stack: Stack) -> None:
    body = {"model": "echo", "prompt": "a" * LONG, "max_tokens": LONG, "stream": True}
    with httpx.stream("POST", f"{stack.limited_url}/completions", json=body, timeout=30) as held:
        assert held.status_code == 200
        held_id = held.headers["x-request-id"]
        lines = held.iter_lines()  # kept: a discarded line iterator closes the connection
        next(lines)  # the one slot is taken while this stream is open
        with pytest.raises(openai.RateLimitError) as caught:
            _client(stack.limited_url).completions.create(model="echo", prompt="x")
        assert caught.value.status_code == 429 and caught.value.code == "overloaded"
    # Closing the stream cancels its request and frees the slot.
    health_url = f"{_root(stack.limited_url)}/health"
    wait_for(lambda: httpx.get(health_url, timeout=10).json()["in_flight"] == 0, what="the slot to be freed")
    wait_for(lambda: held_id in _cancelled_ids(stack, "0-0"), what="the held request's cancel")
    assert _client(stack.limited_url).completions.create(model="echo", prompt="ok").choices[0].text == "ok"


# --- a client that goes away --------------------------------------------------------------------


def _cancelled_ids(stack: Stack, after: str) -> list[str]:
    return [f[b"id"].decode() for _i, f in stack.r.xrange(stack.keys.cancel, min=f"({after}")]


def _last_cancel(stack: Stack) -> str:
    last = stack.r.xrevrange(stack.keys.cancel, count=1)
    return last[0][0].decode() if last else "0-0"


def _final_event(stack: Stack, request_id: str) -> dict[bytes, bytes] | None:
    """The request's final event, on the gateway client's shared reply stream."""
    for key in stack.r.scan_iter(match=stack.keys.client_replies("*")):
        for _i, fields in stack.r.xrange(key):
            if fields.get(b"id") == request_id.encode() and fields[b"event"] in (b"done", b"error"):
                return fields
    return None


def test_client_leaving_mid_stream_cancels_the_request(stack: Stack) -> None:
    body = {"model": "echo", "prompt": "a" * LONG, "max_tokens": LONG, "stream": True}
    with httpx.stream("POST", f"{stack.url}/completions", json=body, timeout=30) as response:
        request_id = response.headers["x-request-id"]
        lines = response.iter_lines()
        received = [next(lines) for _ in range(6)]
    assert any(line.startswith("data: {") for line in received)
    wait_for(lambda: request_id in _cancelled_ids(stack, "0-0"), what="the cancel entry")
    done = wait_for(lambda: _final_event(stack, request_id), what="the cancelled request's done event")
    assert done[b"event"] == b"done" and done[b"finish_reason"] == b"cancelled"
    assert 0 < int(done[b"completion_tokens"]) < LONG


def test_client_leaving_before_the_response_cancels_the_request(stack: Stack) -> None:
    since = _last_cancel(stack)
    body = {"model": "echo", "prompt": "a" * LONG, "max_tokens": LONG}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{stack.url}/completions", json=body, timeout=httpx.Timeout(30, read=1.0))
    cancelled = wait_for(lambda: _cancelled_ids(stack, since), what="the cancel entry")
    assert len(cancelled) == 1 and cancelled[0].startswith("cmpl-")
    done = wait_for(lambda: _final_event(stack, cancelled[0]), what="the cancelled request's done event")
    assert done[b"finish_reason"] == b"cancelled"
