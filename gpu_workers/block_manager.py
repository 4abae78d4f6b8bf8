"""The paged KV cache's bookkeeping: fixed-size blocks, ref counts, and automatic prefix caching.

The cache is ``num_blocks`` blocks of ``block_size`` token slots each; a sequence's ``block_table``
maps its i-th run of ``block_size`` tokens to a physical block. Plain Python, no torch: the model
runner owns the tensors, this module only decides which block holds which tokens.

KV cache groups (gpu_workers.kv_cache_groups): a block holds the K/V of one group's layers, and
each group has its own blocks, all from one shared pool: a sequence holds ``G`` blocks per
``block_size`` tokens, interleaved in its ``block_table`` (entry ``i * G + k`` is group ``k``'s
block for tokens ``[i * block_size, (i + 1) * block_size)``). A model whose layers are all of one
kind has one group and a plain table.

Sliding windows: a running sequence gives back its sliding groups' blocks wholly before the window
of its next token (``release_out_of_window``, after every step); they stay in the table as stale
ids (``num_released_blocks`` leading ones per sliding group).

Prefix caching: a full block is identified by a hash that chains the previous block's hash with its
own token ids, so equal hashes mean equal whole prefixes (plus the group, for a group's block). A
block is entered in the hash table only once its K/V have been computed (``mark_computed``), so a
lookup never hands out a block that is allocated but not filled yet (with chunked prefill a block
can wait several steps for its K/V). Sequences with a common prefix share its full blocks (ref
count > 1). A shared or hashed block is never written again: writes go to slots at or after
``num_computed_tokens``, which lie in blocks past every full computed one, and only full computed
blocks are ever shared. A hit of ``n`` blocks needs every full-attention group's first ``n`` blocks
cached, but a sliding group's only from the one holding the first key the next query sees
(``n * block_size - W + 1``): earlier entries are placeholders (``NULL_BLOCK``), counted as released.

Dense blocks (a staged KV format, gpu_workers.model.kv_staged): ``num_dense_blocks`` more blocks, ids
``num_blocks`` on, in bf16 beside the fp8 pool. Every group's block 0 of a sequence (its attention
sink) is a dense block, shared through the prefix cache like any full block, and each sequence holds
one staging block per group (``Sequence.staging``) for its newest, incomplete block. Dense blocks
have free lists of their own; ``num_free_blocks`` and the token counts are the fp8 pool's.

A freed block that carries a hash keeps its K/V and stays findable: free cached blocks form an LRU,
and a later lookup revives them. A fresh block is taken from never-hashed free blocks first, then by
evicting the least recently freed cached block (its hash is dropped).
"""

from __future__ import annotations

import hashlib
import struct
from collections import OrderedDict, deque
from collections.abc import Sequence as Tokens
from dataclasses import dataclass, field

from gpu_workers.kv_cache_groups import FULL_ATTENTION, KVCacheGroups
from gpu_workers.sequence import Sequence, SequenceStatus

__all__ = ["FULL_ATTENTION", "NULL_BLOCK", "Block", "BlockManager", "KVCacheGroups", "block_hash"]

_DIGEST_SIZE = 16
NULL_BLOCK = -1  # a sliding group's table entry before the window of a prefix hit: never read


def block_hash(prev: bytes | None, token_ids: Tokens[int]) -> bytes:
    """Hash of a full block: blake2b over the previous block's hash and this block's token ids.

    Stable across processes and machines (little-endian 64-bit ids), unlike Python's ``hash()``.
    """
    h = hashlib.blake2b(prev or b"", digest_size=_DIGEST_SIZE)
    h.update(struct.pack(f"<{len(token_ids)}q", *token_ids))
    return h.digest()


@dataclass(eq=False, slots=True)
class Block:
    block_id: int
    ref_count: int = 0  # block tables holding this block
    hash: bytes | None = None  # set once full and computed: findable in the prefix cache (its group's hash)


@dataclass(slots=True)
class _Chain:
    """A live sequence's full-block hashes (memoized, token_ids only grow) and how many are done."""

    hashes: list[bytes] = field(default_factory=list)
    num_registered: int = 0  # leading blocks (per group) of its table already offered to the hash table


