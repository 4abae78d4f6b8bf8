"""The gateway over a real model, as the official ``openai`` package meets it: a random checkpoint
saved by transformers behind a balancer, a worker group and a gateway process. Greedy logprobs equal
transformers' log-softmax of the same logits (completions and chat, streamed and not); sampling
controls sent through ``extra_body`` give the tokens transformers' logits processors give."""

from __future__ import annotations

import math
from pathlib import Path

import openai
import pytest
import redis
import torch
from transformers import AutoModelForCausalLM, RepetitionPenaltyLogitsProcessor

from broker.keys import Keys
from gpu_workers.hf_tokenizer import load_tokenizer
from tests.gpu_workers.reference import save_hf_model
from tests.gpu_workers.test_engine_controls import hf_generate
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


def test_logprobs_and_controls_through_the_openai_client(procs: Procs, r: redis.Redis, keys: Keys,
                                                         model_dir: Path) -> None:
    procs.balancer()
    procs.worker("llama", "--model", str(model_dir), "--kv-dtype", "fp32", "--kv-memory", "8MiB")
    log = procs.log_dir / f"{len(procs.started):02d}-producer.log"
    procs.spawn("producer", "gateway", "--port", "0")
    wait_groups(r, keys, {"llama"}, timeout=60)
    url = wait_for(lambda: served_url(log), timeout=30, what="the gateway")
    client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=60)
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

    # chat without max_tokens: the rest of the context (the default, 1024, is more), never a 400
    long = [{"role": "user", "content": "y" * 990}]
    filled = client.chat.completions.create(model=model, messages=long, temperature=0)
    assert filled.choices[0].finish_reason == "length"
    assert filled.usage.prompt_tokens + filled.usage.completion_tokens == 1024  # the model's context
    assert 0 < filled.usage.completion_tokens < 1024 - 990
    with pytest.raises(openai.BadRequestError) as caught:  # a max_tokens the client sent is kept
        client.chat.completions.create(model=model, messages=long, max_tokens=100)
    assert "context length" in caught.value.message
