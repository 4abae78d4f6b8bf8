"""Sequence: token counts for fresh and migrated requests, and the checks at construction."""

from __future__ import annotations

import pytest

from gpu_workers.sequence import Sequence, SequenceStatus


def test_fresh_sequence_counts() -> None:
    seq = Sequence("a", [5, 6, 7], 3, priority=2, arrival=1.5)
    assert (seq.num_tokens, seq.num_output_tokens, seq.last_token) == (3, 0, 7)
    assert seq.num_uncomputed_tokens == 3
    assert seq.status is SequenceStatus.WAITING and seq.block_table == []
    seq.token_ids.append(9)
    seq.num_computed_tokens = 3
    assert (seq.num_tokens, seq.num_output_tokens, seq.last_token, seq.num_uncomputed_tokens) == (4, 1, 9, 1)


def test_migrated_sequence_counts_tokens_generated_elsewhere() -> None:
    seq = Sequence("m", [1, 2, 3, 40, 41], 3)
    assert seq.num_output_tokens == 2
    assert seq.last_token == 41


def test_token_ids_are_copied() -> None:
    prompt = [1, 2]
    seq = Sequence("c", prompt, 2)
    seq.token_ids.append(3)
    assert prompt == [1, 2]


def test_identity_not_value_equality() -> None:
    a, b = Sequence("x", [1], 1), Sequence("x", [1], 1)
    assert a != b
    assert len({a, b}) == 2


@pytest.mark.parametrize("num_prompt", [0, 4])
def test_prompt_length_checked(num_prompt: int) -> None:
    with pytest.raises(ValueError, match="num_prompt_tokens"):
        Sequence("p", [1, 2, 3], num_prompt)


def test_max_num_tokens_below_tokens_rejected() -> None:
    with pytest.raises(ValueError, match="max_num_tokens"):
        Sequence("p", [1, 2, 3], 3, max_num_tokens=2)
