"""The gateway over a real model, as the official ``openai`` package meets it: a random checkpoint
saved by transformers behind a balancer, a worker group and a gateway process. Greedy logprobs equal
transformers' log-softmax of the same logits (completions and chat, streamed and not); each penalty,
``logit_bias``, ``stop_token_ids`` and ``min_tokens`` give the tokens transformers' logits processors
give."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import openai
import pytest
import redis
import torch
from transformers import (
    AutoModelForCausalLM,
    LogitsProcessor,
    MinNewTokensLengthLogitsProcessor,
    RepetitionPenaltyLogitsProcessor,
    SequenceBiasLogitsProcessor,
)

from broker.keys import Keys
from gpu_workers.hf_tokenizer import load_tokenizer
from tests.gpu_workers.reference import MIN_MARGIN, save_hf_model
from tests.gpu_workers.test_engine_controls import FrequencyPresence, hf_generate
from tests.integration.conftest import Procs, wait_for, wait_groups

pytestmark = pytest.mark.integration
NEW = 16  # tests.gpu_workers.test_engine_controls.hf_generate's length
TOP = 4
TOLERANCE = 1e-4  # fp32 logits from two implementations of the same model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_hf_model(tmp_path_factory.mktemp("gateway-llama"), seed=5)


def hf_logprobs(model_dir: Path, prompt: list[int], tokens: list[int]) -> torch.Tensor:
    """``[len(tokens), V]``: transformers' log-softmax of the logits each token was chosen from."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.inference_mode():
        logits = model(torch.tensor([prompt + tokens])).logits[0, len(prompt) - 1 : -1]
    return torch.log_softmax(logits, dim=-1)


def served_url(log: Path) -> str | None:
    for line in log.read_text(errors="replace").splitlines() if log.exists() else []:
        if line.startswith("ryzanstein gateway: serving "):
            return line.split()[3]
    return None


def gateway_on(procs: Procs, r: redis.Redis, keys: Keys, model_dir: Path, kv_memory: str, *worker_flags: str,
               timeout: float = 60) -> tuple[openai.OpenAI, str]:
    """A balancer, a worker group "llama" serving ``model_dir`` with an fp32 KV cache (and
    ``worker_flags``) and a gateway, started and ready: the openai client on the gateway (no
    retries, ``timeout`` seconds) and its base URL."""
    procs.balancer()
    procs.worker("llama", "--model", str(model_dir), "--kv-dtype", "fp32", "--kv-memory", kv_memory, *worker_flags)
    log = procs.log_dir / f"{len(procs.started):02d}-producer.log"
    procs.spawn("producer", "gateway", "--port", "0")
    wait_groups(r, keys, {"llama"}, timeout=60)
    url = wait_for(lambda: served_url(log), timeout=30, what="the gateway")
    return openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=timeout), url


