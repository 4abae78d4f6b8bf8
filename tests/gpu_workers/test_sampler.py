"""The sampler: greedy, temperature, top-k, top-p, and draws that depend only on (seed, step)."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from gpu_workers.sampler import sample
from gpu_workers.sampling_params import SamplingParams

GREEDY = SamplingParams(temperature=0.0)
NEG_INF = float("-inf")


def draws(logits: torch.Tensor, params: SamplingParams, *, seeds: range, step: int = 0) -> list[int]:
    """One draw per seed from the same row of logits, all in one batch."""
    n = len(seeds)
    return sample(logits.expand(n, -1).contiguous(), [params] * n, seeds=list(seeds), steps=[step] * n)


def chi_square(counts: Counter[int], probs: torch.Tensor) -> float:
    total = sum(counts.values())
    return sum((counts.get(i, 0) - total * p) ** 2 / (total * p) for i, p in enumerate(probs.tolist()) if p > 0)


def test_greedy_rows_take_the_argmax() -> None:
    logits = torch.randn(16, 100, generator=torch.Generator().manual_seed(1))
    expected = logits.argmax(dim=-1).tolist()
    assert sample(logits, [GREEDY] * 16, seeds=[7] * 16, steps=range(16)) == expected
    # Greedy rows mixed with sampled ones still take the argmax.
    mixed = [GREEDY if i % 2 == 0 else SamplingParams(temperature=1.5) for i in range(16)]
    out = sample(logits, mixed, seeds=list(range(16)), steps=[0] * 16)
    assert [out[i] for i in range(0, 16, 2)] == expected[::2]


@pytest.mark.parametrize("temperature", [1e-30, 0.5, 1.0, 100.0, 1e6])
def test_top_k_1_is_the_argmax_at_any_temperature(temperature: float) -> None:
    logits = torch.randn(32, 50, generator=torch.Generator().manual_seed(2))
    params = [SamplingParams(temperature=temperature, top_k=1)] * 32
    assert sample(logits, params, seeds=list(range(32)), steps=[3] * 32) == logits.argmax(dim=-1).tolist()


def test_top_k_restricts_support_to_the_k_largest() -> None:
    logits = torch.randn(1, 40, generator=torch.Generator().manual_seed(3))
    top5 = set(logits[0].topk(5).indices.tolist())
    seen = set(draws(logits, SamplingParams(temperature=3.0, top_k=5), seeds=range(600)))
    assert seen == top5
    # Without top-k the same seeds reach far beyond those five.
    assert len(set(draws(logits, SamplingParams(temperature=3.0), seeds=range(600)))) > 20


def nucleus_logits() -> tuple[torch.Tensor, list[int]]:
    """Probabilities 0.5, 0.3, 0.15, 0.05 at scattered ids of a vocab of 8; ids in rank order."""
    ranked = [5, 1, 6, 2]
    probs = torch.zeros(8)
    probs[ranked] = torch.tensor([0.5, 0.3, 0.15, 0.05])
    return probs.log().unsqueeze(0), ranked


@pytest.mark.parametrize(("top_p", "size"), [(0.3, 1), (0.45, 1), (0.79, 2), (0.81, 3), (0.96, 4), (1.0, 4)])
def test_top_p_keeps_the_smallest_set_reaching_the_mass(top_p: float, size: int) -> None:
    logits, ranked = nucleus_logits()
    seen = set(draws(logits, SamplingParams(temperature=1.0, top_p=top_p), seeds=range(1000)))
    assert seen == set(ranked[:size])


def test_top_p_applies_to_what_top_k_leaves() -> None:
    logits, ranked = nucleus_logits()
    # Alone, top_p 0.84 needs 0.5 + 0.3 + 0.15; after top-k 3 the first two already hold 0.8 / 0.95.
    alone = set(draws(logits, SamplingParams(temperature=1.0, top_p=0.84), seeds=range(1000)))
    after_k = set(draws(logits, SamplingParams(temperature=1.0, top_k=3, top_p=0.84), seeds=range(1000)))
    assert alone == set(ranked[:3])
    assert after_k == set(ranked[:2])


def test_top_p_follows_the_temperature() -> None:
    logits, ranked = nucleus_logits()
    # At T=4 the four probabilities flatten to about 0.32, 0.28, 0.23, 0.17: 0.79 needs three.
    seen = set(draws(logits, SamplingParams(temperature=4.0, top_p=0.79), seeds=range(1000)))
    assert seen == set(ranked[:3])


# Chi-square bounds at p = 0.001 by degrees of freedom: an honest sampler fails one about once in
# a thousand seed sets (and these seed sets are fixed, so a pass is a pass for good).
CHI2_999 = {1: 10.83, 2: 13.82, 3: 16.27, 4: 18.47, 5: 20.52, 6: 22.46, 7: 24.32}


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_frequencies_follow_softmax_of_logits_over_temperature(temperature: float) -> None:
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, NEG_INF, -2.0, 1.5]])
    counts = Counter(draws(logits, SamplingParams(temperature=temperature), seeds=range(20_000)))
    expected = torch.softmax(logits[0] / temperature, dim=-1)
    assert 5 not in counts
    assert chi_square(counts, expected) < CHI2_999[7 - 1]  # 7 tokens can be drawn
    # The same counts are far from the distribution at another temperature.
    other = torch.softmax(logits[0] / (temperature * 2), dim=-1)
    assert chi_square(counts, other) > 10 * CHI2_999[6]


def test_frequencies_after_top_k_and_top_p_follow_the_renormalized_distribution() -> None:
    logits = torch.tensor([[3.0, 2.5, 2.0, 1.0, 0.5, 0.0, -0.5, -1.0, 1.8]])
    params = SamplingParams(temperature=0.8, top_k=6, top_p=0.9)
    counts = Counter(draws(logits, params, seeds=range(20_000), step=11))
    probs = torch.softmax(logits[0] / 0.8, dim=-1)
    order = probs.argsort(descending=True)
    kept = order[:6]
    renorm = probs[kept] / probs[kept].sum()
    size = int((renorm.cumsum(0) - renorm < 0.9).sum())  # the nucleus of the top 6
    expected = torch.zeros_like(probs)
    expected[kept[:size]] = renorm[:size] / renorm[:size].sum()
    assert set(counts) == set(kept[:size].tolist())
    assert chi_square(counts, expected) < CHI2_999[size - 1]


def test_a_row_depends_only_on_its_logits_params_seed_and_step() -> None:
    gen = torch.Generator().manual_seed(4)
    row = torch.randn(1, 500, generator=gen)
    params = SamplingParams(temperature=1.3, top_p=0.95)
    alone = {(seed, step): sample(row, [params], seeds=[seed], steps=[step])[0]
             for seed in (0, 1, -5, 2**64 - 1) for step in (0, 1, 1000)}
    neighbours = [GREEDY, SamplingParams(temperature=0.7, top_k=10), SamplingParams(temperature=2.0, top_p=0.5)]
    for (seed, step), token in alone.items():
        for position in (0, 3, 6):
            batch = torch.randn(7, 500, generator=gen)
            batch[position] = row[0]
            params_list = [neighbours[i % 3] for i in range(7)]
            params_list[position] = params
            seeds = [int(s) for s in torch.randint(0, 2**31, (7,), generator=gen)]
            seeds[position] = seed
            steps = [int(s) for s in torch.randint(0, 50, (7,), generator=gen)]
            steps[position] = step
            torch.manual_seed(position)  # the global generator plays no part
            assert sample(batch, params_list, seeds=seeds, steps=steps)[position] == token


def test_different_steps_and_seeds_draw_differently() -> None:
    flat = torch.zeros(1, 1000)
    params = SamplingParams(temperature=1.0)
    by_step = [sample(flat, [params], seeds=[42], steps=[step])[0] for step in range(200)]
    assert len(set(by_step)) > 150  # 200 uniform draws from 1000 give ~181 distinct values
    by_seed = draws(flat, params, seeds=range(200), step=0)
    assert len(set(by_seed)) > 150
    assert by_step != by_seed


def test_extreme_logits_and_temperatures_give_valid_tokens() -> None:
    vocab = 64
    rows = torch.randn(6, vocab, generator=torch.Generator().manual_seed(5))
    rows[0, :] = NEG_INF
    rows[0, 17] = 1.0  # one finite logit among -inf
    rows[1, :] = NEG_INF  # nothing finite at all
    rows[2, 40] = float("inf")
    rows[3] *= 1e37  # huge finite logits
    rows[4, 3] = float("nan")
    rows[5, :] = -1e30
    for temperature in (1e-45, 1e-20, 1e-3, 1.0, 1e3, 1e6):
        for extra in ({}, {"top_k": 5}, {"top_p": 0.5}, {"top_k": 5, "top_p": 0.5}):
            params = [SamplingParams(temperature=temperature, **extra)] * 6
            out = sample(rows, params, seeds=list(range(6)), steps=[9] * 6)
            assert all(0 <= t < vocab for t in out)
            assert out[0] == 17
            assert out[2] == 40
            assert out[4] != 3


def test_a_tiny_temperature_is_greedy() -> None:
    logits = torch.randn(20, 300, generator=torch.Generator().manual_seed(6))
    params = [SamplingParams(temperature=1e-6)] * 20
    assert sample(logits, params, seeds=list(range(20)), steps=[0] * 20) == logits.argmax(dim=-1).tolist()


def test_a_huge_temperature_is_near_uniform() -> None:
    logits = torch.tensor([[10.0, 0.0, -10.0, 5.0]])
    counts = Counter(draws(logits, SamplingParams(temperature=1e6), seeds=range(8000)))
    assert chi_square(counts, torch.full((4,), 0.25)) < CHI2_999[3]


def test_the_caller_logits_are_left_alone() -> None:
    logits = torch.randn(4, 30, generator=torch.Generator().manual_seed(7))
    before = logits.clone()
    params = [SamplingParams(temperature=0.9, top_k=4, top_p=0.8), GREEDY, SamplingParams(temperature=2.0)] + [
        SamplingParams(temperature=0.5, top_p=0.3)
    ]
    sample(logits, params, seeds=[1, 2, 3, 4], steps=[0, 1, 2, 3])
    assert torch.equal(logits, before)


def test_rows_and_arguments_must_agree() -> None:
    with pytest.raises(ValueError, match="2 logit rows"):
        sample(torch.zeros(2, 5), [GREEDY], seeds=[0, 0], steps=[0, 0])


def test_the_draw_is_close_to_uniform_over_seeds() -> None:
    # The per-row uniform numbers, seen through a flat distribution: every bucket gets its share.
    flat = torch.zeros(1, 8)
    counts = Counter(draws(flat, SamplingParams(temperature=1.0), seeds=range(-4000, 4000), step=3))
    assert chi_square(counts, torch.full((8,), 1 / 8)) < CHI2_999[7]
