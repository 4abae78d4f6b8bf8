"""Several completions of one request (n > 1, best_of) and prompt logprobs, in the engine: the
completions share the prompt's KV blocks (one prefill, the rest from the prefix cache), each is
reproducible from its own seed, and prompt logprobs equal transformers' log-softmax."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from broker.protocol import SamplingParams
from gpu_workers.engine import EngineRequest
from gpu_workers.engine_mapping import engine_sampling
from gpu_workers.llm_engine import BLOCK_SIZE
from tests.gpu_workers.reference import save_hf_model
from tests.gpu_workers.test_llm_engine import engine_for, generate, prompts_of


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_hf_model(tmp_path_factory.mktemp("choices"), seed=8)


def choice_requests(prompt: list[int], sampling: SamplingParams, n: int) -> list[EngineRequest]:
    """What a worker group adds for a request with ``n`` completions (gpu_workers.group._start)."""
    return [EngineRequest(f"r#{c}", prompt, engine_sampling(sampling.for_choice(c, leader=c == 0)),
                          shares_prefix_with=None if c == 0 else "r#0") for c in range(n)]


def test_completions_share_the_prompt_blocks_and_each_is_reproducible(model_dir: Path) -> None:
    prompt = prompts_of([2 * BLOCK_SIZE + 8], seed=1)[0]  # two full blocks and a part
    sampling = SamplingParams(max_tokens=6, temperature=0.9, seed=1234, n=4)
    engine = engine_for(model_dir)
    requests = choice_requests(prompt, sampling, 4)
    for r in requests:
        engine.add(r)
    # The others wait for the first one's prompt: nothing of theirs is computed in its prefill step.
    assert set(engine.not_started()) == {"r#0", "r#1", "r#2", "r#3"}
    first = engine.step()
    assert [o.request_id for o in first] == ["r#0"]
    assert engine.scheduler.num_running == 1 and engine.scheduler.num_waiting == 3
    outputs = {r.request_id: [] for r in requests}
    outputs["r#0"].append(first[0].token_id)
    while engine.has_work():
        for o in engine.step():
            outputs[o.request_id].append(o.token_id)
    stats = engine.stats()
    # one prefill of the prompt; the three others found its two full blocks in the prefix cache
    assert stats.prefix_cache_queries == 4 * len(prompt)
    assert stats.prefix_cache_hits == 3 * 2 * BLOCK_SIZE
    assert all(len(t) == 6 for t in outputs.values())
    assert len({tuple(t) for t in outputs.values()}) > 1  # different seeds, different draws
    # each completion is what a request with n=1 and seed 1234 + c gives alone, on a fresh engine
    for c in range(4):
        alone = engine_for(model_dir)
        single = SamplingParams(max_tokens=6, temperature=0.9, seed=1234 + c)
        assert generate(alone, [EngineRequest("x", prompt, engine_sampling(single))])["x"] == outputs[f"r#{c}"]


def test_aborting_the_first_completion_starts_the_others(model_dir: Path) -> None:
    prompt = prompts_of([20], seed=2)[0]
    engine = engine_for(model_dir)
    for r in choice_requests(prompt, SamplingParams(max_tokens=3, temperature=0.0, n=2), 2):
        engine.add(r)
    engine.abort("r#0")
    assert engine.not_started() == ["r#1"]
    tokens = [o.token_id for _ in range(3) for o in engine.step()]
    assert len(tokens) == 3 and not engine.has_work()


def test_prompt_logprobs_equal_transformers_log_softmax_across_chunks_and_cache(model_dir: Path) -> None:
    prompt = prompts_of([3 * BLOCK_SIZE + 5], seed=3)[0]
    # small steps: the prompt is prefilled in several chunks
    engine = engine_for(model_dir, max_num_seqs=4, max_num_batched_tokens=16)
    generate(engine, [EngineRequest("warm", prompt, engine_sampling(SamplingParams(max_tokens=1, temperature=0.0)))])
    before = engine.stats().prefix_cache_hits
    engine.add(EngineRequest("p", prompt, engine_sampling(SamplingParams(max_tokens=2, temperature=0.0, prompt_logprobs=3))))
    steps = []
    while engine.has_work():
        steps += engine.step()
    # the prompt was cached, yet computed again: its logits were needed
    assert engine.stats().prefix_cache_hits == before
    assert steps[0].prompt_logprobs is not None and steps[1].prompt_logprobs is None
    entries = steps[0].prompt_logprobs
    assert len(entries) == len(prompt) and entries[0] is None
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.inference_mode():
        expected = torch.log_softmax(model(torch.tensor([prompt])).logits[0, :-1], dim=-1)  # [P - 1, V]
    for p, entry in enumerate(entries[1:]):
        assert entry is not None
        assert entry.logprob == pytest.approx(float(expected[p, prompt[p + 1]]), abs=1e-4)
        top = expected[p].topk(3)
        assert [t for t, _ in entry.top] == top.indices.tolist()
        assert [v for _, v in entry.top] == pytest.approx(top.values.tolist(), abs=1e-4)
