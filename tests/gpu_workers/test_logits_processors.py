"""The sampling controls against transformers' logits processors on the same logits: logit bias,
bad words, min_tokens, repetition/frequency/presence penalties, min-p; mixed in one batch."""

from __future__ import annotations

import math
import random
from collections import Counter

import pytest
import torch
from transformers import (
    MinNewTokensLengthLogitsProcessor,
    MinPLogitsWarper,
    NoBadWordsLogitsProcessor,
    RepetitionPenaltyLogitsProcessor,
    SequenceBiasLogitsProcessor,
    TemperatureLogitsWarper,
)

from gpu_workers.logits_processors import RowContext, apply_controls, bad_words_token_ids, is_controlled
from gpu_workers.sampler import sample
from gpu_workers.sampling_params import SamplingParams
from tests.gpu_workers.tokenizer_fixtures import backend, byte_level_json

VOCAB = 64
EOS = 7
NEG_INF = float("-inf")


def random_logits(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, VOCAB, generator=torch.Generator().manual_seed(seed)) * 3


def random_context(rng: random.Random, *, prompt: int = 12, output: int = 9, **extra: object) -> RowContext:
    # Few distinct ids, so that tokens repeat and the penalties meet counts above 1.
    tokens = [rng.randrange(20) for _ in range(prompt + output)]
    return RowContext(tokens, prompt, **extra)  # type: ignore[arg-type]


def frequency_presence_reference(row: torch.Tensor, output: list[int], frequency: float, presence: float) -> torch.Tensor:
    """OpenAI's definition: mu[j] - c[j] * frequency - (c[j] > 0) * presence, over the output's counts."""
    out = row.clone()
    for token, count in Counter(output).items():
        out[token] -= count * frequency + presence
    return out


def controlled(logits: torch.Tensor, params: list[SamplingParams], contexts: list[RowContext]) -> torch.Tensor:
    x = logits.clone()
    apply_controls(x, params, contexts)
    return x


@pytest.mark.parametrize("penalty", [0.5, 1.3, 2.0])
def test_repetition_penalty_matches_transformers(penalty: float) -> None:
    rng = random.Random(1)
    logits = random_logits(6, seed=1)
    contexts = [random_context(rng) for _ in range(6)]
    params = [SamplingParams(repetition_penalty=penalty)] * 6
    got = controlled(logits, params, contexts)
    for i, ctx in enumerate(contexts):
        # transformers penalizes every token of input_ids: prompt and output, as vLLM does
        expected = RepetitionPenaltyLogitsProcessor(penalty)(torch.tensor([ctx.token_ids]), logits[i : i + 1])
        torch.testing.assert_close(got[i], expected[0], rtol=0, atol=0)


@pytest.mark.parametrize("frequency,presence", [(0.7, 0.0), (0.0, 1.5), (-0.4, 0.9), (2.0, -2.0)])
def test_frequency_and_presence_penalties_count_output_tokens_only(frequency: float, presence: float) -> None:
    rng = random.Random(2)
    logits = random_logits(5, seed=2)
    contexts = [random_context(rng) for _ in range(5)]
    got = controlled(logits, [SamplingParams(frequency_penalty=frequency, presence_penalty=presence)] * 5, contexts)
    for i, ctx in enumerate(contexts):
        output = list(ctx.token_ids[ctx.num_prompt_tokens :])
        expected = frequency_presence_reference(logits[i], output, frequency, presence)
        torch.testing.assert_close(got[i], expected, rtol=1e-6, atol=1e-5)
    # a token only in the prompt is left alone
    only_prompt = set(contexts[0].token_ids[: contexts[0].num_prompt_tokens]) - set(contexts[0].token_ids[12:])
    for token in only_prompt:
        assert got[0, token] == logits[0, token]