def test_logprobs_and_controls_through_the_openai_client(procs: Procs, r: redis.Redis, keys: Keys,
                                                         model_dir: Path) -> None:
    client, _ = gateway_on(procs, r, keys, model_dir, "8MiB")
    model = model_dir.name  # the served name: the directory's last component
    prompt = [17, 250, 3, 99, 140, 8, 61]

    # completions, not streamed: each token's logprob and top alternatives against transformers
    done = client.completions.create(model=model, prompt=prompt, max_tokens=NEW, temperature=0, logprobs=TOP)
    tokens, _ = hf_generate(model_dir, prompt, [])
    lp = done.choices[0].logprobs
    assert lp is not None and len(lp.token_logprobs) == NEW
    expected = hf_logprobs(model_dir, prompt, tokens)
    for i, token in enumerate(tokens):
        assert lp.token_logprobs[i] == pytest.approx(float(expected[i, token]), abs=TOLERANCE)
        assert lp.top_logprobs[i][lp.tokens[i]] == pytest.approx(lp.token_logprobs[i], abs=TOLERANCE)
        top = expected[i].topk(TOP).values.tolist()
        # keyed by text, so tokens of the same text (bytes that are no character alone) share an entry
        assert max(lp.top_logprobs[i].values()) == pytest.approx(top[0], abs=TOLERANCE)
        assert all(any(abs(v - e) < TOLERANCE for e in top) for v in lp.top_logprobs[i].values())
    if not any("\ufffd" in t for t in lp.tokens):
        assert "".join(lp.tokens) == done.choices[0].text
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(NEW)]

    # completions, streamed: the same logprobs, one token per chunk
    chunks = list(client.completions.create(model=model, prompt=prompt, max_tokens=NEW, temperature=0,
                                            logprobs=TOP, stream=True))
    streamed = [v for c in chunks if c.choices and c.choices[0].logprobs for v in c.choices[0].logprobs.token_logprobs]
    assert streamed == pytest.approx(lp.token_logprobs, abs=1e-9)

    # chat, streamed and not: the OpenAI chat shape, the same numbers both ways
    messages = [{"role": "user", "content": "hello there"}]
    chat = client.chat.completions.create(model=model, messages=messages, max_tokens=8, temperature=0,
                                          logprobs=True, top_logprobs=TOP)
    content = chat.choices[0].logprobs.content
    assert len(content) == 8
    if not any("\ufffd" in t.token for t in content):  # a token alone can be part of a character
        assert "".join(t.token for t in content) == chat.choices[0].message.content
    for t in content:
        assert len(t.top_logprobs) == TOP and t.top_logprobs[0].logprob == pytest.approx(t.logprob, abs=1e-9)
        assert t.logprob <= 0 and bytes(t.bytes).decode("utf-8") == t.token
        assert sum(math.exp(a.logprob) for a in t.top_logprobs) <= 1.0 + 1e-6
    stream = client.chat.completions.create(model=model, messages=messages, max_tokens=8, temperature=0,
                                            logprobs=True, top_logprobs=TOP, stream=True)
    streamed_chat = [t for c in stream if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.content]
    assert [(t.token, t.logprob) for t in streamed_chat] == [(t.token, t.logprob) for t in content]
    plain = client.chat.completions.create(model=model, messages=messages, max_tokens=8, temperature=0)
    assert plain.choices[0].logprobs is None and plain.choices[0].message.content == chat.choices[0].message.content

    # a sampling control through extra_body: the tokens transformers' processor gives
    penalized, _ = hf_generate(model_dir, prompt, [RepetitionPenaltyLogitsProcessor(1.5)])
    assert penalized != tokens
    decode = load_tokenizer(model_dir, vocab_size=320).tokenizer.decode
    done = client.completions.create(model=model, prompt=prompt, max_tokens=NEW, temperature=0,
                                     extra_body={"repetition_penalty": 1.5})
    assert done.choices[0].text == decode(penalized) != decode(tokens)
    # each penalty, logit_bias and the stop controls, as the openai package sends them
    controls: dict[str, tuple[dict[str, Any], list[LogitsProcessor], int | None]] = {
        "penalties": ({"frequency_penalty": -0.5, "presence_penalty": 0.5},
                      [FrequencyPresence(len(prompt), -0.5, 0.5)], None),
        "penalties, other signs": ({"frequency_penalty": 0.2, "presence_penalty": -0.4},
                                   [FrequencyPresence(len(prompt), 0.2, -0.4)], None),
        "logit_bias": ({"logit_bias": {str(tokens[0]): -100, str(tokens[3]): 3}},
                       [SequenceBiasLogitsProcessor([[[tokens[0]], -100.0], [[tokens[3]], 3.0]])], None),
        "stop_token_ids": ({"extra_body": {"stop_token_ids": [tokens[3]]}}, [], tokens[3]),
        "min_tokens": ({"extra_body": {"stop_token_ids": [tokens[3]], "min_tokens": 4}},
                       [MinNewTokensLengthLogitsProcessor(len(prompt), 4, [tokens[3]])], tokens[3]),
    }
    seen = {tuple(tokens), tuple(penalized)}
    for name, (kwargs, processors, stop_id) in controls.items():
        expected, margin = hf_generate(model_dir, prompt, processors, eos=stop_id)
        assert margin >= MIN_MARGIN, f"{name}: the reference has a near-tie ({margin:.2e})"
        assert tuple(expected) not in seen, f"{name}: changes nothing the other cases did not"
        seen.add(tuple(expected))
        done = client.completions.create(model=model, prompt=prompt, max_tokens=NEW, temperature=0, **kwargs)
        if stop_id is None:
            assert (done.choices[0].text, done.choices[0].finish_reason) == (decode(expected), "length"), name
        else:  # ended by the stop id, whose text is left out (vLLM's rule); counted in the usage
            assert expected[-1] == stop_id and len(expected) < NEW
            assert (done.choices[0].text, done.choices[0].finish_reason) == (decode(expected[:-1]), "stop"), name
        assert done.usage.completion_tokens == len(expected), name

    # chat without max_tokens: the rest of the context (the default, 1024, is more), never a 400
    long = [{"role": "user", "content": "y" * 990}]
    filled = client.chat.completions.create(model=model, messages=long, temperature=0)
    assert filled.choices[0].finish_reason == "length"
    assert filled.usage.prompt_tokens + filled.usage.completion_tokens == 1024  # the model's context
    assert 0 < filled.usage.completion_tokens < 1024 - 990
    with pytest.raises(openai.BadRequestError) as caught:  # a max_tokens the client sent is kept
        client.chat.completions.create(model=model, messages=long, max_tokens=100)
    assert "context length" in caught.value.message


