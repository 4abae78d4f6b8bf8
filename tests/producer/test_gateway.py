"""The gateway's request parsing, error mapping and registry view; and, in front of the protocol stub
(tests/producer/conftest.py), how every error code a request can end with reaches an OpenAI client.

The real pipeline behind a gateway process is tested in tests/integration/test_gateway.py. The stub
is needed here for codes the pipeline does not produce on demand (``overloaded`` needs every group's
queue at its bounds, ``internal`` an engine that fails).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from typing import Any

import openai
import pytest
import redis
import uvicorn

from broker.chat import template_digest
from broker.connection import connect_async
from broker.keys import Keys
from broker.registry import GroupLoad
from broker.settings import Settings
from producer.gateway.app import create_app
from producer.gateway.config import GatewayConfig
from producer.gateway.errors import ApiError
from producer.gateway.groups import LiveGroups
from producer.gateway.responses import Responder
from producer.gateway.schema import parse_chat, parse_completion
from producer.request import Completion
from tests.producer.conftest import Responder as StubPipeline
from tests.producer.conftest import register_group

# --- parsing ------------------------------------------------------------------------------------


def test_completion_request_maps_to_ryzanstein_options() -> None:
    gen = parse_completion({"model": "m", "prompt": "hi", "max_tokens": 7, "temperature": 0.5, "top_p": 0.9,
                            "seed": 3, "stop": "x", "stream": True, "stream_options": {"include_usage": True},
                            "user": "ignored", "top_k": 4, "priority": -1, "timeout_s": 2.5})
    assert (gen.kind, gen.model, gen.prompt, gen.prompt_ids, gen.stream, gen.include_usage) == (
        "completion", "m", "hi", None, True, True)
    assert gen.options == {"max_tokens": 7, "temperature": 0.5, "top_p": 0.9, "top_k": 4, "seed": 3, "stop": "x",
                           "priority": -1, "timeout_s": 2.5}
    assert parse_completion({"model": "m", "prompt": [1, 2]}).prompt_ids == [1, 2]
    assert parse_completion({"model": "m", "prompt": ["one"]}).prompt == "one"
    assert parse_completion({"model": "m", "prompt": [[5, 6]]}).prompt_ids == [5, 6]


def test_sampling_controls_map_to_the_protocol_fields() -> None:
    controls = {"presence_penalty": 0.5, "frequency_penalty": -1.0, "repetition_penalty": 1.3, "min_p": 0.1,
                "min_tokens": 2, "ignore_eos": True, "stop_token_ids": [5, 7], "logit_bias": {"7": -100.0},
                "bad_words": ["no"]}
    gen = parse_completion({"model": "m", "prompt": "hi", **controls})
    assert gen.options == {"max_tokens": None, "temperature": None, "top_p": None, "top_k": None, "seed": None,
                           "stop": None, "priority": None, "timeout_s": None, **controls}
    assert parse_chat({"model": "m", "messages": [{"role": "user", "content": "x"}], **controls},
                      default_max_tokens=9).options["logit_bias"] == {"7": -100.0}


@pytest.mark.parametrize(("body", "param"), [
    ({"n": 0}, "n"),
    ({"n": 3, "best_of": 2}, "best_of"),
    ({"echo": True, "stream": True, "logprobs": 1}, "echo"),
    ({"suffix": "s"}, "suffix"),
    ({"logprobs": 21}, "logprobs"),
    ({"logprobs": -1}, "logprobs"),
    ({"stream_options": {"include_usage": True}}, "stream_options"),
    ({"stream": True, "stream_options": {"include_usage": True, "continuous_usage_stats": True}},
     "stream_options.continuous_usage_stats"),
    ({"prompt": ["a", "b"]}, "prompt"),
    ({"prompt": {"text": "a"}}, "prompt"),
    ({"max_tokens": "many"}, "max_tokens"),
    ({"model": None}, "model"),
])
def test_completion_refusals_name_the_parameter(body: dict[str, Any], param: str) -> None:
    with pytest.raises(ApiError) as caught:
        parse_completion({"model": "m", "prompt": "x", **body})
    assert (caught.value.status, caught.value.code, caught.value.param) == (400, "invalid_request", param)


def test_chat_request() -> None:
    messages = [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]
    gen = parse_chat({"model": "m", "messages": messages, "max_tokens": 9, "max_completion_tokens": 5},
                     default_max_tokens=100)
    assert gen.messages == [{"role": "user", "content": "ab"}]
    assert gen.options["max_tokens"] == 5  # max_completion_tokens wins
    assert gen.prompt is None  # rendered later, with the served model's template
    defaulted = parse_chat({"model": "m", "messages": messages}, default_max_tokens=100).options
    assert (defaulted["max_tokens"], defaulted.get("fit_max_tokens")) == (100, True)  # a ceiling: fits the context
    assert "fit_max_tokens" not in gen.options  # max_tokens the client sent is kept as sent
    for body, param in [({"tools": [{"type": "function"}]}, "tools"), ({"tool_choice": "required"}, "tool_choice"),
                        ({"response_format": {"type": "xml"}},
                         "response_format"),
                        ({"top_logprobs": 2}, "top_logprobs"), ({"messages": []}, "messages")]:
        with pytest.raises(ApiError) as caught:
            parse_chat({"model": "m", "messages": messages, **body}, default_max_tokens=1)
        assert caught.value.param == param
    assert parse_chat({"model": "m", "messages": messages, "response_format": {"type": "text"}},
                      default_max_tokens=1).kind == "chat"


def test_api_error_shape_and_statuses() -> None:
    error = ApiError.from_code("invalid_request", "field 'temperature': Input should be >= 0")
    assert error.body() == {"error": {"message": "field 'temperature': Input should be >= 0",
                                      "type": "invalid_request_error", "param": "temperature",
                                      "code": "invalid_request"}}
    statuses = {code: ApiError.from_code(code, "m").status
                for code in ("invalid_request", "model_not_found", "overloaded", "timeout", "unavailable",
                             "internal", "something_new")}
    assert statuses == {"invalid_request": 400, "model_not_found": 404, "overloaded": 429, "timeout": 504,
                        "unavailable": 503, "internal": 500, "something_new": 500}
    assert ApiError.from_code("something_new", "m").code == "something_new"  # passed on as is


def test_response_shapes() -> None:
    done = Completion(id="r", text="hey", token_ids=[1, 2, 3], finish_reason="length", prompt_tokens=4,
                      completion_tokens=3)
    chat = Responder("chat", "chatcmpl-1", 100, "m")
    full = chat.full(done)
    assert full["object"] == "chat.completion"
    assert full["choices"] == [{"index": 0, "message": {"role": "assistant", "content": "hey"}, "logprobs": None,
                                "finish_reason": "length"}]
    assert full["usage"] == {"prompt_tokens": 4, "completion_tokens": 3, "total_tokens": 7}
    assert chat.chunk("", first=True)["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert chat.chunk(None, finish_reason="stop")["choices"][0]["delta"] == {}
    assert "usage" not in chat.chunk("x") and chat.chunk("x", with_usage_field=True)["usage"] is None
    assert chat.usage_chunk(done)["choices"] == []
    text = Responder("completion", "cmpl-1", 100, "m")
    assert text.full(done)["choices"][0]["text"] == "hey"
    assert text.chunk("y")["object"] == "text_completion"


# --- the registry view --------------------------------------------------------------------------


def _register_group(r: redis.Redis, keys: Keys, name: str, model: str, *, ahead_s: float = 0.0,
                    state: str = "ready") -> None:
    """A registry entry as a group's heartbeat writes it, stamped ``ahead_s`` past the Redis clock."""
    secs, micros = r.time()
    beat_ms = int(secs * 1000 + micros / 1000 + ahead_s * 1000)
    load = GroupLoad(name=name, tp=1, model=model, kv_dtype="fp8_e4m3", kv_capacity_tokens=0, kv_used_tokens=0,
                     running=0, waiting=0, queue_depth=0, leader_pid=1, host="stub", max_context=1 << 20,
                     vocab_size=256, state=state)
    r.hset(keys.group_info(name), mapping={**dict(zip(*[iter(load.to_fields())] * 2)), "heartbeat_ms": beat_ms})
    r.zadd(keys.groups, {name: beat_ms})


