"""Logprobs: the sampler reports the drawn token's log-probability and the likeliest alternatives
from the distribution it drew from; the engine's greedy logprobs equal transformers' log-softmax."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from broker import protocol
from gpu_workers.engine import EngineRequest, TokenLogprobs
from gpu_workers.logits_processors import RowContext
from gpu_workers.output import OutputState
from gpu_workers.sampler import sample, sample_with_logprobs
from gpu_workers.sampling_params import SamplingParams
from gpu_workers.tokenizer import ByteTokenizer
from tests.gpu_workers.reference import save_hf_model
from tests.gpu_workers.test_llm_engine import engine_for, prompts_of

VOCAB = 50


def logits_of(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, VOCAB, generator=torch.Generator().manual_seed(seed)) * 2


def test_greedy_logprobs_are_the_log_softmax_of_the_logits() -> None:
    logits = logits_of(3, seed=1)
    out = sample_with_logprobs(logits, [SamplingParams(temperature=0.0)] * 3, seeds=[0] * 3, steps=[0] * 3,
                               top_logprobs=[5, 0, None])
    expected = torch.log_softmax(logits, dim=-1)
    assert out.token_ids == logits.argmax(dim=-1).tolist()
    for row in (0, 1):
        lp = out.logprobs[row]
        assert lp is not None
        assert lp.logprob == pytest.approx(float(expected[row, out.token_ids[row]]), abs=1e-6)
    top = expected[0].topk(5)
    assert [t for t, _ in out.logprobs[0].top] == top.indices.tolist()
    assert [v for _, v in out.logprobs[0].top] == pytest.approx(top.values.tolist(), abs=1e-6)
    assert out.logprobs[1].top == () and out.logprobs[2] is None


def test_sampled_logprobs_come_from_the_distribution_drawn_from() -> None:
    logits = logits_of(4, seed=2)
    params = [SamplingParams(temperature=0.7), SamplingParams(temperature=1.3, top_k=4),
              SamplingParams(temperature=1.0, top_p=0.5), SamplingParams(temperature=2.0, min_p=0.2)]
    out = sample_with_logprobs(logits, params, seeds=[1, 2, 3, 4], steps=[0] * 4, top_logprobs=[VOCAB] * 4)
    for row, p in enumerate(params):
        scaled = logits[row] / p.temperature
        probs = torch.softmax(scaled, dim=-1)
        kept = torch.ones(VOCAB, dtype=torch.bool)
        if p.top_k:
            kept &= scaled >= scaled.topk(p.top_k).values[-1]
        if p.top_p < 1.0:
            ordered = probs.sort(descending=True)
            before = ordered.values.cumsum(0) - ordered.values  # mass of the likelier tokens
            nucleus = torch.zeros(VOCAB, dtype=torch.bool)
            nucleus[ordered.indices[before < p.top_p]] = True
            kept &= nucleus
        if p.min_p:
            kept &= probs >= p.min_p * probs.max()
        expected = torch.log_softmax(scaled.masked_fill(~kept, -math.inf), dim=-1)
        lp = out.logprobs[row]
        assert lp is not None and kept[out.token_ids[row]]
        assert lp.logprob == pytest.approx(float(expected[out.token_ids[row]]), abs=1e-5)
        reported = dict(lp.top)
        assert len(reported) == VOCAB
        for token in range(VOCAB):
            if kept[token]:
                assert reported[token] == pytest.approx(float(expected[token]), abs=1e-5)
            else:
                assert reported[token] == -math.inf  # filtered out: never drawn
    # asking for logprobs changes no token
    assert out.token_ids == sample(logits, params, seeds=[1, 2, 3, 4], steps=[0] * 4)


def test_logprobs_are_taken_after_the_controls() -> None:
    logits = logits_of(1, seed=3)
    params = [SamplingParams(temperature=0.0, repetition_penalty=1.8, logit_bias=((3, 2.0),))]
    context = RowContext([3, 7, 7, 9], 2)
    out = sample_with_logprobs(logits, params, seeds=[0], steps=[2], contexts=[context], top_logprobs=[3])
    controlled = logits.clone()
    controlled[0, 3] += 2.0
    for token in (3, 7, 9):
        value = controlled[0, token]
        controlled[0, token] = value / 1.8 if value > 0 else value * 1.8
    expected = torch.log_softmax(controlled[0], dim=-1)
    assert out.token_ids == [int(controlled.argmax())]
    assert out.logprobs[0].logprob == pytest.approx(float(expected.max()), abs=1e-6)
    assert [t for t, _ in out.logprobs[0].top] == expected.topk(3).indices.tolist()


def test_output_state_renders_token_texts_and_keeps_one_entry_per_token() -> None:
    state = OutputState(sampling=protocol.SamplingParams(logprobs=True, top_logprobs=2), prompt_ids=[1],
                        tokenizer=ByteTokenizer(), eos_token_ids=frozenset(), max_context=100)
    first = state.push(ord("h"), logprobs=TokenLogprobs(-0.5, ((ord("h"), -0.5), (ord("j"), -1.25))))
    state.push(ord("i"))  # replayed from another group: no logprobs known
    assert first.logprobs == {"token_id": 104, "text": "h", "logprob": -0.5, "top_logprobs": [
        {"token_id": 104, "text": "h", "logprob": -0.5}, {"token_id": 106, "text": "j", "logprob": -1.25}]}
    assert state.logprobs == [first.logprobs, None]
    plain = OutputState(sampling=protocol.SamplingParams(), prompt_ids=[1], tokenizer=ByteTokenizer(),
                        eos_token_ids=frozenset(), max_context=100)
    assert plain.push(5, logprobs=TokenLogprobs(0.0)).logprobs is None and plain.logprobs is None


def test_engine_greedy_logprobs_equal_transformers_log_softmax(tmp_path: Path) -> None:
    model_dir = save_hf_model(tmp_path, seed=6)
    prompt = prompts_of([11], seed=4)[0]
    engine = engine_for(model_dir)
    engine.add(EngineRequest("lp", prompt, SamplingParams(max_tokens=8, temperature=0.0, logprobs=True,
                                                          top_logprobs=5)))
    steps = []
    while engine.has_work():
        steps += engine.step()
    tokens = [s.token_id for s in steps]
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.inference_mode():
        logits = model(torch.tensor([prompt + tokens])).logits[0, len(prompt) - 1 : -1]  # [8, V]
    expected = torch.log_softmax(logits, dim=-1)
    for i, step in enumerate(steps):
        assert step.logprobs is not None
        assert step.logprobs.logprob == pytest.approx(float(expected[i, tokens[i]]), abs=1e-4)
        top = expected[i].topk(5)
        assert [t for t, _ in step.logprobs.top] == top.indices.tolist()
        assert [v for _, v in step.logprobs.top] == pytest.approx(top.values.tolist(), abs=1e-4)
