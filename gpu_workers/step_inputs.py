"""A step's inputs, built once per step from the scheduler's chunks: the tokens flattened into one
unpadded batch (decodes first, sorted by context length, then prefill chunks), their positions, the
rows whose logits are returned, and what attention reads (``AttentionBatch``): every KV cache group's
view of the step, and each sliding window's view of it, their decode groups built by the view's
decode backend (gpu_workers.model.decode_backends), their prefill chunks here.

A builder made with ``kv_groups`` (gpu_workers.kv_cache_groups.KVCacheGroups) reads chunks whose block
tables interleave the groups' blocks, and gives every group its own view of the step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from gpu_workers.kv_cache_groups import KVCacheGroups
from gpu_workers.model.attention_metadata import AttentionBatch, PrefillChunk
from gpu_workers.model.config import ModelConfig
from gpu_workers.model.decode_backends import DecodeBackends, DecodeSpan
from gpu_workers.model.kv_staged import StagedWrites

if TYPE_CHECKING:
    from gpu_workers.sequence import Sequence


@dataclass(frozen=True, slots=True)
class Chunk:
    token_ids: list[int]  # the new tokens this step computes (1 for a decode step)
    start: int  # position of token_ids[0] = tokens of this sequence already in the KV cache
    # the sequence's cache blocks, covering at least start + len(token_ids) tokens in every KV cache
    # group (interleaved: entry i * G + k is group k's i-th block)
    block_table: list[int]
    want_logits: bool  # True when the chunk ends at the sequence's last token (a token gets sampled)
    # The scheduler's sequence (request id, all its tokens): what a tensor-parallel leader needs to
    # tell the other ranks only what they have not seen (gpu_workers.parallel.step_message).
    seq: Sequence | None = None
    # Logits of every token of the chunk, not only of its last (prompt logprobs).
    all_logits: bool = False
    # A staged cache only (gpu_workers.model.kv_staged): the sequence's staging block in every KV
    # cache group (dense block ids), where its newest, incomplete block is kept in bf16
    staging: tuple[int, ...] = ()


@dataclass(slots=True)
class StepInputs:
    input_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]
    batch: AttentionBatch
    logit_rows: torch.Tensor  # [N] rows of the flattened tokens whose logits are returned


class StepBuilder:
    """Builds each step's inputs for one model and KV cache (its block size, groups and backends)."""

    def __init__(self, config: ModelConfig, *, block_size: int, kv_groups: KVCacheGroups,
                 backends: DecodeBackends, device: torch.device) -> None:
        self.config = config
        self.block_size = block_size
        self.kv_groups = kv_groups
        self.backends = backends
        self.device = device
        layer_windows = [config.layer_window(i) for i in range(config.num_hidden_layers)]
        # per group: the distinct sliding windows of its layers (each gets its own view of every
        # step) and whether some layer of it attends to everything
        self.group_windows = [sorted({w for i in g if (w := layer_windows[i]) is not None}) for g in kv_groups.layers]
        self.group_full = [any(layer_windows[i] is None for i in g) for g in kv_groups.layers]
        cache = backends.full.cache
        # a staged cache: block ids from num_blocks on are its dense (bf16) blocks
        self.staged = cache.format.staged
        self.first_dense = cache.num_blocks

    def build(self, chunks: list[Chunk]) -> StepInputs:
        """Flatten ``chunks`` (decodes first, then prefill chunks) and build attention metadata;
        ValueError for a chunk without tokens or a block table too short for it."""
        num_groups = self.kv_groups.num_groups
        for c in chunks:
            if not c.token_ids:
                raise ValueError("a chunk has no tokens")
            if len(c.block_table) // num_groups * self.block_size < c.start + len(c.token_ids):
                raise ValueError(
                    f"block table of {len(c.block_table)} blocks ({num_groups} KV cache groups) cannot "
                    f"hold {c.start + len(c.token_ids)} tokens"
                )
        # decodes sorted by context length, so that groups of similar lengths pad little
        decodes = sorted((i for i, c in enumerate(chunks) if len(c.token_ids) == 1), key=lambda i: chunks[i].start)
        prefills = [i for i, c in enumerate(chunks) if len(c.token_ids) > 1]
        first_row = {i: row for row, i in enumerate(decodes)}  # chunk index -> its first token's row
        ids = [chunks[i].token_ids[0] for i in decodes]
        positions = [torch.tensor([chunks[i].start for i in decodes], dtype=torch.long)]
        for i in prefills:
            c = chunks[i]
            first_row[i] = len(ids)
            ids.extend(c.token_ids)
            positions.append(torch.arange(c.start, c.start + len(c.token_ids)))
        rope_seq_lens = self._rope_seq_lens([chunks[i] for i in decodes + prefills])
        views = []
        for k in range(num_groups):
            own = chunks if num_groups == 1 else [
                Chunk(c.token_ids, c.start, c.block_table[k::num_groups], c.want_logits, staging=c.staging[k : k + 1])
                for c in chunks]
            views.append(self._group_view(k, [own[i] for i in decodes], positions[0],
                                          [(own[i], first_row[i]) for i in prefills], rope_seq_lens))
        batch = views[0]
        if num_groups > 1:
            batch.groups = views
        rows: list[int] = []
        for i, c in enumerate(chunks):
            if c.all_logits:
                rows.extend(range(first_row[i], first_row[i] + len(c.token_ids)))
            elif c.want_logits:
                rows.append(first_row[i] + len(c.token_ids) - 1)
        return StepInputs(
            input_ids=self._to_device(torch.tensor(ids, dtype=torch.long)),
            positions=self._to_device(torch.cat(positions)),
            batch=batch,
            logit_rows=self._to_device(torch.tensor(rows, dtype=torch.long)),
        )

    def _group_view(self, group: int, decodes: list[Chunk], decode_positions: torch.Tensor,
                    prefills: list[tuple[Chunk, int]], rope_seq_lens: torch.Tensor | None) -> AttentionBatch:
        """KV cache group ``group``'s view of the step: ``decodes`` (sorted by length, at
        ``decode_positions``) and ``prefills`` (with their first rows) over that group's tables."""
        batch = AttentionBatch(slot_mapping=torch.empty(0), decode_backend=self.backends.full,
                               num_decode=len(decodes), rope_seq_lens=rope_seq_lens)
        # A window that holds every sequence's whole context reads what full attention reads: its
        # layers take the group's full view (and the full view's backend with it).
        longest = max((c.start + len(c.token_ids) for c in [*decodes, *(c for c, _ in prefills)]), default=0)
        windows = self.group_windows[group]
        narrow = [w for w in windows if w < longest]
        full_view = self.group_full[group] or len(narrow) < len(windows)
        slots = [self._decode_slots(decodes, decode_positions)]
        if full_view:  # (otherwise every layer reads its window's view: blocks before it may be gone)
            self._add_decodes(batch, decodes, decode_positions)
        for c, row in prefills:
            slots.append(self._add_prefill(batch, c, row, full=full_view))
        batch.slot_mapping = self._to_device(torch.cat(slots))
        if self.staged:
            batch.staged = self._staged_writes([*((c, i) for i, c in enumerate(decodes)), *prefills],
                                               len(batch.slot_mapping))
        for window in windows:
            batch.windowed[window] = batch if window not in narrow else self._windowed(batch, window, decodes, prefills)
        return batch

    def _decode_slots(self, decodes: list[Chunk], positions: torch.Tensor) -> torch.Tensor:
        """[B] the cache slots of the decodes' new tokens, at ``positions`` [B]."""
        bs = self.block_size
        blocks = torch.tensor([c.block_table[c.start // bs] for c in decodes], dtype=torch.long)
        return blocks * bs + positions % bs

    def _add_decodes(self, batch: AttentionBatch, decodes: list[Chunk], positions: torch.Tensor) -> None:
        """Decode groups over each sequence's blocks up to its new token's, as ``batch``'s backend reads them."""
        bs, backend = self.block_size, batch.decode_backend
        used = [c.start // bs + 1 for c in decodes]
        for first, count in backend.split(used):
            width = used[first + count - 1]  # sorted by length: the last is the widest
            table = torch.tensor(
                [self._own(c, c.block_table[:n]) + [0] * (width - n) for c, n in zip(decodes[first : first + count],
                                                                                  used[first : first + count])],
                dtype=torch.long,
            )  # [B, MB], padded with block 0 (masked)
            batch.decode_groups.append(backend.build(DecodeSpan(first, table, positions[first : first + count])))

    def _add_prefill(self, batch: AttentionBatch, c: Chunk, first: int, *, full: bool = True) -> torch.Tensor:
        """A prefill chunk into ``batch`` (unless ``full`` is False: no layer reads its whole
        context); returns its new tokens' cache slots."""
        bs = self.block_size
        end = c.start + len(c.token_ids)
        if not full:
            blocks = torch.tensor(c.block_table[c.start // bs : -(-end // bs)], dtype=torch.long)
            new_slots = (blocks[:, None] * bs + torch.arange(bs)).view(-1)
            return new_slots[c.start % bs : c.start % bs + len(c.token_ids)]
        blocks = torch.tensor(c.block_table[: -(-end // bs)], dtype=torch.long)
        context_slots = (blocks[:, None] * bs + torch.arange(bs)).view(-1)[:end]  # [end]
        kv_slots = mask = None
        if self.staged:
            batch.prefills.append(self._staged_chunk(c, first, context_slots, 0, None))
            return context_slots[c.start :]
        if c.start:
            kv_slots = self._to_device(context_slots)
            queries = torch.arange(c.start, end)
            mask = self._to_device(torch.arange(end)[None, :] <= queries[:, None])  # [n, end]
        batch.prefills.append(PrefillChunk(first, len(c.token_ids), c.start, kv_slots, mask))
        return context_slots[c.start :]

    def _windowed(self, batch: AttentionBatch, window: int, decodes: list[Chunk],
                  prefills: list[tuple[Chunk, int]]) -> AttentionBatch:
        """The view of ``batch`` for layers with a sliding ``window``: a query at position p sees
        keys p - window < k <= p. Decode block tables start at the block holding the window's first
        key, and prefill chunks gather keys from the first one any of their queries sees."""
        bs, backend = self.block_size, self.backends.windowed
        view = AttentionBatch(slot_mapping=batch.slot_mapping, decode_backend=backend, num_decode=batch.num_decode,
                              rope_seq_lens=batch.rope_seq_lens)
        spans = [(max(0, c.start + 1 - window) // bs, c.start // bs + 1) for c in decodes]  # blocks [lo, hi)
        for first, count in backend.split([hi - lo for lo, hi in spans]):
            group, span = decodes[first : first + count], spans[first : first + count]
            width = max(hi - lo for lo, hi in span)
            table = torch.tensor([self._own(c, c.block_table[lo:hi]) + [0] * (width - hi + lo)
                                  for c, (lo, hi) in zip(group, span)], dtype=torch.long)  # [B, MB]
            view.decode_groups.append(backend.build(DecodeSpan(
                first, table, positions=torch.tensor([c.start for c in group]),
                key_start=torch.tensor([lo * bs for lo, _ in span])[:, None], window=window,
            )))
        for c, row in prefills:
            end = c.start + len(c.token_ids)
            lo = max(0, c.start + 1 - window)  # the first key any of the chunk's queries sees
            if self.staged:
                blocks = torch.tensor(c.block_table[lo // bs : -(-end // bs)], dtype=torch.long)
                slots = (blocks[:, None] * bs + torch.arange(bs)).view(-1)[lo % bs : lo % bs + end - lo]
                view.prefills.append(self._staged_chunk(c, row, slots, lo, window))
                continue
            kv_slots = mask = None  # (a first chunk within the window: plain causal attention)
            if c.start or end > window:
                keys = torch.arange(lo, end)[None, :]  # [1, S]
                queries = torch.arange(c.start, end)[:, None]  # [n, 1]
                mask = self._to_device((keys <= queries) & (keys > queries - window))  # [n, S]
                if c.start:
                    blocks = torch.tensor(c.block_table[lo // bs : -(-end // bs)], dtype=torch.long)
                    slots = (blocks[:, None] * bs + torch.arange(bs)).view(-1)[lo % bs : lo % bs + end - lo]
                    kv_slots = self._to_device(slots)
            view.prefills.append(PrefillChunk(row, len(c.token_ids), c.start, kv_slots, mask))
        return view

    # --- the staged cache (gpu_workers.model.kv_staged) -------------------------------------------

    def _own(self, c: Chunk, table: list[int]) -> list[int]:
        """A decode's block table (its blocks up to its query's), with a staged cache the staging
        block in place of the query's own block (unless that is block 0, the dense sink)."""
        if not self.staged or c.start < self.block_size:
            return table
        return table[:-1] + [self._staging(c)]

    def _staging(self, c: Chunk) -> int:
        if not c.staging or c.staging[0] < self.first_dense:
            raise ValueError(f"a staged KV cache needs each chunk's staging block (a dense block id), got {c.staging}")
        return c.staging[0]

    def _sink_slot(self, c: Chunk, offset: int) -> int:
        """The dense slot of token ``offset`` of the sequence's block 0 (its sink)."""
        if c.block_table[0] < self.first_dense:
            raise ValueError(f"a staged KV cache needs block 0 of each table to be a dense block, got {c.block_table[0]}")
        return (c.block_table[0] - self.first_dense) * self.block_size + offset

    def _stage_slot(self, c: Chunk, position: int) -> int:
        """The dense slot of ``position`` (of the sequence's newest block) in its staging block."""
        return (self._staging(c) - self.first_dense) * self.block_size + position % self.block_size

    def _staged_chunk(self, c: Chunk, first: int, kv_slots: torch.Tensor, lo: int, window: int | None) -> PrefillChunk:
        """A prefill chunk over a staged cache: its context ``kv_slots`` [S] (keys ``lo`` .. end), read
        twice (as stored, then in bf16), its mask [n, 2S] picking per query what decode would read."""
        bs, start, end = self.block_size, c.start, c.start + len(c.token_ids)
        keys = torch.arange(lo, end)[None, :]  # [1, S]
        queries = torch.arange(start, end)[:, None]  # [n, 1]
        seen = keys <= queries
        if window is not None:
            seen &= keys > queries - window
        own = (keys // bs == queries // bs) | (keys < bs)  # read in bf16: its own block and the sink
        mask = torch.cat((seen & ~own, seen & own), dim=1)
        staged_from = max(lo, start - start % bs)  # tokens of the first query's block cached before it
        stage = self._sink_slot if start < bs else self._stage_slot
        dense = torch.tensor([stage(c, p) for p in range(staged_from, start)], dtype=torch.long)
        return PrefillChunk(first, len(c.token_ids), start, self._to_device(kv_slots), self._to_device(mask),
                            dense_slots=self._to_device(dense), dense_from=staged_from - lo)

    def _staged_writes(self, chunks: list[tuple[Chunk, int]], num_tokens: int) -> StagedWrites:
        """The step's writes into a staged cache for ``chunks`` (each with its first row, ``num_tokens``
        rows in all): tokens of block 0 and of each chunk's last block in bf16 (the sink, the staging
        block), and blocks that complete quantized into their fp8 blocks (from the staged tokens
        cached before the chunk and the chunk's own)."""
        bs = self.block_size
        dense_rows: list[int] = []
        dense_slots: list[int] = []
        late_rows: list[int] = []
        late_slots: list[int] = []
        complete: list[int] = []
        src: list[int] = []
        staged: list[int] = []
        for c, row in chunks:
            start, end = c.start, c.start + len(c.token_ids)
            last = (end - 1) // bs
            for b in range(start // bs, last + 1):
                lo, hi = max(start, b * bs), min(end, (b + 1) * bs)
                rows = range(row + lo - start, row + hi - start)
                if b == 0:
                    dense_rows += rows
                    dense_slots += [self._sink_slot(c, p) for p in range(lo, hi)]
                    continue
                if b == last:  # decodes read it now; a prefill chunk its first block's staged tokens
                    late = len(c.token_ids) > 1
                    (late_rows if late else dense_rows).extend(rows)
                    (late_slots if late else dense_slots).extend(self._stage_slot(c, p) for p in range(lo, hi))
                if hi == (b + 1) * bs:
                    complete.append(c.block_table[b])
                    for p in range(b * bs, lo):
                        src.append(num_tokens + len(staged))
                        staged.append(self._stage_slot(c, p))
                    src += rows

        def tensor(xs: list[int]) -> torch.Tensor:
            return self._to_device(torch.tensor(xs, dtype=torch.long))

        return StagedWrites(tensor(dense_rows), tensor(dense_slots), tensor(complete), tensor(src), tensor(staged),
                            tensor(late_rows), tensor(late_slots))

    def _rope_seq_lens(self, ordered: list[Chunk]) -> torch.Tensor | None:
        """Per-token sequence lengths for dynamic NTK RoPE, when some sequence needs scaling."""
        if self.config.rope_scaling.type != "dynamic":
            return None
        ends = [c.start + len(c.token_ids) for c in ordered]
        if max(ends) <= self.config.max_position_embeddings:
            return None
        lens = torch.tensor(ends).repeat_interleave(torch.tensor([len(c.token_ids) for c in ordered]))
        return self._to_device(lens)

    def _to_device(self, t: torch.Tensor) -> torch.Tensor:
        return t if self.device.type == "cpu" else t.to(self.device, non_blocking=True)