class BlockManager:
    """Allocates KV blocks to sequences, with ref counts and automatic prefix caching.

    ``groups``: the model's KV cache groups (default: one full-attention group). ``used_tokens``
    counts blocks in use times ``block_size`` over the number of groups (tokens of every layer):
    shared blocks count once, and the unfilled tail of each sequence's last block counts as used
    (nothing else can take it); ``capacity_tokens`` likewise, so their ratio is the pool's use.
    Prefix-cache stats are in tokens: each successful ``allocate`` queries ``seq.num_tokens`` tokens
    and hits the tokens it found cached.
    """

    def __init__(self, num_blocks: int, block_size: int = 16, *, prefix_caching: bool = True,
                 groups: KVCacheGroups = FULL_ATTENTION, num_dense_blocks: int = 0) -> None:
        """``num_dense_blocks``: a staged KV format's bf16 blocks (sinks, staging), 0 for the others."""
        if num_blocks < groups.num_groups or block_size < 1:
            raise ValueError(f"need num_blocks >= {groups.num_groups} (one per KV cache group) and "
                             f"block_size >= 1, got {num_blocks}, {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.prefix_caching = prefix_caching
        self.groups = groups
        self._g = groups.num_groups
        self._sliding = [k for k, w in enumerate(groups.windows) if w is not None]
        if num_dense_blocks and num_dense_blocks < 2 * groups.num_groups:
            raise ValueError(f"need num_dense_blocks >= {2 * groups.num_groups} (a sink and a staging block "
                             f"per KV cache group), got {num_dense_blocks}")
        self.num_dense_blocks = num_dense_blocks
        self.blocks = [Block(i) for i in range(num_blocks + num_dense_blocks)]
        # per kind of block (0: the fp8 or plain pool, 1: dense), free ones without a hash (taken first)
        # and free hashed ones (LRU first)
        self._fresh: tuple[deque[int], deque[int]] = (deque(range(num_blocks)),
                                                      deque(range(num_blocks, num_blocks + num_dense_blocks)))
        self._cached_free: tuple[OrderedDict[int, None], OrderedDict[int, None]] = (OrderedDict(), OrderedDict())
        self._by_hash: dict[bytes, int] = {}
        self._chains: dict[Sequence, _Chain] = {}
        self.prefix_query_tokens = 0
        self.prefix_hit_tokens = 0

    # -- stats ---------------------------------------------------------------------------------

    @property
    def num_free_blocks(self) -> int:
        """Blocks (of the fp8 or plain pool) with no holder, cached ones included (they are evicted on demand)."""
        return len(self._fresh[0]) + len(self._cached_free[0])

    @property
    def num_free_dense_blocks(self) -> int:
        return len(self._fresh[1]) + len(self._cached_free[1])

    @property
    def dense_utilization(self) -> float:
        """Share of the bf16 pool (sinks, staging blocks) held by sequences; 0.0 without one."""
        return 1 - self.num_free_dense_blocks / self.num_dense_blocks if self.num_dense_blocks else 0.0

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - self.num_free_blocks

    @property
    def num_cached_free_blocks(self) -> int:
        return len(self._cached_free[0]) + len(self._cached_free[1])

    @property
    def capacity_tokens(self) -> int:
        return self.num_blocks * self.block_size // self._g

    @property
    def used_tokens(self) -> int:
        return self.num_used_blocks * self.block_size // self._g

    @property
    def hit_rate(self) -> float:
        """Prefix-cache hit tokens over queried tokens; 0.0 before any query."""
        return self.prefix_hit_tokens / self.prefix_query_tokens if self.prefix_query_tokens else 0.0

    def num_blocks_for(self, num_tokens: int) -> int:
        """Blocks of one group that hold ``num_tokens`` tokens."""
        return -(-num_tokens // self.block_size)

    def num_appendable_tokens(self, seq: Sequence) -> int:
        """How many tokens after its computed ones ``seq`` could get slots for right now."""
        return ((len(seq.block_table) + self.num_free_blocks) // self._g * self.block_size
                - seq.num_computed_tokens)

    def longest_sequence(self, chunk: int = 1) -> int | None:
        """The most tokens one sequence alone can hold, computed up to ``chunk`` tokens per step
        (its sliding groups keeping only their window's blocks); None: no bound (every group slides)."""
        bs, groups = self.block_size, self.groups
        if all(w is not None for w in groups.windows) and groups.peak_blocks(2**62, bs, chunk=chunk) <= self.num_blocks:
            return None
        lo, hi = 0, self.num_blocks * bs + 1  # peak_blocks(lo) fits, peak_blocks(hi) does not
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if groups.peak_blocks(mid, bs, chunk=chunk) <= self.num_blocks else (lo, mid)
        return lo

    # -- allocation ----------------------------------------------------------------------------

    def allocate(self, seq: Sequence, max_new_tokens: int) -> bool:
        """Give a waiting sequence its cached prefix and slots for up to ``max_new_tokens`` more.

        Takes the longest cached prefix of its full blocks that every group can serve (never all of
        them: the last token is always left to compute, so there are logits to sample from), sets
        ``num_computed_tokens`` and ``num_cached_tokens`` to the hit, and reserves blocks so that
        ``min(num_tokens, hit + max_new_tokens)`` tokens have slots. All or nothing: on False
        (not enough free blocks) nothing has changed.
        """
        if seq.block_table or seq.num_computed_tokens or seq.status is not SequenceStatus.WAITING:
            raise ValueError(f"allocate needs a waiting sequence that holds no blocks: {seq.request_id}")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        num_hit, skipped, hits = self._lookup(seq)
        num_hit_tokens = num_hit * self.block_size
        target = min(seq.num_tokens, num_hit_tokens + max_new_tokens)
        # the kind of each new block: dense for block 0 (the sink) with a staged format
        kinds = [int(self.num_dense_blocks > 0 and i == 0)
                 for i in range(num_hit, self.num_blocks_for(target)) for _ in range(self._g)]
        staging = self._g if self.num_dense_blocks else 0
        taken = [b for b in hits if b != NULL_BLOCK]
        revived = [sum(1 for b in taken if self.blocks[b].ref_count == 0 and self._kind(b) == k) for k in (0, 1)]
        if (kinds.count(0) > self.num_free_blocks - revived[0]
                or kinds.count(1) + staging > self.num_free_dense_blocks - revived[1]):
            return False
        for b in taken:
            self._take_cached(b)
        seq.block_table = hits + [self._take_fresh(k) for k in kinds]
        seq.staging = [self._take_fresh(1) for _ in range(staging)]
        seq.num_computed_tokens = seq.num_cached_tokens = num_hit_tokens
        seq.num_released_blocks = skipped
        if self.prefix_caching:
            self._chains[seq].num_registered = num_hit
        if self.prefix_caching and not seq.skip_prefix_cache:
            self.prefix_query_tokens += seq.num_tokens
            self.prefix_hit_tokens += num_hit_tokens
        return True

    def ensure_capacity(self, seq: Sequence, num_tokens: int) -> bool:
        """Grow ``seq``'s block table so its first ``num_tokens`` tokens have slots in every group.

        False when there are not enough free blocks, and then nothing has changed.
        """
        num_new = self.num_blocks_for(num_tokens) * self._g - len(seq.block_table)
        if num_new <= 0:
            return True
        if num_new > self.num_free_blocks:
            return False
        seq.block_table.extend(self._take_fresh() for _ in range(num_new))
        return True

    def mark_computed(self, seq: Sequence) -> None:
        """Make ``seq``'s full blocks whose K/V are now computed findable by later lookups.

        Call after each step that advanced ``num_computed_tokens``. When another block already
        holds the same hash (two sequences computed the same prefix at once), that one stays the
        cached copy and this block stays private.
        """
        if not self.prefix_caching:
            return
        num_full = min(seq.num_computed_tokens // self.block_size, len(seq.block_table) // self._g)
        chain = self._chain(seq, num_full)
        for i in range(chain.num_registered, num_full):
            for k in range(self._g):
                if k in self._sliding and i < seq.num_released_blocks:
                    continue  # a placeholder, or given back already
                block = self.blocks[seq.block_table[i * self._g + k]]
                h = self._group_hash(chain.hashes[i], k)
                if block.hash is None and h not in self._by_hash:
                    block.hash = h
                    self._by_hash[h] = block.block_id
        chain.num_registered = max(chain.num_registered, num_full)

    def free(self, seq: Sequence) -> None:
        """Release ``seq``'s blocks (tail first, so its tail is evicted first) and reset its progress."""
        for block_id in seq.staging:
            self._release(block_id)
        for idx in reversed(range(len(seq.block_table))):
            if not self._is_released(seq, idx):
                self._release(seq.block_table[idx])
        seq.block_table, seq.staging = [], []
        seq.num_computed_tokens = seq.num_released_blocks = 0
        self._chains.pop(seq, None)

    def release_out_of_window(self, seq: Sequence) -> int:
        """Give back ``seq``'s sliding-group blocks wholly before the window of its next query (at
        position ``num_computed_tokens``, which sees keys from ``num_computed_tokens - W + 1``).
        Call after ``mark_computed``; returns how many blocks were released now."""
        window = self.groups.sliding_window
        if window is None:
            return 0
        first_key = max(0, seq.num_computed_tokens + 1 - window)
        return self.release_before(seq, first_key // self.block_size)

    def release_before(self, seq: Sequence, num_blocks: int) -> int:
        """Give back the sliding groups' first ``num_blocks`` blocks of ``seq`` while it runs: no
        layer of theirs reads them again. They stay in the block table as stale ids (positions keep
        their index); computed ones stay findable in the prefix cache like any freed block. Call
        after ``mark_computed``. Returns how many were released now."""
        if not self._sliding:
            return 0
        num_blocks = min(num_blocks, len(seq.block_table) // self._g, seq.num_computed_tokens // self.block_size)
        released = [i * self._g + k for i in range(seq.num_released_blocks, num_blocks) for k in self._sliding]
        for idx in reversed(released):
            self._release(seq.block_table[idx])
        seq.num_released_blocks = max(seq.num_released_blocks, num_blocks)
        return len(released)

    # -- internals -----------------------------------------------------------------------------

    def _is_released(self, seq: Sequence, idx: int) -> bool:
        return idx // self._g < seq.num_released_blocks and idx % self._g in self._sliding

    @staticmethod
    def _group_hash(h: bytes, group: int) -> bytes:
        """The hash table's key for group ``group``'s block of a prefix whose chained hash is ``h``."""
        return h if group == 0 else h + group.to_bytes(2, "little")

    def _chain(self, seq: Sequence, num_full: int) -> _Chain:
        """``seq``'s chain state, with hashes extended to at least ``num_full`` full blocks."""
        chain = self._chains.setdefault(seq, _Chain())
        bs = self.block_size
        for i in range(len(chain.hashes), num_full):
            prev = chain.hashes[-1] if chain.hashes else None
            chain.hashes.append(block_hash(prev, seq.token_ids[i * bs : (i + 1) * bs]))
        return chain

    def _lookup(self, seq: Sequence) -> tuple[int, int, list[int]]:
        """The longest prefix hit for ``seq``, leaving its last token out: (blocks per group hit,
        leading ones a sliding group skips, the interleaved table of the hit blocks)."""
        if not self.prefix_caching:
            return 0, 0, []
        limit = (seq.num_tokens - 1) // self.block_size
        hashes = self._chain(seq, limit).hashes[:limit]
        if seq.skip_prefix_cache:
            return 0, 0, []
        found = [[self._by_hash.get(self._group_hash(h, k)) for h in hashes] for k in range(self._g)]
        n = limit
        for k, window in enumerate(self.groups.windows):
            if window is None:
                n = next((i for i, b in enumerate(found[k][:n]) if b is None), n)
        if self._sliding:
            # run[i]: cached blocks ending at block i in every sliding group
            run, length = [], 0
            for i in range(n):
                length = length + 1 if all(found[k][i] is not None for k in self._sliding) else 0
                run.append(length)
            window = self.groups.sliding_window
            assert window is not None
            while n and run[n - 1] < n - self._skipped(n, window):
                n -= 1
        skipped = self._skipped(n, self.groups.sliding_window) if self._sliding else 0
        hits: list[int] = []
        for i in range(n):
            for k in range(self._g):
                b = found[k][i]
                hits.append(NULL_BLOCK if b is None or (k in self._sliding and i < skipped) else b)
        return n, skipped, hits

    def _skipped(self, num_hit: int, window: int | None) -> int:
        """Leading blocks a sliding group needs not hold once ``num_hit`` blocks are computed."""
        return 0 if window is None else max(0, num_hit * self.block_size + 1 - window) // self.block_size

    def _kind(self, block_id: int) -> int:
        """0: a block of the fp8 (or plain) pool; 1: a dense block."""
        return int(block_id >= self.num_blocks)

    def _take_cached(self, block_id: int) -> None:
        block = self.blocks[block_id]
        if block.ref_count == 0:
            del self._cached_free[self._kind(block_id)][block_id]
        block.ref_count += 1

    def _take_fresh(self, kind: int = 0) -> int:
        if self._fresh[kind]:
            block_id = self._fresh[kind].popleft()
        else:
            block_id, _ = self._cached_free[kind].popitem(last=False)
            block = self.blocks[block_id]
            assert block.hash is not None
            del self._by_hash[block.hash]
            block.hash = None
        self.blocks[block_id].ref_count = 1
        return block_id

    def _release(self, block_id: int) -> None:
        block = self.blocks[block_id]
        assert block.ref_count > 0, f"block {block_id} freed more often than taken"
        block.ref_count -= 1
        if block.ref_count == 0:
            if block.hash is None:
                self._fresh[self._kind(block_id)].append(block_id)
            else:
                self._cached_free[self._kind(block_id)][block_id] = None
