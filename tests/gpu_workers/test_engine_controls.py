"""Sampling controls in the Llama engine, one batch: greedy tokens equal transformers' ``generate``
with the matching logits processors (repetition penalty, sequence bias, bad words, min new tokens;
frequency/presence by OpenAI's formula), and ``ignore_eos`` runs through EOS to ``max_tokens``."""

from __future__ import annotations

import dataclasses
from collections import Counter
from pathlib import Path

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    LogitsProcessor,
    LogitsProcessorList,
    MinNewTokensLengthLogitsProcessor,
    NoBadWordsLogitsProcessor,
    RepetitionPenaltyLogitsProcessor,
    SequenceBiasLogitsProcessor,
)

from gpu_workers.engine import EngineRequest
from gpu_workers.sampling_params import SamplingParams
from tests.gpu_workers.reference import MIN_MARGIN, hf_greedy, save_hf_model
from tests.gpu_workers.test_llm_engine import engine_for, generate, prompts_of

NEW = 16


class FrequencyPresence(LogitsProcessor):
    """OpenAI's penalties over the generated tokens (transformers has no processor for them)."""

    def __init__(self, prompt_len: int, frequency: float, presence: float) -> None:
        self.prompt_len, self.frequency, self.presence = prompt_len, frequency, presence

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        scores = scores.clone()
        for token, count in Counter(input_ids[0, self.prompt_len :].tolist()).items():
            scores[0, token] -= count * self.frequency + self.presence
        return scores


def hf_generate(model_dir: Path, prompt: list[int], processors: list[LogitsProcessor], *,
                eos: int | None = None) -> tuple[list[int], float]:
    """transformers' greedy continuation under ``processors``, and its smallest relative margin."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = torch.tensor([prompt])
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW, do_sample=False,
                             logits_processor=LogitsProcessorList(processors), output_scores=True,
                             return_dict_in_generate=True, pad_token_id=0, eos_token_id=eos)
    margins = []
    for scores in out.scores:
        finite = scores[0][scores[0].isfinite()]
        top = finite.topk(2).values
        margins.append(float((top[0] - top[1]) / finite.std()))
    return out.sequences[0, len(prompt) :].tolist(), min(margins)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_hf_model(tmp_path_factory.mktemp("controls"), seed=5)


def test_each_control_matches_transformers_in_one_batch(model_dir: Path) -> None:
    prompt = prompts_of([14], seed=9)[0]
    plain = hf_greedy(model_dir, [prompt], NEW).tokens[0]
    # bad words are text: single bytes of the plain path (the random model's tokenizer is byte-level)
    printable = [t for t in plain if 33 <= t <= 126]
    assert len(printable) >= 2, "the plain path has too few ASCII tokens to ban"
    cases: dict[str, tuple[SamplingParams, list[LogitsProcessor]]] = {
        "repetition": (SamplingParams(repetition_penalty=1.5), [RepetitionPenaltyLogitsProcessor(1.5)]),
        "repetition_low": (SamplingParams(repetition_penalty=0.7), [RepetitionPenaltyLogitsProcessor(0.7)]),
        "frequency": (SamplingParams(frequency_penalty=1.2), [FrequencyPresence(len(prompt), 1.2, 0.0)]),
        "presence": (SamplingParams(presence_penalty=1.5), [FrequencyPresence(len(prompt), 0.0, 1.5)]),
        "logit_bias": (SamplingParams(logit_bias=((plain[0], -100.0), (plain[3], 3.0))),
                       [SequenceBiasLogitsProcessor([[[plain[0]], -100.0], [[plain[3]], 3.0]])]),
        "bad_words": (SamplingParams(bad_words=tuple(chr(t) for t in printable[:2])),
                      [NoBadWordsLogitsProcessor([[t] for t in printable[:2]], eos_token_id=0)]),
    }
    requests, expected = [], {}
    for name, (params, processors) in cases.items():
        tokens, margin = hf_generate(model_dir, prompt, processors)
        assert margin >= MIN_MARGIN, f"{name}: reference has a near-tie ({margin:.2e})"
        assert tokens != plain, f"{name}: the control changes nothing on this prompt"
        expected[name] = tokens
        requests.append(EngineRequest(name, prompt, dataclasses.replace(params, max_tokens=NEW, temperature=0.0)))
    requests.append(EngineRequest("plain", prompt, SamplingParams(max_tokens=NEW, temperature=0.0)))
    out = generate(engine_for(model_dir), requests)
    assert out.pop("plain") == plain
    assert out == expected


def test_min_tokens_and_ignore_eos_around_an_eos_token(tmp_path: Path) -> None:
    prompt = prompts_of([12], seed=2)[0]
    plain_dir = save_hf_model(tmp_path / "plain", seed=4)
    path = hf_greedy(plain_dir, [prompt], NEW).tokens[0]
    eos = path[2]
    first = path.index(eos)
    eos_dir = save_hf_model(tmp_path / "eos", seed=4, eos_token_id=eos)
    engine = engine_for(eos_dir)
    min_new, margin = hf_generate(eos_dir, prompt, [MinNewTokensLengthLogitsProcessor(len(prompt), 8, [eos])],
                                  eos=eos)
    assert margin >= MIN_MARGIN
    finishes: dict[str, list[str | None]] = {}
    tokens: dict[str, list[int]] = {}
    for name, params in {
        "plain": SamplingParams(max_tokens=NEW, temperature=0.0),
        "ignore_eos": SamplingParams(max_tokens=NEW, temperature=0.0, ignore_eos=True),
        "min_tokens": SamplingParams(max_tokens=NEW, temperature=0.0, min_tokens=8),
        # the request's own stop token: ends it even with ignore_eos, and is masked before min_tokens too
        "own_stop": SamplingParams(max_tokens=NEW, temperature=0.0, ignore_eos=True, stop_token_ids=(path[5],)),
        "own_stop_min": SamplingParams(max_tokens=NEW, temperature=0.0, ignore_eos=True, min_tokens=8,
                                       stop_token_ids=(eos,)),
    }.items():
        engine.add(EngineRequest(name, prompt, params))
        finishes[name], tokens[name] = [], []
    while engine.has_work():
        for step in engine.step():
            finishes[step.request_id].append(step.finish_reason)
            tokens[step.request_id].append(step.token_id)
    assert tokens["plain"] == path[: first + 1] and finishes["plain"][-1] == "stop"
    # through EOS, as if the model had none: the plain model's whole path, ended by max_tokens
    assert tokens["ignore_eos"] == path and finishes["ignore_eos"] == [None] * (NEW - 1) + ["length"]
    # no EOS among the first 8, then the path transformers takes with the same rule
    assert eos not in tokens["min_tokens"][:8] and len(tokens["min_tokens"]) > 8
    assert tokens["min_tokens"] == min_new[: len(tokens["min_tokens"])]
    assert finishes["min_tokens"][-1] == ("stop" if tokens["min_tokens"][-1] == eos else "length")
    assert tokens["own_stop"] == path[: path.index(path[5]) + 1] and finishes["own_stop"][-1] == "stop"
    assert tokens["own_stop_min"] == tokens["min_tokens"]  # the same rule for a stop_token_id as for EOS
