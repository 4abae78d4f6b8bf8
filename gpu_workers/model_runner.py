"""The engine's only door to torch: one ``run`` per step turns chunks of sequences into logits.

The scheduler decides what each sequence computes this step (a ``Chunk``: new tokens, how many of
its tokens are already cached, its block table); ``ModelRunner.run`` flattens all chunks into one
unpadded batch of tokens, builds the attention metadata once, runs the model, and returns fp32
logits for the chunks that end at a sequence's last token.

A runner built with ``kv_groups`` (gpu_workers.block_manager.KVCacheGroups, as the engine builds it)
keeps each group's layers in blocks of their own: chunks then carry interleaved block tables, and
every group gets its own view of the step. Without, one group holds every layer in every block.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from broker.errors import ConfigError
from gpu_workers.block_manager import KVCacheGroups
from gpu_workers.model.attention import AttentionBatch, DecodeGroup, PagedAttention, PrefillChunk
from gpu_workers.model.config import ModelConfig, load_config
from gpu_workers.model.families import model_class
from gpu_workers.model.kv_cache import KVCache
from gpu_workers.model.kv_format import KVFormat, kv_format
from gpu_workers.model.layers import TPContext
from gpu_workers.model.loader import load_weights
from gpu_workers.startup import phase

if TYPE_CHECKING:
    from gpu_workers.sequence import Sequence

# Decode attention gathers each group's K/V into one buffer; on CPUs groups of about this many
# (padded) context tokens keep that buffer in cache (measured on random:small, fp32).
CPU_DECODE_GROUP_TOKENS = 4096


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


@dataclass(slots=True)
class _Step:
    input_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]
    batch: AttentionBatch
    logit_rows: torch.Tensor  # [N] rows of the flattened tokens whose logits are returned


class ModelRunner:
    """A loaded model and its KV cache on one device (one tensor-parallel rank)."""

    def __init__(
        self,
        model_dir: Path,
        *,
        num_blocks: int | None,
        block_size: int = 16,
        kv_dtype: str | KVFormat = "fp32",
        dtype: torch.dtype | None = None,
        device: str = "cpu",
        tp: TPContext | None = None,
        decode_group_tokens: int | None = None,
        kv_groups: KVCacheGroups | None = None,
    ) -> None:
        """``num_blocks``: KV cache blocks, or None to size the cache later (``allocate_kv_cache``),
        once the loaded weights show how much memory is left. ``decode_group_tokens``: most padded
        context tokens per decode attention group (None: CPU_DECODE_GROUP_TOKENS on CPUs, all
        decodes in one group on GPUs). ``kv_groups``: which layers share a block (default: all)."""
        kv = kv_format(kv_dtype)  # ConfigError for an unknown name, before the model loads
        self.device = torch.device(device)
        # bf16 matmuls are 2-3x slower than fp32 on the project's CPUs
        self.dtype = dtype or (torch.float32 if self.device.type == "cpu" else torch.bfloat16)
        self.tp = tp or TPContext()
        self.block_size = block_size
        self.decode_group_tokens = decode_group_tokens or (
            CPU_DECODE_GROUP_TOKENS if self.device.type == "cpu" else None
        )
        self.config: ModelConfig = load_config(Path(model_dir))
        layer_windows = [self.config.layer_window(i) for i in range(self.config.num_hidden_layers)]
        self.kv_groups = kv_groups or KVCacheGroups.single(layer_windows)
        if sorted(i for g in self.kv_groups.layers for i in g) != list(range(len(layer_windows))):
            raise ConfigError(f"KV cache groups {self.kv_groups.layers} do not list each of the model's "
                              f"{len(layer_windows)} layers once")
        # per group: the distinct sliding windows of its layers (each gets its own view of every
        # step) and whether some layer of it attends to everything
        self.group_windows = [sorted({w for i in g if (w := layer_windows[i]) is not None})
                              for g in self.kv_groups.layers]
        self.group_full = [any(layer_windows[i] is None for i in g) for g in self.kv_groups.layers]
        where = f"{model_dir}, rank {self.tp.rank} of {self.tp.size}" if self.tp.size > 1 else str(model_dir)
        with phase("load", where):
            with torch.device(self.device):
                self.model = model_class(self.config)(self.config, self.tp, self.dtype)
            for module in self.model.modules():
                if isinstance(module, PagedAttention):
                    module.place(*self.kv_groups.locate(module.layer))
            load_weights(self.model, Path(model_dir))
        with phase("pack"):
            self.model.pack_weights()
        self.kv_format = kv
        self.kv_dtype = kv.name
        self.kv_cache: KVCache
        if num_blocks is not None:
            self.allocate_kv_cache(num_blocks)

    def allocate_kv_cache(self, num_blocks: int) -> None:
        """The KV cache of ``num_blocks`` blocks (once, before the first ``run``)."""
        with phase("KV allocation", f"{num_blocks} blocks of {self.block_size} tokens, {self.kv_dtype}"):
            self.kv_cache = self._new_kv_cache(num_blocks)

    def _new_kv_cache(self, num_blocks: int) -> KVCache:
        return KVCache(
            num_layers=self.kv_groups.layers_per_block,
            num_blocks=num_blocks,
            block_size=self.block_size,
            num_kv_heads=self.config.kv_heads_per_rank(self.tp.size),
            head_dim=self.config.head_dim,
            kv_dtype=self.kv_format,
            dtype=self.dtype,
            device=self.device,
        )

    def run(self, chunks: list[Chunk]) -> torch.Tensor:
        """fp32 logits [n, vocab] of the chunks with ``want_logits``, in the order given; a chunk
        with ``all_logits`` gives a row for each of its tokens instead (its last one included).

        Chunks may come in any order, one per sequence; each writes its tokens' K/V into its blocks.
        """
        with torch.inference_mode():
            if not chunks:
                return torch.empty(0, self.config.vocab_size, device=self.device)
            step = self._prepare(chunks)
            hidden = self.model(step.input_ids, step.positions, step.batch, self.kv_cache)  # [T, hidden]
            return self.model.compute_logits(hidden.index_select(0, step.logit_rows))

    def release(self, request_id: str) -> None:
        """A sequence is gone for good. One rank keeps no per-sequence state: nothing to forget."""

    def check(self) -> None:
        """Raise ``EngineFailed`` once steps can no longer run; one rank alone always can."""

    def close(self) -> None:
        """Nothing to stop on one rank."""

    def weight_bytes(self) -> int:
        """Bytes of this rank's weights: parameters (a tied LM head counted once) and packed copies."""
        return sum(p.numel() * p.element_size() for p in self.model.parameters()) + self.model.packed_bytes()

    def _prepare(self, chunks: list[Chunk]) -> _Step:
        """Flatten ``chunks`` (decodes first, then prefill chunks) and build attention metadata."""
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
                Chunk(c.token_ids, c.start, c.block_table[k::num_groups], c.want_logits) for c in chunks]
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
        return _Step(
            input_ids=self._to_device(torch.tensor(ids, dtype=torch.long)),
            positions=self._to_device(torch.cat(positions)),
            batch=batch,
            logit_rows=self._to_device(torch.tensor(rows, dtype=torch.long)),
        )

    def _group_view(self, group: int, decodes: list[Chunk], decode_positions: torch.Tensor,
                    prefills: list[tuple[Chunk, int]], rope_seq_lens: torch.Tensor | None) -> AttentionBatch:
        """KV cache group ``group``'s view of the step: ``decodes`` (sorted by length, at
        ``decode_positions``) and ``prefills`` (with their first rows) over that group's tables."""
        batch = AttentionBatch(slot_mapping=torch.empty(0), num_decode=len(decodes), rope_seq_lens=rope_seq_lens)
        # A window that holds every sequence's whole context reads what full attention reads: its
        # layers take the group's full view (and the fused kernels with it).
        longest = max((c.start + len(c.token_ids) for c in [*decodes, *(c for c, _ in prefills)]), default=0)
        windows = self.group_windows[group]
        narrow = [w for w in windows if w < longest]
        full_view = self.group_full[group] or len(narrow) < len(windows)
        slots = self._add_decodes(batch, decodes, decode_positions, groups=full_view)
        for c, row in prefills:
            slots.append(self._add_prefill(batch, c, row, full=full_view))
        batch.slot_mapping = self._to_device(torch.cat(slots))
        for window in windows:
            batch.windowed[window] = batch if window not in narrow else self._windowed(batch, window, decodes, prefills)
        return batch

    def _add_decodes(self, batch: AttentionBatch, decodes: list[Chunk], positions: torch.Tensor, *,
                     groups: bool = True) -> list[torch.Tensor]:
        """Decode groups into ``batch`` (unless ``groups`` is False: no layer reads them); returns the
        new tokens' cache slots, group by group."""
        bs = self.block_size
        slots = []
        for first, group in self._decode_groups(decodes):
            pos = positions[first : first + len(group)]  # [B]
            used = [c.start // bs + 1 for c in group]
            width = used[-1]
            table = torch.tensor(
                [c.block_table[:n] + [0] * (width - n) for c, n in zip(group, used)], dtype=torch.long
            )  # [B, MB], padded with block 0 (masked)
            slots.append(table.gather(1, (pos // bs)[:, None])[:, 0] * bs + pos % bs)
            if not groups:  # every layer reads its window's view (blocks before it may be gone)
                continue
            group_meta = DecodeGroup(first, len(group), self._to_device(table))
            if self.kv_cache.fused_attention:
                group_meta.lens = pos + 1  # the kernel stops at each sequence's length: no mask
            else:
                beyond = torch.arange(width * bs)[None, :] > pos[:, None]  # [B, L]
                bias = torch.zeros(beyond.shape, dtype=torch.float32).masked_fill_(beyond, float("-inf"))
                group_meta.bias = self._to_device(bias[None, :, None, :])
                if self.kv_cache.reads_in_place:
                    self._add_in_place_index(group_meta, table)
            batch.decode_groups.append(group_meta)
        return slots

    def _add_in_place_index(self, group: DecodeGroup, table: torch.Tensor) -> None:
        """The K/V row index and SDDMM pattern of in-place decode attention (see attention.py)."""
        bs, cache = self.block_size, self.kv_cache
        kv_heads = cache.num_kv_heads
        per_kv_head = self.config.heads_per_rank(self.tp.size) // kv_heads  # G
        b, width = table.shape
        length = width * bs
        slots = (table[:, :, None] * bs + torch.arange(bs)).view(b, length)  # [B, L]
        heads = torch.arange(kv_heads)[:, None, None, None] * (cache.num_blocks * bs)
        index = (heads + slots[None, :, None, :]).expand(kv_heads, b, per_kv_head, length)
        group.kv_index = index.reshape(-1, length).contiguous()  # [Hkv * B * G, L]
        rows = group.kv_index.shape[0]
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")
            group.score_pattern = torch.sparse_csr_tensor(
                torch.arange(0, rows * length + 1, length),
                group.kv_index.view(-1),
                torch.zeros(rows * length, dtype=cache.dtype),
                size=(rows, kv_heads * cache.num_blocks * bs),
                check_invariants=False,
            )

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
        bs = self.block_size
        view = AttentionBatch(slot_mapping=batch.slot_mapping, num_decode=batch.num_decode,
                              rope_seq_lens=batch.rope_seq_lens)
        spans = [(max(0, c.start + 1 - window) // bs, c.start // bs + 1) for c in decodes]  # blocks [lo, hi)
        for start, group in self._decode_groups(decodes, [hi - lo for lo, hi in spans], fused=False):
            span = spans[start : start + len(group)]
            width = max(hi - lo for lo, hi in span)
            table = torch.tensor([c.block_table[lo:hi] + [0] * (width - hi + lo) for c, (lo, hi) in zip(group, span)],
                                 dtype=torch.long)  # [B, MB]
            pos = torch.tensor([c.start for c in group])[:, None]  # [B, 1]
            key = torch.tensor([lo * bs for lo, _ in span])[:, None] + torch.arange(width * bs)[None, :]  # [B, L]
            hidden = (key > pos) | (key <= pos - window)
            bias = torch.zeros(hidden.shape, dtype=torch.float32).masked_fill_(hidden, float("-inf"))
            group_meta = DecodeGroup(start, len(group), self._to_device(table),
                                     bias=self._to_device(bias[None, :, None, :]))
            if self.kv_cache.reads_in_place:
                self._add_in_place_index(group_meta, table)
            view.decode_groups.append(group_meta)
        for c, row in prefills:
            end = c.start + len(c.token_ids)
            lo = max(0, c.start + 1 - window)  # the first key any of the chunk's queries sees
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

    def _rope_seq_lens(self, ordered: list[Chunk]) -> torch.Tensor | None:
        """Per-token sequence lengths for dynamic NTK RoPE, when some sequence needs scaling."""
        if self.config.rope_scaling.type != "dynamic":
            return None
        ends = [c.start + len(c.token_ids) for c in ordered]
        if max(ends) <= self.config.max_position_embeddings:
            return None
        lens = torch.tensor(ends).repeat_interleave(torch.tensor([len(c.token_ids) for c in ordered]))
        return self._to_device(lens)

    def _decode_groups(self, decodes: list[Chunk], widths: list[int] | None = None, *,
                       fused: bool = True) -> list[tuple[int, list[Chunk]]]:
        """(index of the first, chunks) of consecutive runs of ``decodes`` (sorted by length) whose
        padded K/V stays within the group budget; one group when there is no budget. ``widths``:
        the blocks each reads (default: all its blocks); ``fused``: whether the fused kernel reads them."""
        if self.decode_group_tokens is None or (fused and self.kv_cache.fused_attention):
            # (the fused fp32 kernel reads each sequence up to its own length: padding costs nothing)
            return [(0, decodes)] if decodes else []
        if widths is None:
            widths = [c.start // self.block_size + 1 for c in decodes]
        groups: list[tuple[int, list[Chunk]]] = []
        first = widest = 0
        for i in range(len(decodes)):
            widest = max(widest, widths[i])
            if i > first and (i - first + 1) * widest * self.block_size > self.decode_group_tokens:
                groups.append((first, decodes[first:i]))
                first, widest = i, widths[i]
        if decodes:
            groups.append((first, decodes[first:]))
        return groups

    def _to_device(self, t: torch.Tensor) -> torch.Tensor:
        return t if self.device.type == "cpu" else t.to(self.device, non_blocking=True)
