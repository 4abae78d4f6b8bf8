"""BlockManager: ref counts, chained block hashes, prefix hits only on computed blocks, the LRU of
free cached blocks, hit-rate stats and all-or-nothing allocation."""

from __future__ import annotations

from collections import Counter

import pytest

from gpu_workers.block_manager import NULL_BLOCK, BlockManager, KVCacheGroups, block_hash
from gpu_workers.sequence import Sequence

BS = 4


def seq(rid: str, tokens: list[int]) -> Sequence:
    return Sequence(rid, tokens, len(tokens))


def compute(bm: BlockManager, s: Sequence, num_tokens: int | None = None) -> None:
    """What a step does for ``s``: its K/V up to ``num_tokens`` (all tokens by default) are written."""
    s.num_computed_tokens = s.num_tokens if num_tokens is None else num_tokens
    bm.mark_computed(s)


def check_refs(bm: BlockManager, *live: Sequence) -> None:
    g, sliding = bm.groups.num_groups, [w is not None for w in bm.groups.windows]
    held = Counter(b for s in live for i, b in enumerate(s.block_table)
                   if not (sliding[i % g] and i // g < s.num_released_blocks))
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
    bm = BlockManager(6, BS, groups=KVCacheGroups((8,), ((0, 1),)))  # every layer slides over 8 tokens
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


# -- KV cache groups: sliding-window layers beside global ones (Gemma 3) ---------------------------

GEMMA3_270M = [None if (i + 1) % 6 == 0 else 512 for i in range(18)]  # 5 sliding layers, then 1 global


def test_kv_cache_groups_split_layers_by_kind_into_equal_groups() -> None:
    groups = KVCacheGroups.of(GEMMA3_270M)
    assert groups.windows == (None, 512, 512, 512, 512, 512) and groups.layers_per_block == 3
    assert groups.layers[0] == (5, 11, 17) and groups.layers[1] == (0, 1, 2) and groups.layers[2] == (3, 4, 6)
    assert groups.locate(11) == (0, 1) and groups.locate(6) == (2, 2)
    assert KVCacheGroups.of([None] * 4) == KVCacheGroups((None,), ((0, 1, 2, 3),))
    assert KVCacheGroups.of([7, 7]) == KVCacheGroups.single([7, 7]) == KVCacheGroups((7,), ((0, 1),))
    assert KVCacheGroups.of([7, None, 7]).layers == ((1,), (0,), (2,))
    assert KVCacheGroups.single(GEMMA3_270M) == KVCacheGroups((None,), (tuple(range(18)),))


def test_sliding_groups_hold_only_their_window_at_long_contexts() -> None:
    """The memory saved, in blocks of one layer: Gemma 3 270M's layout (16-token blocks of 3 layers)
    holds 677 blocks (2031 layer-blocks) for an 8192-token sequence, where every layer keeping every
    block takes 512 blocks of 18 layers (9216 layer-blocks): 4.5x less; 5.6x at 32768 tokens. The
    bound is 6x: the 3 global layers of 18 keep everything."""
    groups = KVCacheGroups.of(GEMMA3_270M)
    everything = KVCacheGroups.single(GEMMA3_270M)

    def layer_blocks(g: KVCacheGroups, num_tokens: int) -> int:
        return g.peak_blocks(num_tokens, 16) * g.layers_per_block

    assert groups.window_blocks(1, 16) == 33  # 511 keys before the query, then its own, over 16-token blocks
    assert groups.peak_blocks(8192, 16) == 512 + 5 * 33 == 677
    assert (layer_blocks(groups, 8192), layer_blocks(everything, 8192)) == (2031, 9216)
    assert (layer_blocks(groups, 32768), layer_blocks(everything, 32768)) == (6639, 36864)
    assert 5.5 < 36864 / 6639 < 6
    assert groups.peak_blocks(100, 16) == 6 * 7  # within the window: every group holds every block


def test_a_hybrid_sequence_interleaves_groups_and_gives_back_sliding_blocks_only() -> None:
    groups = KVCacheGroups((None, 8), ((1,), (0,)))  # group 0 global, group 1 slides over 8 tokens
    bm = BlockManager(20, BS, groups=groups)
    a = seq("a", list(range(30)))
    assert bm.allocate(a, 30)
    assert len(a.block_table) == 2 * 8 and bm.num_free_blocks == 4
    assert (bm.capacity_tokens, bm.used_tokens) == (40, 32)
    assert bm.num_appendable_tokens(a) == (8 + 2) * BS
    compute(bm, a, 20)
    # the next query (position 20) sees keys 13..20: blocks 0-2 of the sliding group are out
    assert bm.release_out_of_window(a) == 3 and a.num_released_blocks == 3
    check_refs(bm, a)
    assert bm.num_free_blocks == 7
    assert bm.release_out_of_window(a) == 0
    bm.free(a)
    check_refs(bm)
    assert bm.num_free_blocks == 20


def _served_and_freed(num_blocks: int) -> tuple[BlockManager, Sequence]:
    """A manager with a global group and one sliding over 8 tokens, after a 25-token sequence ran
    (its sliding blocks before the window given back on the way) and finished: all cached."""
    bm = BlockManager(num_blocks, BS, groups=KVCacheGroups((None, 8), ((1,), (0,))))
    a = seq("a", list(range(25)))
    assert bm.allocate(a, 25)
    compute(bm, a, 24)
    assert bm.release_out_of_window(a) == 4  # the query at 24 sees keys 17..24: sliding blocks 0-3 out
    compute(bm, a, 25)
    bm.free(a)
    return bm, a


def test_a_prefix_hit_needs_the_sliding_groups_blocks_only_within_the_window() -> None:
    """Like vLLM's sliding-window manager: a hit of n blocks needs every global block before it, but
    the sliding group's only from the block of the first key the next query sees; earlier entries
    are placeholders, counted as released."""
    bm, _ = _served_and_freed(20)
    b = seq("b", list(range(25)) + [7])
    assert bm.allocate(b, 26)
    # 6 blocks hit: the query at 24 sees keys 17..24, so sliding blocks 4 and 5 (keys 16-23) serve it
    assert b.num_cached_tokens == 24 and b.num_released_blocks == 4
    assert [b.block_table[2 * i + 1] for i in range(4)] == [NULL_BLOCK] * 4
    assert all(b.block_table[2 * i] != NULL_BLOCK for i in range(7))
    check_refs(bm, b)
    bm.free(b)
    check_refs(bm)


def test_a_sliding_block_evicted_inside_the_window_shortens_the_hit() -> None:
    bm, a = _served_and_freed(24)
    chain = bm._chain(a, 6).hashes
    ids = {h: b.block_id for b in bm.blocks if (h := b.hash) is not None}
    sliding = [ids[bm._group_hash(chain[i], 1)] for i in (1, 5)]  # one before the window, one inside
    for block_id in reversed(sliding):
        bm._cached_free[0].move_to_end(block_id, last=False)  # next to be evicted
    hog = seq("hog", [99] * (len(bm._fresh[0]) * BS // 2 + 1))  # takes every fresh block and two cached
    assert bm.allocate(hog, hog.num_tokens)
    assert all(bm.blocks[b].hash is None for b in sliding)
    bm.free(hog)
    c = seq("c", list(range(25)) + [7])
    assert bm.allocate(c, 26)
    # 6 blocks would need sliding 4 and 5; 5 blocks need sliding 3 and 4 (1 is before that window)
    assert c.num_cached_tokens == 20 and c.num_released_blocks == 3
    check_refs(bm, c)


def test_longest_sequence_counts_the_window_only_once() -> None:
    groups = KVCacheGroups((None, 8), ((1,), (0,)))
    bm = BlockManager(20, BS, groups=groups)
    # one global block per 4 tokens plus the sliding group's (8 + 1 - 2) // 4 + 2 = 3 at most
    assert bm.longest_sequence(1) == 17 * BS
    assert BlockManager(20, BS).longest_sequence(5) == 20 * BS
    sliding = BlockManager(6, BS, groups=KVCacheGroups((8,), ((0,),)))
    assert sliding.longest_sequence(1) is None and sliding.longest_sequence(16) == 6 * BS


def test_a_staged_format_takes_sinks_and_staging_blocks_from_the_dense_pool() -> None:
    """With dense blocks (the staged fp8 format): every sequence's block 0 (its sink) and its staging
    block are dense ids (``num_blocks`` on), the rest fp8 ones; a shared prefix shares its sink;
    allocation waits when either pool is short, all or nothing; free gives back both kinds."""
    bm = BlockManager(6, BS, num_dense_blocks=4)
    a = seq("a", list(range(10)))
    assert bm.allocate(a, 10)
    assert a.block_table[0] >= 6 and all(b < 6 for b in a.block_table[1:]) and len(a.staging) == 1
    assert a.staging[0] >= 6 and a.staging[0] != a.block_table[0]
    assert (bm.num_free_blocks, bm.num_free_dense_blocks) == (4, 2)
    compute(bm, a)
    b = seq("b", list(range(8)) + [99, 98])  # shares a's two full blocks, sink included
    assert bm.allocate(b, 4)
    assert b.block_table[:2] == a.block_table[:2] and b.num_cached_tokens == 8
    assert bm.blocks[a.block_table[0]].ref_count == 2 and (bm.num_free_blocks, bm.num_free_dense_blocks) == (3, 1)
    c = seq("c", [50, 51])  # an fp8 block is free, but no dense pair (sink + staging): nothing taken
    assert not bm.allocate(c, 4)
    assert (bm.num_free_blocks, bm.num_free_dense_blocks, c.block_table, c.staging) == (3, 1, [], [])
    bm.free(a)
    assert a.staging == [] and bm.num_free_dense_blocks == 2  # a's staging block; its sink is b's too
    assert bm.allocate(c, 4) and c.block_table[0] >= 6 and len(c.staging) == 1
    # all four dense blocks held (b's staging, the shared sink, c's two) while fp8 ones are free:
    # the dense pool is the tighter one, and the engine reports it (kv_used_tokens)
    assert bm.dense_utilization == 1.0 and bm.used_tokens < bm.capacity_tokens
    bm.free(b)
    bm.free(c)
    assert (bm.num_free_blocks, bm.num_free_dense_blocks) == (6, 4) and bm.dense_utilization == 0.0
    assert BlockManager(6, BS).dense_utilization == 0.0
    with pytest.raises(ValueError, match="num_dense_blocks >= 2"):
        BlockManager(6, BS, num_dense_blocks=1)