def test_logit_bias_matches_transformers_sequence_bias() -> None:
    logits = random_logits(3, seed=3)
    bias = ((0, 100.0), (5, -100.0), (17, 2.5), (63, -0.25))
    params = [SamplingParams(logit_bias=bias), SamplingParams(), SamplingParams(logit_bias=((5, 1.0),))]
    contexts = [RowContext([1, 2, 3], 3)] * 3
    got = controlled(logits, params, contexts)
    for i, p in enumerate(params):
        expected = logits[i : i + 1]
        if p.logit_bias:
            processor = SequenceBiasLogitsProcessor(sequence_bias=[[[t], b] for t, b in p.logit_bias])
            expected = processor(torch.tensor([[1, 2, 3]]), expected.clone())
        torch.testing.assert_close(got[i], expected[0], rtol=0, atol=1e-6)


@pytest.mark.parametrize("generated", [0, 1, 4, 5, 9])
def test_min_tokens_masks_the_stop_ids_like_transformers(generated: int) -> None:
    logits = random_logits(1, seed=4)
    prompt = [3, 9, 11]
    tokens = prompt + [20 + i for i in range(generated)]
    stop_ids = frozenset({EOS, 40})
    got = controlled(logits, [SamplingParams(min_tokens=5, max_tokens=16)], [RowContext(tokens, 3, stop_ids)])
    processor = MinNewTokensLengthLogitsProcessor(len(prompt), 5, sorted(stop_ids))
    expected = processor(torch.tensor([tokens]), logits.clone())
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert (got[0, EOS] == NEG_INF) == (generated < 5)


def test_bad_words_match_transformers_over_the_output() -> None:
    words = ((13,), (21, 22), (30, 31, 32), (3, 4))
    outputs = [[1, 2, 21], [30, 31], [5, 30, 31], [21], [9, 9, 9], [4, 3]]
    prompt = [3, 21, 30, 31]  # bad-word prefixes in the prompt do not count (vLLM looks at the output)
    logits = random_logits(len(outputs), seed=5)
    contexts = [RowContext(prompt + out, len(prompt), bad_words_ids=words) for out in outputs]
    got = controlled(logits, [SamplingParams()] * len(outputs), contexts)
    processor = NoBadWordsLogitsProcessor([list(w) for w in words], eos_token_id=EOS)
    for i, out in enumerate(outputs):
        expected = processor(torch.tensor([out or [0]]), logits[i : i + 1].clone())
        torch.testing.assert_close(got[i], expected[0], rtol=0, atol=0)
    assert got[0, 22] == NEG_INF and got[1, 32] == NEG_INF and got[3, 22] == NEG_INF
    assert got[4, 22] != NEG_INF and got[4, 13] == NEG_INF  # a one-token word is always banned


def test_bad_words_are_tokenized_as_vllm_does() -> None:
    from gpu_workers.hf_tokenizer import HFTokenizer

    tokenizer = HFTokenizer(backend(byte_level_json()))

    def plain(text: str) -> tuple[int, ...]:
        return tuple(tokenizer.encode(text, add_special_tokens=False))

    assert len(plain("quick")) == len(plain(" quick")) == 1 and len(plain("fox")) != len(plain(" fox"))
    # As written (leading spaces stripped), and with a leading space only where that is another
    # token sequence of the same length (vLLM's SamplingParams.update_from_tokenizer).
    assert set(bad_words_token_ids(["quick", " fox"], tokenizer)) == {plain("quick"), plain(" quick"), plain("fox")}


def test_min_p_keeps_what_transformers_min_p_keeps() -> None:
    logits = torch.tensor([[4.0, 3.5, 3.0, 1.0, 0.5, -2.0, -5.0, 2.9]])
    for temperature, min_p in ((1.0, 0.2), (0.5, 0.05), (2.0, 0.5), (1.0, 1.0)):
        scores = TemperatureLogitsWarper(temperature)(None, logits.clone())
        kept = MinPLogitsWarper(min_p)(None, scores).isfinite()[0].nonzero().flatten().tolist()
        params = SamplingParams(temperature=temperature, min_p=min_p)
        n = 400
        drawn = sample(logits.expand(n, -1).contiguous(), [params] * n, seeds=list(range(n)), steps=[0] * n)
        assert set(drawn) == set(kept), (temperature, min_p)


