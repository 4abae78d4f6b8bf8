"""The paged KV cache's bookkeeping: fixed-size blocks, ref counts, and automatic prefix caching.

The cache is ``num_blocks`` blocks of ``block_size`` token slots each; a sequence's ``block_table``
maps its i-th run of ``block_size`` tokens to a physical block. Plain Python, no torch: the model
runner owns the tensors, this module only decides which block holds which tokens.

Prefix caching: a full block is identified by a hash that chains the previous block's hash with its
own token ids, so equal hashes mean equal whole prefixes. A block is entered in the hash table only
once its K/V have been computed (``mark_computed``), so a lookup never hands out a block that is
allocated but not filled yet (with chunked prefill a block can wait several steps for its K/V).
Sequences with a common prefix share its full blocks (ref count > 1). A shared or hashed block is
never written again: writes go to slots at or after ``num_computed_tokens``, which lie in blocks past
every full computed one, and only full computed blocks are ever shared.

Sliding windows: when every layer of the model attends only to its last ``W`` tokens, a running
sequence gives back the blocks wholly before the window of its next token (``release_before``);
the scheduler does so after every step.

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

from gpu_workers.sequence import Sequence, SequenceStatus

_DIGEST_SIZE = 16


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
    hash: bytes | None = None  # set once full and computed: findable in the prefix cache


@dataclass(slots=True)
class _Chain:
    """A live sequence's full-block hashes (memoized, token_ids only grow) and how many are done."""

    hashes: list[bytes] = field(default_factory=list)
    num_registered: int = 0  # leading blocks of its table already offered to the hash table


