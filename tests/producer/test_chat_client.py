"""``Client.chat`` / ``AsyncClient.chat``: messages rendered with the template the model's groups
publish in the registry (no model files), then generated; the errors when there is none to use."""

from __future__ import annotations

import asyncio

import pytest
import redis

from broker.errors import InvalidRequest, ModelNotFound, Unavailable
from broker.keys import Keys
from producer.async_client import AsyncClient
from producer.client import Client
from tests.producer.conftest import Responder, register_group

CHATML = ("{{ bos_token }}{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
RENDERED = "<s><|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"


def test_chat_renders_the_published_template_and_generates(
        responder: Responder, r: redis.Redis, keys: Keys, redis_url: str) -> None:
    register_group(r, keys, "g1", served=("chat",), template=CHATML, bos_token="<s>")
    with Client(redis_url, prefix=keys.prefix) as client:
        assert client.render_chat(MESSAGES) == RENDERED  # the only model served
        done = client.chat(MESSAGES, max_tokens=100, timeout=10)
    assert done.text == RENDERED.strip()  # the stub echoes the prompt's words
    [request] = responder.requests
    assert request.prompt == RENDERED and request.model is None

    async def render() -> str:
        async with AsyncClient(redis_url, prefix=keys.prefix) as client:
            return await client.render_chat(MESSAGES, model="chat")

    assert asyncio.run(render()) == RENDERED


def test_the_model_decides_the_template_and_errors_say_why(r: redis.Redis, keys: Keys, redis_url: str) -> None:
    with Client(redis_url, prefix=keys.prefix) as client:
        with pytest.raises(Unavailable, match="no worker group is registered"):
            client.render_chat(MESSAGES)
        register_group(r, keys, "g1", served=("chat",), template=CHATML, bos_token="<s>")
        register_group(r, keys, "g2", served=("echo",))  # the plain template
        register_group(r, keys, "g3", served=("raw",), template=None)  # a checkpoint without one
        assert client.render_chat(MESSAGES, model="echo") == "system: Be brief.\nuser: Hi\nassistant:"
        assert client.render_chat(MESSAGES, model="chat") == RENDERED
        with pytest.raises(InvalidRequest, match="'model': required.*chat, echo, raw"):
            client.render_chat(MESSAGES)
        with pytest.raises(ModelNotFound, match="'gpt-4' is not served"):
            client.render_chat(MESSAGES, model="gpt-4")
        with pytest.raises(InvalidRequest, match="model 'raw' has no chat template"):
            client.chat(MESSAGES, model="raw")
        with pytest.raises(InvalidRequest, match="role"):
            client.render_chat([{"role": "wizard", "content": "x"}], model="chat")
