"""BlockManager: ref counts, chained block hashes, prefix hits only on computed blocks, the LRU of
free cached blocks, hit-rate stats and all-or-nothing allocation."""

from __future__ import annotations

from collections import Counter

import pytest

from gpu_workers.block_manager import BlockManager, block_hash
from gpu_workers.sequence import Sequence

BS = 4


def seq(rid: str, tokens: list[int]) -> Sequence:
    return Sequence(rid, tokens, len(tokens))


def compute(bm: BlockManager, s: Sequence, num_tokens: int | None = None) -> None:
    """What a step does for ``s``: its K/V up to ``num_tokens`` (all tokens by default) are written."""
    s.num_computed_tokens = s.num_tokens if num_tokens is None else num_tokens
    bm.mark_computed(s)


def check_refs(bm: BlockManager, *live: Sequence) -> None:
    held = Counter(b for s in live for b in s.block_table[s.num_released_blocks :])
    assert [blk.ref_count for blk in bm.blocks] == [held[i] for i in range(bm.num_blocks)]
    assert bm.num_free_blocks == sum(1 for blk in bm.blocks if blk.ref_count == 0)
    assert bm.num_free_blocks + bm.num_used_blocks == bm.num_blocks


def test_allocate_and_free_track_ref_counts_and_stats() -> None:
    bm = BlockManager(8, BS)
    a = seq("a", list(range(10)))
    assert bm.allocate(a, 10)
    assert len(a.block_table) == 3 and len(set(a.block_table)) == 3
    assert a.num_computed_tokens == 0 and a.num_cached_tokens == 0
    check_refs(bm, a)
    assert (bm.num_free_blocks, bm.capacity_tokens, bm.used_tokens) == (5, 32, 12)

    bm.free(a)
    assert a.block_table == [] and a.num_computed_tokens == 0
    check_refs(bm)
    assert bm.used_tokens == 0


def test_allocate_reserves_only_the_first_chunk_and_ensure_capacity_grows() -> None:
    bm = BlockManager(8, BS)
    a = seq("a", list(range(20)))
    assert bm.allocate(a, 6)  # first chunk: tokens 0..5 -> 2 blocks
    assert len(a.block_table) == 2
    assert bm.ensure_capacity(a, 8)  # still inside block 2
    assert len(a.block_table) == 2
    assert bm.ensure_capacity(a, 9)
    assert len(a.block_table) == 3
    assert bm.num_appendable_tokens(a) == (3 + 5) * BS - a.num_computed_tokens


def test_block_hash_chains_the_prefix() -> None:
    first = block_hash(None, [1, 2, 3, 4])
    assert block_hash(None, [1, 2, 3, 4]) == first
    same_tokens_other_prefix = block_hash(block_hash(None, [9, 9, 9, 9]), [5, 6, 7, 8])
    assert block_hash(first, [5, 6, 7, 8]) != same_tokens_other_prefix
    assert block_hash(first, [5, 6, 7, 8]) != block_hash(None, [5, 6, 7, 8])
    assert block_hash(None, [1, 2, 3, 4]) != block_hash(None, [1, 2, 4, 3])


def test_same_block_tokens_after_a_different_prefix_do_not_hit() -> None:
    bm = BlockManager(16, BS)
    a = seq("a", [1, 1, 1, 1, 5, 6, 7, 8, 0])
    assert bm.allocate(a, 100)
    compute(bm, a)
    b = seq("b", [2, 2, 2, 2, 5, 6, 7, 8, 0])
    assert bm.allocate(b, 100)
    assert b.num_cached_tokens == 0
    assert not set(a.block_table) & set(b.block_table)


def test_shared_prefix_shares_physical_blocks() -> None:
    bm = BlockManager(16, BS)
    a = seq("a", list(range(10)))
    assert bm.allocate(a, 10)
    compute(bm, a)
    b = seq("b", list(range(8)) + [50, 51, 52])
    assert bm.allocate(b, 100)
    assert b.block_table[:2] == a.block_table[:2]
    assert b.block_table[2] != a.block_table[2]  # a's partial third block is never shared
    assert (b.num_computed_tokens, b.num_cached_tokens) == (8, 8)
    assert [bm.blocks[i].ref_count for i in a.block_table] == [2, 2, 1]
    check_refs(bm, a, b)

    bm.free(a)
    assert [bm.blocks[i].ref_count for i in b.block_table] == [1, 1, 1]
    check_refs(bm, b)