def prefix_counters(port: int) -> tuple[float, float]:
    """(prefix_cache_queries, prefix_cache_hits) totals on a group's /metrics."""
    from tests.integration.test_metrics import scrape

    samples = scrape(port)
    total = {name: sum(v for (n, _labels), v in samples.items() if n == name)
             for name in ("ryz_prefix_cache_queries_total", "ryz_prefix_cache_hits_total")}
    return total["ryz_prefix_cache_queries_total"], total["ryz_prefix_cache_hits_total"]


def test_n_best_of_prompt_logprobs_and_tokenize_through_the_openai_client(
        procs: Procs, r: redis.Redis, keys: Keys, model_dir: Path) -> None:
    import httpx

    from broker.registry import read_groups

    client, url = gateway_on(procs, r, keys, model_dir, "8MiB", "--metrics-port", "0", "--metrics-host", "127.0.0.1")
    model = model_dir.name
    (group,) = read_groups(r, keys, dead_after_s=10.0)
    assert group.metrics_port
    prompt = [(7 * i + 3) % 300 for i in range(40)]  # two full KV blocks (16 tokens) and a part

    # n=4, seeded: one prefill, the three other completions find the prompt's two full blocks cached
    before = wait_for(lambda: prefix_counters(group.metrics_port), what="the group's metrics")
    four = client.completions.create(model=model, prompt=prompt, max_tokens=8, temperature=1.0, seed=11, n=4)
    assert sorted(c.index for c in four.choices) == [0, 1, 2, 3]
    assert four.usage.completion_tokens == 4 * 8  # every completion counts (ignore_eos is not set, but 8 < its EOS)
    wait_for(lambda: prefix_counters(group.metrics_port) == (before[0] + 4 * 40, before[1] + 3 * 32),
             what="prefix-cache counters: 4 lookups of 40 tokens, 3 hits of 32")
    # reproducible: the same request again, and each completion alone with seed 11 + index
    again = client.completions.create(model=model, prompt=prompt, max_tokens=8, temperature=1.0, seed=11, n=4)
    assert [c.text for c in again.choices] == [c.text for c in four.choices]
    for c in four.choices:
        alone = client.completions.create(model=model, prompt=prompt, max_tokens=8, temperature=1.0, seed=11 + c.index)
        assert alone.choices[0].text == c.text
    assert len({c.text for c in four.choices}) > 1

    # streamed: each chunk names its choice; the deltas of each join to that choice's text
    texts: dict[int, str] = {}
    reasons: dict[int, str] = {}
    for chunk in client.completions.create(model=model, prompt=prompt, max_tokens=8, temperature=1.0, seed=11,
                                           n=4, stream=True):
        for ch in chunk.choices:
            texts[ch.index] = texts.get(ch.index, "") + ch.text
            if ch.finish_reason:
                reasons[ch.index] = ch.finish_reason
    assert texts == {c.index: c.text for c in four.choices} and sorted(reasons) == [0, 1, 2, 3]
    chat = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=4,
                                          temperature=1.0, seed=3, n=3)
    assert [c.index for c in chat.choices] == [0, 1, 2]

    # best_of: the n with the highest cumulative logprob among best_of, best first
    best = client.completions.create(model=model, prompt=prompt, max_tokens=6, temperature=1.0, seed=5, n=2,
                                     best_of=4, logprobs=0)
    sums = [sum(c.logprobs.token_logprobs) for c in best.choices]
    candidates = [sum(client.completions.create(model=model, prompt=prompt, max_tokens=6, temperature=1.0,
                                                seed=5 + i, logprobs=0).choices[0].logprobs.token_logprobs)
                  for i in range(4)]
    assert sums == pytest.approx(sorted(candidates, reverse=True)[:2], abs=TOLERANCE)

    # prompt logprobs (vLLM's field) and echo + logprobs: transformers' log-softmax of the prompt's logits
    model_hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.inference_mode():
        expected = torch.log_softmax(model_hf(torch.tensor([prompt])).logits[0, :-1], dim=-1)  # [P - 1, V]
    raw = httpx.post(f"{url}/completions", json={"model": model, "prompt": prompt, "max_tokens": 1,
                                                 "prompt_logprobs": 2}, timeout=60).json()
    entries = raw["choices"][0]["prompt_logprobs"]
    assert entries[0] is None and len(entries) == len(prompt)
    for p, entry in enumerate(entries[1:]):
        assert entry[str(prompt[p + 1])]["logprob"] == pytest.approx(float(expected[p, prompt[p + 1]]), abs=TOLERANCE)
        ranked = sorted((v["rank"], float(k)) for k, v in entry.items() if v["rank"] is not None and v["rank"] <= 2)
        assert [int(t) for _rank, t in ranked] == expected[p].topk(2).indices.tolist()
    echoed = client.completions.create(model=model, prompt=prompt, max_tokens=2, temperature=0, echo=True, logprobs=1)
    lp = echoed.choices[0].logprobs
    assert lp.token_logprobs[0] is None and len(lp.token_logprobs) == len(prompt) + 2
    assert lp.token_logprobs[1:len(prompt)] == pytest.approx(
        [float(expected[p, prompt[p + 1]]) for p in range(len(prompt) - 1)], abs=TOLERANCE)
    decode = load_tokenizer(model_dir, vocab_size=320).tokenizer.decode
    assert echoed.choices[0].text.startswith(decode(prompt))

    # /tokenize and /detokenize: the ids and text the worker group's tokenizer gives
    root = url.removesuffix("/v1")
    tokenizer = load_tokenizer(model_dir, vocab_size=320).tokenizer
    got = httpx.post(f"{root}/tokenize", json={"model": model, "prompt": "hello there"}).json()
    assert got == {"tokens": tokenizer.encode("hello there"), "count": len(tokenizer.encode("hello there")),
                   "max_model_len": group.max_context}
    assert httpx.post(f"{root}/detokenize", json={"model": model, "tokens": got["tokens"]}).json() == {
        "prompt": tokenizer.decode(got["tokens"])}
    chat_ids = httpx.post(f"{root}/tokenize", json={"model": model, "messages": [
        {"role": "user", "content": "hi"}]}).json()
    done = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=1)
    assert chat_ids["count"] == done.usage.prompt_tokens
    assert httpx.post(f"{root}/tokenize", json={"model": "nope", "prompt": "x"}).status_code == 404
    assert httpx.post(f"{root}/detokenize", json={"model": model, "tokens": [10**6]}).status_code == 400