class BlockManager:
    """Allocates KV blocks to sequences, with ref counts and automatic prefix caching.

    ``used_tokens`` counts blocks in use times ``block_size``: shared blocks count once, and the
    unfilled tail of each sequence's last block counts as used (nothing else can take it).
    Prefix-cache stats are in tokens: each successful ``allocate`` queries ``seq.num_tokens`` tokens
    and hits the tokens it found cached.
    """

    def __init__(self, num_blocks: int, block_size: int = 16, *, prefix_caching: bool = True) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need num_blocks >= 1 and block_size >= 1, got {num_blocks}, {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.prefix_caching = prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self._fresh: deque[int] = deque(range(num_blocks))  # free, no hash: taken first
        self._cached_free: OrderedDict[int, None] = OrderedDict()  # free, hashed: LRU first
        self._by_hash: dict[bytes, int] = {}
        self._chains: dict[Sequence, _Chain] = {}
        self.prefix_query_tokens = 0
        self.prefix_hit_tokens = 0

    # -- stats ---------------------------------------------------------------------------------

    @property
    def num_free_blocks(self) -> int:
        """Blocks with no holder, cached ones included (they are evicted on demand)."""
        return len(self._fresh) + len(self._cached_free)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - self.num_free_blocks

    @property
    def num_cached_free_blocks(self) -> int:
        return len(self._cached_free)

    @property
    def capacity_tokens(self) -> int:
        return self.num_blocks * self.block_size

    @property
    def used_tokens(self) -> int:
        return self.num_used_blocks * self.block_size

    @property
    def hit_rate(self) -> float:
        """Prefix-cache hit tokens over queried tokens; 0.0 before any query."""
        return self.prefix_hit_tokens / self.prefix_query_tokens if self.prefix_query_tokens else 0.0

    def num_blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def num_appendable_tokens(self, seq: Sequence) -> int:
        """How many tokens after its computed ones ``seq`` could get slots for right now."""
        return (len(seq.block_table) + self.num_free_blocks) * self.block_size - seq.num_computed_tokens

    # -- allocation ----------------------------------------------------------------------------

    def allocate(self, seq: Sequence, max_new_tokens: int) -> bool:
        """Give a waiting sequence its cached prefix and slots for up to ``max_new_tokens`` more.

        Takes the longest run of cached full blocks matching its tokens (never all of them: the last
        token is always left to compute, so there are logits to sample from), sets
        ``num_computed_tokens`` and ``num_cached_tokens`` to the hit, and reserves blocks so that
        ``min(num_tokens, hit + max_new_tokens)`` tokens have slots. All or nothing: on False
        (not enough free blocks) nothing has changed.
        """
        if seq.block_table or seq.num_computed_tokens or seq.status is not SequenceStatus.WAITING:
            raise ValueError(f"allocate needs a waiting sequence that holds no blocks: {seq.request_id}")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        hits = self._lookup(seq)
        num_hit_tokens = len(hits) * self.block_size
        target = min(seq.num_tokens, num_hit_tokens + max_new_tokens)
        num_new = self.num_blocks_for(target) - len(hits)
        num_revived = sum(1 for b in hits if self.blocks[b].ref_count == 0)
        if num_new > self.num_free_blocks - num_revived:
            return False
        for b in hits:
            self._take_cached(b)
        seq.block_table = hits + [self._take_fresh() for _ in range(num_new)]
        seq.num_computed_tokens = seq.num_cached_tokens = num_hit_tokens
        if self.prefix_caching:
            self._chains[seq].num_registered = len(hits)
        if self.prefix_caching and not seq.skip_prefix_cache:
            self.prefix_query_tokens += seq.num_tokens
            self.prefix_hit_tokens += num_hit_tokens
        return True

    def ensure_capacity(self, seq: Sequence, num_tokens: int) -> bool:
        """Grow ``seq``'s block table so its first ``num_tokens`` tokens have slots.

        False when there are not enough free blocks, and then nothing has changed.
        """
        num_new = self.num_blocks_for(num_tokens) - len(seq.block_table)
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
        num_full = min(seq.num_computed_tokens // self.block_size, len(seq.block_table))
        chain = self._chain(seq, num_full)
        for i in range(chain.num_registered, num_full):
            block = self.blocks[seq.block_table[i]]
            h = chain.hashes[i]
            if block.hash is None and h not in self._by_hash:
                block.hash = h
                self._by_hash[h] = block.block_id
        chain.num_registered = max(chain.num_registered, num_full)

    def free(self, seq: Sequence) -> None:
        """Release ``seq``'s blocks (tail first, so its tail is evicted first) and reset its progress."""
        for b in reversed(seq.block_table[seq.num_released_blocks :]):
            self._release(b)
        seq.block_table = []
        seq.num_computed_tokens = seq.num_released_blocks = 0
        self._chains.pop(seq, None)

    def release_before(self, seq: Sequence, num_blocks: int) -> int:
        """Give back ``seq``'s first ``num_blocks`` blocks while it runs: a model whose every layer
        attends through a sliding window never reads them again. They stay in the block table as
        stale ids (positions keep their index); computed ones stay findable in the prefix cache like
        any freed block. Call after ``mark_computed``. Returns how many were released now."""
        num_blocks = min(num_blocks, len(seq.block_table), seq.num_computed_tokens // self.block_size)
        released = range(seq.num_released_blocks, num_blocks)
        for i in reversed(released):
            self._release(seq.block_table[i])
        seq.num_released_blocks = max(seq.num_released_blocks, num_blocks)
        return len(released)

    # -- internals -----------------------------------------------------------------------------

    def _chain(self, seq: Sequence, num_full: int) -> _Chain:
        """``seq``'s chain state, with hashes extended to at least ``num_full`` full blocks."""
        chain = self._chains.setdefault(seq, _Chain())
        bs = self.block_size
        for i in range(len(chain.hashes), num_full):
            prev = chain.hashes[-1] if chain.hashes else None
            chain.hashes.append(block_hash(prev, seq.token_ids[i * bs : (i + 1) * bs]))
        return chain

    def _lookup(self, seq: Sequence) -> list[int]:
        """Block ids of the longest cached run of ``seq``'s full blocks, leaving its last token out."""
        if not self.prefix_caching:
            return []
        limit = (seq.num_tokens - 1) // self.block_size
        hashes = self._chain(seq, limit).hashes[:limit]
        if seq.skip_prefix_cache:
            return []
        hits = []
        for h in hashes:
            b = self._by_hash.get(h)
            if b is None:
                break
            hits.append(b)
        return hits

    def _take_cached(self, block_id: int) -> None:
        block = self.blocks[block_id]
        if block.ref_count == 0:
            del self._cached_free[block_id]
        block.ref_count += 1

    def _take_fresh(self) -> int:
        if self._fresh:
            block_id = self._fresh.popleft()
        else:
            block_id, _ = self._cached_free.popitem(last=False)
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
                self._fresh.append(block_id)
            else:
                self._cached_free[block_id] = None