def test_live_groups_are_cached_for_max_age(redis_url: str, r: redis.Redis, keys: Keys) -> None:
    async def main() -> None:
        now = [0.0]
        client = connect_async(redis_url, Settings())
        groups = LiveGroups(client, keys, dead_after_s=3.0, max_age_s=0.5, clock=lambda: now[0])
        try:
            assert await groups.get() == []
            _register_group(r, keys, "a", "m1")
            _register_group(r, keys, "b", "m2", state="draining")  # not routable
            _register_group(r, keys, "c", "m3", ahead_s=-10)  # its heartbeat stopped 10 s ago
            now[0] = 0.4
            assert await groups.get() == []  # still the cached read
            now[0] = 0.5
            assert [g.name for g in await groups.get()] == ["a"]
            assert await groups.models() == ["m1"]
        finally:
            await client.aclose()

    asyncio.run(main())


# --- error codes, through a live gateway in front of the stub -----------------------------------


@pytest.fixture
def stub_gateway(responder: StubPipeline, r: redis.Redis, keys: Keys, settings: Settings,
                 redis_url: str) -> Iterator[str]:
    # The stub answers requests but runs no group; this registry entry, stamped an hour ahead, keeps
    # the gateway seeing one live group for the whole test without a heartbeat thread.
    _register_group(r, keys, "stub", "stub-model", ahead_s=3600)
    app = create_app(settings, redis_url, GatewayConfig())
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_config=None, lifespan="on"))
    thread = threading.Thread(target=server.run, name="gateway", daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:  # another thread's server: poll its flag
        assert thread.is_alive() and time.monotonic() < deadline, "the gateway did not start"
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    yield f"http://127.0.0.1:{port}/v1"
    server.should_exit = True
    thread.join(10)


def test_stub_gateway_answers(stub_gateway: str) -> None:
    client = openai.OpenAI(base_url=stub_gateway, api_key="unused", max_retries=0)
    done = client.completions.create(model="stub-model", prompt="two words", max_tokens=8)
    assert done.choices[0].text == "two words"


ERROR_CASES = [
    ("overloaded", 429, openai.RateLimitError),
    ("timeout", 504, openai.InternalServerError),
    ("unavailable", 503, openai.InternalServerError),
    ("internal", 500, openai.InternalServerError),
    ("invalid_request", 400, openai.BadRequestError),
]


def test_error_events_reach_openai_clients_as_http_statuses(stub_gateway: str) -> None:
    client = openai.OpenAI(base_url=stub_gateway, api_key="unused", max_retries=0)
    for code, status, error_class in ERROR_CASES:
        for stream in (False, True):  # a stream starts only after the first event: errors are plain HTTP
            with pytest.raises(error_class) as caught:
                client.completions.create(model="stub-model", prompt=f"fail:{code}", stream=stream)
            assert caught.value.status_code == status, (code, stream)
            assert caught.value.code == code
            assert caught.value.message.endswith("the responder was told to fail")


CHATML = ("{{ bos_token }}{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def test_chat_uses_the_published_template_or_fails_and_models_carry_max_model_len(
        stub_gateway: str, r: redis.Redis, keys: Keys) -> None:
    register_group(r, keys, "chat-group", served=("chat", "chat-alias"), template=CHATML, bos_token="<s>")
    r.hset(keys.group_info("chat-group"), "heartbeat_ms", int(r.hget(keys.group_info("chat-group"),
                                                                      "heartbeat_ms")) + 3_600_000)
    client = openai.OpenAI(base_url=stub_gateway, api_key="unused", max_retries=0)
    # registered before the gateway's first registry read (at its first request)
    models = {m.id: m.model_extra["max_model_len"] for m in client.models.list().data}  # type: ignore[index]
    assert models == {"chat": 4096, "chat-alias": 4096, "stub-model": 1 << 20}
    messages = [{"role": "user", "content": "Hi"}]
    for name in ("chat", "chat-alias"):
        done = client.chat.completions.create(model=name, messages=messages, max_tokens=100)  # type: ignore[arg-type]
        # the stub echoes the rendered prompt (without its trailing newline)
        assert done.choices[0].message.content == "<s><|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant"
    with pytest.raises(openai.BadRequestError, match="'stub-model' has no chat template") as caught:
        client.chat.completions.create(model="stub-model", messages=messages)  # type: ignore[arg-type]
    assert caught.value.code == "invalid_request"
    r.delete(keys.chat_template(template_digest(CHATML)))  # read once per digest: it keeps serving it
    done = client.chat.completions.create(model="chat", messages=messages, max_tokens=100)  # type: ignore[arg-type]
    assert done.choices[0].message.content.startswith("<s><|im_start|>")


# --- never silent: known parameters this server does not honour ----------------------------------

REFUSED_SAMPLES: dict[str, Any] = {  # a value of each that would change the output
    "use_beam_search": True, "length_penalty": 0.5,
    "allowed_token_ids": [1, 2], "logits_processors": ["x"], "guided_whitespace_pattern": " ",
    "include_stop_str_in_output": True, "skip_special_tokens": False, "spaces_between_special_tokens": False,
    "truncate_prompt_tokens": 8, "audio": {"voice": "alloy"}, "prediction": {"type": "content"},
    "web_search_options": {}, "modalities": ["text", "audio"], "echo": True, "add_generation_prompt": False,
    "continue_final_message": True, "chat_template": "{{ messages }}", "chat_template_kwargs": {"x": 1},
    "documents": [{"text": "d"}], "mm_processor_kwargs": {"a": 1}, "return_tokens_as_token_ids": True,
    "add_special_tokens": True,  # (chat; completions: false)
}


def test_every_refused_parameter_is_a_400_naming_it() -> None:
    from producer.gateway.schema import UNHONOURED_PARAMS

    assert set(REFUSED_SAMPLES) == set(UNHONOURED_PARAMS)
    messages = [{"role": "user", "content": "x"}]
    for name, value in REFUSED_SAMPLES.items():
        for parse in (lambda b: parse_completion({"model": "m", "prompt": "x", **b}),
                      lambda b: parse_chat({"model": "m", "messages": messages, **b}, default_max_tokens=4)):
            if name == "echo" and parse({}).kind == "completion":
                continue  # completions honour echo
            sent = value
            if name == "add_special_tokens" and parse({}).kind == "completion":
                sent = False  # completions add the tokenizer's special tokens, chat only the template's
            with pytest.raises(ApiError) as caught:
                parse({name: sent})
            assert (caught.value.status, caught.value.param) == (400, name), name
            assert name in caught.value.message


def test_neutral_values_and_unknown_parameters_pass() -> None:
    neutral = {"n": 1, "best_of": 1, "use_beam_search": False, "skip_special_tokens": True, "echo": False,
               "add_generation_prompt": True, "modalities": ["text"], "chat_template_kwargs": {},
               "response_format": {"type": "text"}, "guided_json": None, "some_new_thing": {"a": 1}}
    assert parse_completion({"model": "m", "prompt": "x", **neutral, "add_special_tokens": True}).prompt == "x"
    assert parse_chat({"model": "m", "messages": [{"role": "user", "content": "x"}], **neutral,
                       "add_special_tokens": False}, default_max_tokens=4).kind == "chat"


# --- several completions, echo, prompt logprobs ---------------------------------------------------


def test_choices_echo_and_prompt_logprobs_in_openai_shapes() -> None:
    from producer.request import Choice

    prompt_entries = [None, {"token_id": 66, "text": "B", "logprob": -0.5,
                             "top_logprobs": [{"token_id": 67, "text": "C", "logprob": -0.25}]}]
    entry = {"token_id": 120, "text": "x", "logprob": -1.0, "top_logprobs": []}
    done = Completion(id="r", text="x", token_ids=[120], finish_reason="stop", prompt_tokens=2, completion_tokens=3,
                      logprobs=[entry], prompt_logprobs=prompt_entries,
                      choices=[Choice(0, "x", [120], "stop", [entry]), Choice(1, "yz", [121, 122], "length", [None, None])])
    body = Responder("completion", "cmpl-1", 0, "m").full(done, echo="AB", prompt_entries=prompt_entries,
                                                          prompt_logprobs=True)
    first, second = body["choices"]
    assert (first["index"], first["text"], second["index"], second["text"]) == (0, "ABx", 1, "AByz")
    assert second["finish_reason"] == "length" and body["usage"]["completion_tokens"] == 3
    # echo + logprobs: the prompt's tokens first (the first one without a logprob), then the completion's
    assert first["logprobs"]["tokens"] == ["A", "B", "x"]
    assert first["logprobs"]["token_logprobs"] == [None, -0.5, -1.0]
    assert first["logprobs"]["text_offset"] == [0, 1, 2]
    assert first["logprobs"]["top_logprobs"][0] is None and first["logprobs"]["top_logprobs"][1] == {"C": -0.25, "B": -0.5}
    # vLLM's prompt_logprobs shape: the prompt token (rank unknown: not among the alternatives) and the top ones
    assert first["prompt_logprobs"] == [None, {"66": {"logprob": -0.5, "rank": None, "decoded_token": "B"},
                                               "67": {"logprob": -0.25, "rank": 1, "decoded_token": "C"}}]
    chat = Responder("chat", "chatcmpl-1", 0, "m").full(done, prompt_logprobs=True, prompt_entries=prompt_entries)
    assert [c["message"]["content"] for c in chat["choices"]] == ["x", "yz"] and chat["prompt_logprobs"][0] is None
    chunk = Responder("chat", "chatcmpl-1", 0, "m").chunk("y", index=1)
    assert chunk["choices"][0]["index"] == 1


def test_n_and_best_of_map_to_the_protocol_fields() -> None:
    gen = parse_completion({"model": "m", "prompt": "x", "n": 3, "best_of": 5, "echo": True, "logprobs": 2})
    assert (gen.n, gen.echo, gen.echo_text) == (3, True, "x")
    assert (gen.options["n"], gen.options["best_of"], gen.options["prompt_logprobs"]) == (3, 5, 2)
    chat = parse_chat({"model": "m", "messages": [{"role": "user", "content": "x"}], "n": 2,
                       "prompt_logprobs": 0}, default_max_tokens=4)
    assert (chat.n, chat.prompt_logprobs, chat.options["prompt_logprobs"]) == (2, True, 0)
    with pytest.raises(ApiError) as caught:
        parse_completion({"model": "m", "prompt": "x", "n": 2, "best_of": 3, "stream": True})
    assert caught.value.param == "best_of"


# --- structured output ----------------------------------------------------------------------------

SCHEMA = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}


