"""The gateway's API keys, ``/version`` and ``/metrics`` (producer.gateway.extras), in front of the
protocol stub (tests/producer/conftest.py), with the openai package as the client."""

from __future__ import annotations

import re
from collections.abc import Iterator

import openai
import pytest
import redis
from starlette.testclient import TestClient

from broker.keys import Keys
from broker.settings import Settings
from producer.gateway.app import create_app
from producer.gateway.config import GatewayConfig
from producer.gateway.extras import package_version
from tests.producer.conftest import Responder
from tests.producer.test_gateway import _register_group

KEYS = ("key-one", "key-two")


@pytest.fixture
def gateway(responder: Responder, r: redis.Redis, keys: Keys, settings: Settings, redis_url: str) -> Iterator[TestClient]:
    _register_group(r, keys, "stub", "stub-model", ahead_s=3600)
    app = create_app(settings, redis_url, GatewayConfig(api_keys=KEYS))
    with TestClient(app) as client:
        yield client


def openai_client(http: TestClient, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url="http://testserver/v1", api_key=key, http_client=http, max_retries=0)


def test_v1_needs_one_of_the_keys(gateway: TestClient) -> None:
    for key in KEYS:
        done = openai_client(gateway, key).completions.create(model="stub-model", prompt="two words", max_tokens=4)
        assert done.choices[0].text == "two words"
    with pytest.raises(openai.AuthenticationError) as caught:
        openai_client(gateway, "key-three").completions.create(model="stub-model", prompt="x")
    assert caught.value.status_code == 401 and caught.value.code == "invalid_api_key"
    for headers in ({}, {"authorization": "key-one"}, {"authorization": "Basic key-one"},
                    {"authorization": "Bearer key-one-and-more"}):
        assert gateway.get("/v1/models", headers=headers).status_code == 401, headers
    assert gateway.get("/v1/models", headers={"authorization": "bearer  key-two"}).status_code == 200
    # outside /v1: open, as vLLM's server leaves it
    assert gateway.get("/version").json() == {"version": package_version()}
    assert gateway.get("/metrics").status_code == 200
    assert gateway.get("/health").status_code in (200, 503)  # answered (the stub runs no balancer), not 401


def test_metrics_count_and_time_http_requests(gateway: TestClient) -> None:
    client = openai_client(gateway, KEYS[0])
    for _ in range(3):
        client.completions.create(model="stub-model", prompt="a b", max_tokens=2)
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="stub-model", prompt="x", n=0)
    gateway.get("/v1/models")  # no key: 401
    gateway.get("/no/such/path")
    text = gateway.get("/metrics").text

    def value(pattern: str) -> float:
        found = re.search(pattern + r" (\S+)", text)
        assert found, pattern
        return float(found.group(1))

    assert value(r'http_requests_total\{handler="/v1/completions",method="POST",status="200"\}') == 3
    assert value(r'http_requests_total\{handler="/v1/completions",method="POST",status="400"\}') == 1
    assert value(r'http_requests_total\{handler="/v1/models",method="GET",status="401"\}') == 1
    assert value(r'http_requests_total\{handler="other",method="GET",status="404"\}') == 1
    assert value(r'http_request_duration_seconds_count\{handler="/v1/completions",method="POST"\}') == 4
    assert value(r'http_request_duration_seconds_sum\{handler="/v1/completions",method="POST"\}') > 0


def test_no_keys_no_check(responder: Responder, r: redis.Redis, keys: Keys, settings: Settings,
                          redis_url: str) -> None:
    _register_group(r, keys, "stub", "stub-model", ahead_s=3600)
    with TestClient(create_app(settings, redis_url, GatewayConfig())) as http:
        assert http.get("/v1/models").status_code == 200