def test_prefix_hit_only_for_computed_blocks() -> None:
    bm = BlockManager(16, BS)
    a = seq("a", list(range(12)))
    assert bm.allocate(a, 12)  # all three blocks allocated, none computed yet
    b = seq("b", list(range(12)))
    assert bm.allocate(b, 12)
    assert b.num_cached_tokens == 0
    bm.free(b)

    compute(bm, a, 6)  # chunked prefill: only block 0 is full and computed
    c = seq("c", list(range(12)))
    assert bm.allocate(c, 12)
    assert c.num_cached_tokens == 4 and c.block_table[0] == a.block_table[0]
    bm.free(c)

    compute(bm, a, 12)
    d = seq("d", list(range(12)))
    assert bm.allocate(d, 12)
    # Never the whole sequence: the last token is computed again, for its logits.
    assert d.num_cached_tokens == 8 and d.block_table[:2] == a.block_table[:2]
    assert d.block_table[2] != a.block_table[2]


def test_freed_cached_blocks_are_revived_by_a_lookup() -> None:
    bm = BlockManager(8, BS)
    a = seq("a", list(range(9)))
    assert bm.allocate(a, 9)
    compute(bm, a)
    table = list(a.block_table)
    bm.free(a)
    assert bm.num_free_blocks == 8 and bm.num_cached_free_blocks == 2

    b = seq("b", list(range(9)))
    assert bm.allocate(b, 9)
    assert b.block_table[:2] == table[:2] and b.num_cached_tokens == 8
    assert bm.num_cached_free_blocks == 0
    check_refs(bm, b)


def test_fresh_blocks_before_cached_and_lru_evicts_tail_first() -> None:
    bm = BlockManager(6, BS)
    a = seq("a", list(range(13)))  # 3 full blocks + 1 token
    assert bm.allocate(a, 13)
    compute(bm, a)
    a_full = a.block_table[:3]
    bm.free(a)  # tail first: LRU order of cached blocks is a_full[2], a_full[1], a_full[0]

    # Three never-hashed free blocks (a's tail among them) go before any cached block is evicted.
    fresh = seq("f", [100] * 12)
    assert bm.allocate(fresh, 12)
    assert not set(fresh.block_table) & set(a_full)
    assert bm.num_cached_free_blocks == 3

    one = seq("g", [200] * 4)
    assert bm.allocate(one, 4)
    assert one.block_table == [a_full[2]]  # least recently used: a's tail
    assert bm.blocks[a_full[2]].hash is None

    # a's first two blocks are still cached; the third is gone, so the hit stops there.
    again = seq("a2", list(range(13)))
    assert bm.allocate(again, 13) is False  # needs 2 new blocks, none free beyond the 2 revived
    a3 = seq("a3", list(range(8)))
    assert bm.allocate(a3, 1)
    assert a3.block_table[0] == a_full[0] and a3.num_cached_tokens == 4


def test_revived_block_becomes_most_recently_used() -> None:
    bm = BlockManager(4, BS)
    x = seq("x", [1] * 5)
    y = seq("y", [2] * 5)
    for s in (x, y):
        assert bm.allocate(s, 5)
        compute(bm, s)
    x_block, y_block = x.block_table[0], y.block_table[0]
    bm.free(x)
    bm.free(y)  # LRU: x_block, then y_block (the unhashed tails went to the fresh list)
    x2 = seq("x2", [1] * 5)
    assert bm.allocate(x2, 1)  # revives x_block, plus one fresh block for its last token
    assert x2.block_table[0] == x_block and x2.num_cached_tokens == 4
    bm.free(x2)  # x_block is now the most recently used
    hog = seq("h", [9] * 12)
    assert bm.allocate(hog, 12)  # 2 fresh blocks, then evicts the LRU cached one: y_block
    assert y_block in hog.block_table and x_block not in hog.block_table


def test_hit_rate_counts_tokens() -> None:
    bm = BlockManager(16, BS)
    assert bm.hit_rate == 0.0
    a = seq("a", list(range(10)))
    assert bm.allocate(a, 10)
    compute(bm, a)
    b = seq("b", list(range(10)))
    assert bm.allocate(b, 10)
    assert (bm.prefix_query_tokens, bm.prefix_hit_tokens) == (20, 8)
    assert bm.hit_rate == pytest.approx(8 / 20)