@pytest.mark.parametrize(("body", "fields"), [
    ({"response_format": {"type": "json_object"}}, {"response_format": '{"type":"json_object"}'}),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "s", "schema": SCHEMA}}},
     {"response_format": '{"type":"json_schema","json_schema":{"name":"schema","schema":'
                         '{"type":"object","properties":{"a":{"type":"integer"}},"required":["a"]}}}'}),
    ({"guided_json": SCHEMA}, {"guided_json": '{"type":"object","properties":{"a":{"type":"integer"}},"required":["a"]}'}),
    ({"guided_regex": "[0-9]+"}, {"guided_regex": "[0-9]+"}),
    ({"guided_choice": ["yes", "no"]}, {"guided_choice": '["yes", "no"]'}),
    ({"guided_grammar": 'root ::= "a"'}, {"guided_grammar": 'root ::= "a"'}),
    ({"structured_outputs": {"regex": "a+"}}, {"structured_outputs": '{"regex":"a+"}'}),
])
def test_structured_output_maps_to_the_protocol_field(body: dict[str, Any], fields: dict[str, str]) -> None:
    messages = [{"role": "user", "content": "x"}]
    for gen in (parse_completion({"model": "m", "prompt": "x", **body}),
                parse_chat({"model": "m", "messages": messages, **body}, default_max_tokens=4)):
        assert {k: v for k, v in gen.options.items() if k in fields} == fields


@pytest.mark.parametrize(("body", "param", "words"), [
    ({"response_format": {"type": "xml"}}, "response_format", "'xml' is not supported"),
    ({"response_format": {"type": "json_schema"}}, "response_format", "json_schema"),
    ({"guided_choice": []}, "guided_choice", "non-empty"),
    ({"guided_json": "not a schema"}, "guided_json", "JSON schema"),
    ({"guided_regex": ""}, "guided_regex", "empty"),
    ({"structured_outputs": {"json": {}, "regex": "a"}}, "structured_outputs", "exactly one"),
    ({"guided_json": SCHEMA, "guided_regex": "a"}, "guided_json", "at most one"),
])
def test_unsupported_structured_output_is_a_400_naming_the_field(body: dict[str, Any], param: str, words: str) -> None:
    with pytest.raises(ApiError) as caught:
        parse_completion({"model": "m", "prompt": "x", **body})
    assert (caught.value.status, caught.value.param) == (400, param)
    assert words in caught.value.message