@pytest.fixture(scope="module")
def eos_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_hf_model(tmp_path_factory.mktemp("gateway-structured"), seed=3, eos_token_id=319)


def test_fifty_random_schemas_through_the_openai_client(procs: Procs, r: redis.Redis, keys: Keys,
                                                        eos_model_dir: Path) -> None:
    """Whatever a random-weights model writes under a schema (OpenAI's ``response_format`` and
    vLLM's ``guided_json``, by turns), sampled, parses and validates against it."""
    import json
    from concurrent.futures import ThreadPoolExecutor

    import jsonschema

    from benchmarks.json_schemas import random_schemas

    client, _ = gateway_on(procs, r, keys, eos_model_dir, "32MiB", timeout=300)
    schemas = random_schemas(50, seed=18)

    def ask(i: int) -> openai.types.Completion:
        constraint = ({"response_format": {"type": "json_schema", "json_schema": {"name": f"s{i}", "schema": schemas[i]}}}
                      if i % 2 == 0 else {"guided_json": schemas[i]})
        return client.completions.create(model=eos_model_dir.name, prompt="Answer in JSON: ", max_tokens=600,
                                         temperature=1.0, seed=i, extra_body=constraint)

    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(ask, range(len(schemas))))
    for schema, answer in zip(schemas, answers):
        choice = answer.choices[0]
        assert choice.finish_reason == "stop", (schema, choice.text)  # ended where the schema is complete
        jsonschema.validate(json.loads(choice.text), schema)