def test_failed_allocate_changes_nothing() -> None:
    bm = BlockManager(4, BS)
    a = seq("a", list(range(9)))
    assert bm.allocate(a, 9)
    compute(bm, a)
    bm.free(a)  # two cached free blocks, two fresh
    hog = seq("h", [7] * 4)
    assert bm.allocate(hog, 4)  # takes a fresh block: 3 free left, 2 of them cached
    before = ([(b.ref_count, b.hash) for b in bm.blocks], bm.num_free_blocks, bm.prefix_query_tokens)

    # Hits 2 cached blocks (reviving both) and needs 3 more for 20 tokens: only 1 would be left.
    b = seq("b", list(range(20)))
    assert bm.allocate(b, 20) is False
    assert b.block_table == [] and b.num_computed_tokens == 0 and b.num_cached_tokens == 0
    assert ([(x.ref_count, x.hash) for x in bm.blocks], bm.num_free_blocks, bm.prefix_query_tokens) == before

    assert bm.ensure_capacity(hog, 4 * BS + 1) is False
    assert len(hog.block_table) == 1
    assert bm.ensure_capacity(hog, 4 * BS)
    assert len(hog.block_table) == 4 and bm.num_free_blocks == 0


def test_concurrent_identical_prompts_keep_the_first_cached_copy() -> None:
    bm = BlockManager(8, BS)
    a, b = seq("a", list(range(5))), seq("b", list(range(5)))
    assert bm.allocate(a, 5) and bm.allocate(b, 5)  # both miss: nothing computed yet
    compute(bm, a)
    compute(bm, b)
    assert bm.blocks[a.block_table[0]].hash is not None
    assert bm.blocks[b.block_table[0]].hash is None  # a duplicate stays private
    a_block = a.block_table[0]
    bm.free(b)
    bm.free(a)
    c = seq("c", list(range(5)))
    assert bm.allocate(c, 1)
    assert c.block_table[0] == a_block and c.num_cached_tokens == 4


def test_prefix_caching_off_never_hits() -> None:
    bm = BlockManager(8, BS, prefix_caching=False)
    a = seq("a", list(range(9)))
    assert bm.allocate(a, 9)
    compute(bm, a)
    b = seq("b", list(range(9)))
    assert bm.allocate(b, 9)
    assert b.num_cached_tokens == 0 and not set(a.block_table) & set(b.block_table)
    assert all(blk.hash is None for blk in bm.blocks)
    assert bm.hit_rate == 0.0


def test_allocate_rejects_a_sequence_that_already_holds_blocks() -> None:
    bm = BlockManager(8, BS)
    a = seq("a", [1, 2, 3])
    assert bm.allocate(a, 3)
    with pytest.raises(ValueError, match="holds no blocks"):
        bm.allocate(a, 3)


def test_release_before_gives_back_leading_blocks_once() -> None:
    """Blocks wholly before a sliding window go back while the sequence runs: they stay listed
    (stale) in its table, others can take them, a cached one stays findable, and ``free`` releases
    only the rest."""
    bm = BlockManager(6, BS)
    a = seq("a", list(range(14)))
    assert bm.allocate(a, 14)
    first = list(a.block_table)
    compute(bm, a, 9)
    assert bm.release_before(a, 3) == 2  # only computed blocks: block 2 holds uncomputed token 9
    assert a.block_table == first and a.num_released_blocks == 2
    check_refs(bm, a)
    assert bm.release_before(a, 2) == 0  # nothing twice
    b = seq("b", list(range(6)))  # a's first block (tokens 0-3) is still cached
    assert bm.allocate(b, 6) and b.block_table[0] == first[0] and b.num_cached_tokens == 4
    check_refs(bm, a, b)
    c = seq("c", [99] * 8)
    assert bm.allocate(c, 8)  # the last fresh block, then a's second one, evicted from the cache
    assert first[1] in c.block_table
    check_refs(bm, a, b, c)
    bm.free(a)
    assert a.num_released_blocks == 0 and a.block_table == []
    check_refs(bm, b, c)