def test_a_mixed_batch_applies_each_row_its_own_controls() -> None:
    rng = random.Random(6)
    logits = random_logits(8, seed=6)
    stop_ids = frozenset({EOS})
    params = [
        SamplingParams(),
        SamplingParams(repetition_penalty=1.7, frequency_penalty=0.3, presence_penalty=0.2),
        SamplingParams(logit_bias=((EOS, 5.0), (2, -3.0))),
        SamplingParams(min_tokens=50, max_tokens=60),
        SamplingParams(),
        SamplingParams(repetition_penalty=0.8, logit_bias=((2, 1.0),)),
        SamplingParams(presence_penalty=-1.0),
        SamplingParams(),
    ]
    contexts = [random_context(rng, stop_ids=stop_ids) for _ in params]
    contexts[4] = random_context(rng, bad_words_ids=((13,), (5, 6)))
    got = controlled(logits, params, contexts)
    for i, (p, ctx) in enumerate(zip(params, contexts)):
        ids = torch.tensor([list(ctx.token_ids)])
        row = logits[i : i + 1].clone()
        if p.logit_bias:
            row = SequenceBiasLogitsProcessor(sequence_bias=[[[t], b] for t, b in p.logit_bias])(ids, row)
        if ctx.bad_words_ids:
            output = list(ctx.token_ids[ctx.num_prompt_tokens :])
            row = NoBadWordsLogitsProcessor([list(w) for w in ctx.bad_words_ids], eos_token_id=EOS)(
                torch.tensor([output]), row)
        if p.min_tokens:
            row = MinNewTokensLengthLogitsProcessor(ctx.num_prompt_tokens, p.min_tokens, [EOS])(ids, row)
        if p.repetition_penalty != 1.0:
            row = RepetitionPenaltyLogitsProcessor(p.repetition_penalty)(ids, row)
        row = frequency_presence_reference(row[0], list(ctx.token_ids[ctx.num_prompt_tokens :]),
                                           p.frequency_penalty, p.presence_penalty)
        torch.testing.assert_close(got[i], row, rtol=1e-6, atol=1e-5)
    assert is_controlled(params[3], contexts[3]) and not is_controlled(params[0], contexts[0])


def test_greedy_rows_take_the_argmax_of_the_controlled_logits() -> None:
    logits = random_logits(4, seed=7)
    top = logits.argmax(dim=-1).tolist()
    params = [SamplingParams(temperature=0.0, logit_bias=((top[0], -100.0),)),
              SamplingParams(temperature=0.0),
              SamplingParams(temperature=0.0, repetition_penalty=2.0),
              SamplingParams(temperature=0.0, min_tokens=3, max_tokens=8)]
    contexts = [RowContext([1], 1), RowContext([1], 1), RowContext([top[2]] * 3, 1),
                RowContext([1, 2], 1, frozenset({top[3]}))]
    expected = controlled(logits, params, contexts).argmax(dim=-1).tolist()
    got = sample(logits, params, seeds=[0] * 4, steps=[0] * 4, contexts=contexts)
    assert got == expected
    assert got[1] == top[1] and got[0] != top[0] and got[3] != top[3]
    assert math.isfinite(float(logits[0, got[0]]))


def test_seeded_draws_with_controls_are_reproducible_in_any_batch() -> None:
    rng = random.Random(8)
    logits = random_logits(6, seed=8)
    params = [SamplingParams(temperature=0.9, repetition_penalty=1.4, min_p=0.05, seed=i) for i in range(6)]
    contexts = [random_context(rng) for _ in range(6)]
    together = sample(logits, params, seeds=list(range(6)), steps=[9] * 6, contexts=contexts)
    alone = [sample(logits[i : i + 1], params[i : i + 1], seeds=[i], steps=[9], contexts=contexts[i : i + 1])[0]
             for i in range(6)]
    assert together == alone
