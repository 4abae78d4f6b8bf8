"""The Llama engine behind the whole pipeline (Redis, balancer, worker process): greedy tokens equal
transformers' for a batch of prompts of different lengths, with shared prefixes, and under
preemption forced by a tiny KV cache."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import redis

from broker.keys import Keys
from producer.client import Client
from tests.gpu_workers.reference import MIN_MARGIN, hf_greedy, save_hf_model
from tests.integration.conftest import Procs, final_events, wait_for, wait_groups

pytestmark = pytest.mark.integration
NEW_TOKENS = 20


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_hf_model(tmp_path_factory.mktemp("pipeline-llama"), family="llama", seed=2)


def workload() -> list[list[int]]:
    rng = random.Random(42)
    shared = [rng.randrange(320) for _ in range(40)]
    lengths = [2, 9, 16, 31, 57, 88]
    alone = [[rng.randrange(320) for _ in range(n)] for n in lengths]
    return alone + [shared + [rng.randrange(320) for _ in range(n)] for n in (3, 11, 20)]


def serve(client: Client, prompts: list[list[int]]) -> list[list[int]]:
    handles = [client.submit(prompt_ids=p, max_tokens=NEW_TOKENS, temperature=0.0, stream=True) for p in prompts]
    out = []
    for handle in handles:
        done = client.result(handle, timeout=120)
        assert done.finish_reason == "length" and done.prompt_tokens == len(prompts[len(out)])
        out.append(done.token_ids)
    return out


@pytest.mark.parametrize("kv_memory", ["8MiB", str(12 * 16 * 512)], ids=["roomy", "tiny-kv-preempts"])
def test_greedy_tokens_equal_transformers_generate(procs: Procs, r: redis.Redis, keys: Keys, redis_url: str,
                                                    model_dir: Path, kv_memory: str) -> None:
    prompts = workload()
    reference = hf_greedy(model_dir, prompts, NEW_TOKENS)
    assert reference.min_margin >= MIN_MARGIN
    procs.balancer()
    procs.worker("llama", "--model", str(model_dir), "--kv-dtype", "fp32", "--kv-memory", kv_memory)
    wait_groups(r, keys, {"llama"}, timeout=60)
    with Client(redis_url, prefix=keys.prefix) as client:
        assert serve(client, prompts) == reference.tokens
        # the same prompts again: the shared prefixes are now in the prefix cache, and tokens stay exact
        assert serve(client, prompts) == reference.tokens
    info = {k.decode(): v.decode() for k, v in r.hgetall(keys.group_info("llama")).items()}
    assert info["model"] == str(model_dir)
    assert int(info["kv_capacity_tokens"]) > 0
    assert json.loads(info.get("kv_used_tokens", "0")) >= 0


# Each family with a sliding window shorter than most sequences (Gemma 3: a sliding then a global layer).
FAMILIES = {
    "qwen3": {"family": "qwen3", "seed": 6, "use_sliding_window": True, "sliding_window": 24, "max_window_layers": 1},
    "phi3": {"family": "phi3", "seed": 7, "sliding_window": 24},
    "gemma3": {"family": "gemma3", "seed": 2, "num_key_value_heads": 1, "head_dim": 16, "sliding_window": 24,
               "layer_types": ["sliding_attention", "full_attention"]},
}


# Gemma 3, the family furthest from Llama, runs always; the others with the slow tests (the engine's own
# tests, tests/gpu_workers/test_llm_engine.py, compare their greedy tokens always).
@pytest.mark.parametrize("family", [pytest.param(f, marks=[] if f == "gemma3" else [pytest.mark.slow]) for f in FAMILIES])
def test_each_family_greedy_through_the_pipeline(procs: Procs, r: redis.Redis, keys: Keys, redis_url: str,
                                                  tmp_path: Path, family: str) -> None:
    model_dir = save_hf_model(tmp_path / family, **FAMILIES[family])
    prompts = workload()[3:]  # 31 to 60 tokens, three of them sharing a 40-token prefix
    reference = hf_greedy(model_dir, prompts, NEW_TOKENS)
    assert reference.min_margin >= MIN_MARGIN, f"reference has a near-tie ({reference.min_margin:.2e})"
    procs.balancer()
    procs.worker(family, "--model", str(model_dir), "--kv-dtype", "fp32", "--kv-memory", "8MiB")
    wait_groups(r, keys, {family}, timeout=60)
    with Client(redis_url, prefix=keys.prefix) as client:
        assert serve(client, prompts) == reference.tokens
        assert serve(client, prompts) == reference.tokens  # again, from the prefix cache


def test_sampling_controls_as_flat_fields_through_the_pipeline(procs: Procs, r: redis.Redis, keys: Keys,
                                                                model_dir: Path) -> None:
    """What redis-cli sends: flat text fields. A +100 bias makes a token the greedy choice; the
    repetition penalty still leaves it first (its logit is positive); bad_words bans it again."""
    procs.balancer()
    procs.worker("llama", "--model", str(model_dir), "--kv-dtype", "fp32", "--kv-memory", "8MiB")
    wait_groups(r, keys, {"llama"}, timeout=60)
    base = {"prompt_ids": "[5, 6, 7]", "max_tokens": "6", "temperature": "0"}
    requests = {
        "biased": {**base, "logit_bias": '{"65": 100}', "repetition_penalty": "1.5", "min_tokens": "2"},
        "banned": {**base, "logit_bias": '{"65": 100}', "bad_words": '["A"]', "ignore_eos": "1"},
        "too_big": {**base, "logit_bias": '{"320": 1}'},
        "bad_field": {**base, "min_p": "2"},
        "logprobs": {**base, "logprobs": "1", "top_logprobs": "2", "stream": "1"},
        "top_alone": {**base, "top_logprobs": "2"},
    }
    for rid, fields in requests.items():
        r.xadd(keys.requests, {"id": rid, **fields})
    finals = {}
    for rid in requests:
        finals[rid] = wait_for(lambda rid=rid: final_events(r, keys.result(rid)), timeout=60, what=rid)[0]
    assert json.loads(finals["biased"][b"token_ids"]) == [65] * 6
    # who served it: the served name (the directory's last component) and the group
    assert (finals["biased"][b"model"], finals["biased"][b"group"]) == (model_dir.name.encode(), b"llama")
    assert 0 <= float(finals["biased"][b"queue_s"]) <= float(finals["biased"][b"ttft_s"]) <= float(
        finals["biased"][b"total_s"])
    banned = json.loads(finals["banned"][b"token_ids"])
    assert len(banned) == 6 and 65 not in banned
    done = json.loads(finals["logprobs"][b"logprobs"])
    tokens = [f for _, f in r.xrange(keys.result("logprobs")) if f[b"event"] == b"token"]
    assert len(done) == len(tokens) == 6
    for entry, event in zip(done, tokens):
        assert entry["token_id"] == int(event[b"token_id"]) and entry["logprob"] == float(event[b"logprob"]) <= 0
        assert json.loads(event[b"logprobs"]) == entry and len(entry["top_logprobs"]) == 2
        assert entry["top_logprobs"][0]["logprob"] == entry["logprob"]  # greedy: the likeliest
    for rid, field in (("too_big", b"logit_bias"), ("bad_field", b"min_p"), ("top_alone", b"top_logprobs")):
        assert finals[rid][b"code"] == b"invalid_request" and field in finals[rid][b"message"]
