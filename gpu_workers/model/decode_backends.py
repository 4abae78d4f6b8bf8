"""Decode backends: one class per way decode attention reads the paged KV cache, each building the
metadata it reads by and running the read (vLLM's ``AttentionBackend`` with its
``AttentionMetadataBuilder``, vllm/v1/attention/backends/, in one class here).

The step builder (gpu_workers.step_inputs) describes every decode group the same way, as a
``DecodeSpan`` (padded block tables, query positions, the window); a backend turns the span into its
own metadata once per step (``build``), and every layer then calls ``decode`` with it. The ways:

- ``FusedDecode``: one C kernel per layer computes scores, softmax and the weighted sum of V for
  each (KV head, sequence), reading K and V rows where they lie, up to each sequence's length, fp8
  codes converted as they are read (gpu_workers.model.fp8_kernels). An fp32 cache, or an fp8 one
  with per-block or per-tensor scales, on a CPU where the kernels build. Metadata: context lengths.
  It reads no window, and since padding costs it nothing all decodes form one group.
- ``InPlaceDecode``: an fp32 cache on a CPU without the kernels (and sliding-window views there):
  a sampled matmul (SDDMM, ``torch.sparse.sampled_addmm``) computes exactly the (query row, context
  slot) scores from the pool and ``embedding_bag`` sums the V rows weighted by the probabilities;
  nothing is copied. Metadata: the K/V row index, its sparse pattern, the mask.
- ``GatheredDecode``: every other cache (bf16, fp16, fp8 with any scales; GPUs): each group's blocks
  are copied into [Hkv, B, L, D] in the compute dtype, then two batched matmuls; fp8 scales
  multiply the scores and the probabilities. Metadata: block tables and the mask.
- ``StagedDecode``: the staged fp8 cache (``fp8_e4m3``, gpu_workers.model.kv_staged): full-attention
  views in one C kernel per layer as ``FusedDecode`` (gpu_workers.model.kv_staged_kernels: fp8 blocks
  converted as they are read, the sink and staging blocks read from the bf16 pool) where the kernels
  build and compute is fp32; otherwise, and for sliding windows, gathered (fp8 blocks read back, the
  sink and staging blocks in bf16) like ``GatheredDecode``. Prefill chunks read their context twice.

A cache's backends are chosen once, when it is made (``DecodeBackends.choose``): the first class in
``DECODE_BACKENDS`` whose ``supports`` accepts the cache (its KVFormat, device and kernels) reads
full-attention views, the first that also ``reads_windows`` reads sliding-window views. Adding a way
of reading: one subclass (its metadata, ``supports``, ``build``, ``decode``; ``prefill_context`` if
prefill chunks read the cache differently too) and one entry in ``DECODE_BACKENDS``.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, ClassVar, Generic, TypeVar

import torch
import torch.nn.functional as F

from gpu_workers.model.attention_metadata import DecodeMetadata, PrefillChunk
from gpu_workers.model.kv_cache import KVCache
from gpu_workers.model.kv_staged import DENSE_DTYPE, StagedKVCache


@dataclass(frozen=True, slots=True)
class DecodeSpan:
    """One decode group of a step, as every backend receives it (tensors on the CPU)."""

    first: int  # index of its first token (= sequence) among the step's tokens
    block_tables: torch.Tensor  # [B, MB] int64: each sequence's blocks in order, padded with block 0
    positions: torch.Tensor  # [B] int64: each query's position (its sequence's cached tokens)
    # [B, 1] int64: the position of each table's first slot (a window's view starts past block 0);
    # None: every table starts at position 0
    key_start: torch.Tensor | None = None
    window: int | None = None  # a query at position p sees keys p - window < k <= p (None: all k <= p)

    @property
    def count(self) -> int:
        return self.block_tables.shape[0]


M = TypeVar("M", bound=DecodeMetadata)


class DecodeBackend(Generic[M]):
    """One way of reading the KV cache for decode attention, bound to one cache."""

    name: ClassVar[str]
    reads_windows: ClassVar[bool] = True  # whether it reads sliding-window views

    def __init__(self, cache: KVCache, *, queries_per_kv_head: int, group_tokens: int | None,
                 windowed: bool = False) -> None:
        """``queries_per_kv_head``: G, query heads per KV head on this rank; ``group_tokens``: most
        padded context tokens per decode group (None: all decodes in one group); ``windowed``: it
        reads sliding-window views (``DecodeBackends.windowed``)."""
        self.cache = cache
        self.queries_per_kv_head = queries_per_kv_head
        self.group_tokens = group_tokens
        self.windowed = windowed

    @classmethod
    def supports(cls, cache: KVCache) -> bool:
        """Whether this backend can read ``cache`` (its format, device and kernels)."""
        raise NotImplementedError

    def split(self, widths: list[int]) -> list[tuple[int, int]]:
        """(first, count) of consecutive runs of decodes (sorted by length) reading ``widths``
        blocks each, whose padded K/V stays within the group budget; one run when there is none."""
        if not widths:
            return []
        if self.group_tokens is None:
            return [(0, len(widths))]
        runs: list[tuple[int, int]] = []
        first = widest = 0
        for i, width in enumerate(widths):
            widest = max(widest, width)
            if i > first and (i - first + 1) * widest * self.cache.block_size > self.group_tokens:
                runs.append((first, i - first))
                first, widest = i, width
        runs.append((first, len(widths) - first))
        return runs

    def build(self, span: DecodeSpan) -> M:
        """The metadata ``decode`` reads ``span`` by, built once per step for every layer."""
        raise NotImplementedError

    def decode(self, layer: int, q: torch.Tensor, meta: M) -> torch.Tensor:
        """Attention [Hkv, B, G, D] of scaled queries ``q`` [Hkv, B, G, D] over cache layer ``layer``."""
        raise NotImplementedError

    def prefill_context(self, layer: int, k: torch.Tensor, v: torch.Tensor, own_slots: torch.Tensor,
                        chunk: PrefillChunk) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values [Hkv, S, D] a prefill chunk attends to: its context read back as stored,
        as decode reads it (its own new ``k``, ``v`` [n, Hkv, D] at ``own_slots`` [n] included); a first
        chunk over a cache that stores the compute dtype uses its fresh K/V, the very values a read
        would return."""
        if chunk.kv_slots is None and self.cache.stores_compute_dtype:
            return k.transpose(0, 1), v.transpose(0, 1)  # [Hkv, n, D]
        return self.cache.gather(layer, own_slots if chunk.kv_slots is None else chunk.kv_slots)

    def _to_device(self, t: torch.Tensor) -> torch.Tensor:
        device = self.cache.values.device
        return t if device.type == "cpu" else t.to(device, non_blocking=True)

    def _bias(self, span: DecodeSpan) -> torch.Tensor:
        """[1, B, 1, L] fp32 on the cache's device, L = MB * block_size: 0 where a key is visible,
        -inf elsewhere (padding, keys past the query, keys before its window)."""
        length = span.block_tables.shape[1] * self.cache.block_size
        key = torch.arange(length)[None, :]  # [1, L]
        if span.key_start is not None:
            key = span.key_start + key  # [B, L]
        pos = span.positions[:, None]  # [B, 1]
        hidden = key > pos
        if span.window is not None:
            hidden = hidden | (key <= pos - span.window)
        bias = torch.zeros(hidden.shape, dtype=torch.float32).masked_fill_(hidden, float("-inf"))
        return self._to_device(bias[None, :, None, :])


@dataclass(slots=True)
class FusedMetadata(DecodeMetadata):
    block_tables: torch.Tensor  # [B, MB]
    lens: torch.Tensor  # [B] int64: each sequence's context length, its new token included


class FusedDecode(DecodeBackend[FusedMetadata]):
    name = "fused"
    reads_windows = False

    @classmethod
    def supports(cls, cache: KVCache) -> bool:
        return cache.fused_attention

    def split(self, widths: list[int]) -> list[tuple[int, int]]:
        return [(0, len(widths))] if widths else []  # the kernel stops at each length: padding is free

    def build(self, span: DecodeSpan) -> FusedMetadata:
        assert span.key_start is None and span.window is None, "the fused kernel reads no window"
        return FusedMetadata(span.first, span.count, self._to_device(span.block_tables), span.positions + 1)

    def decode(self, layer: int, q: torch.Tensor, meta: FusedMetadata) -> torch.Tensor:
        return self.cache.decode_attention(layer, q, meta.block_tables, meta.lens)


@dataclass(slots=True)
class InPlaceMetadata(DecodeMetadata):
    bias: torch.Tensor  # [1, B, 1, L] fp32: 0 for the keys seen, -inf elsewhere
    # row (h, b, g) lists the K/V rows ``h * num_slots + slot`` of sequence b's L slots, [Hkv * B * G, L]
    kv_index: torch.Tensor
    score_pattern: torch.Tensor  # the same as a sparse CSR pattern for the SDDMM


class InPlaceDecode(DecodeBackend[InPlaceMetadata]):
    name = "in-place"

    @classmethod
    def supports(cls, cache: KVCache) -> bool:
        return cache.reads_in_place

    def build(self, span: DecodeSpan) -> InPlaceMetadata:
        cache, bs = self.cache, self.cache.block_size
        kv_heads, per_kv_head = cache.num_kv_heads, self.queries_per_kv_head
        b, width = span.block_tables.shape
        length = width * bs
        slots = (span.block_tables[:, :, None] * bs + torch.arange(bs)).view(b, length)  # [B, L]
        heads = torch.arange(kv_heads)[:, None, None, None] * (cache.num_blocks * bs)
        index = (heads + slots[None, :, None, :]).expand(kv_heads, b, per_kv_head, length)
        kv_index = index.reshape(-1, length).contiguous()  # [Hkv * B * G, L]
        rows = kv_index.shape[0]
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")
            pattern = torch.sparse_csr_tensor(
                torch.arange(0, rows * length + 1, length),
                kv_index.view(-1),
                torch.zeros(rows * length, dtype=cache.dtype),
                size=(rows, kv_heads * cache.num_blocks * bs),
                check_invariants=False,
            )
        return InPlaceMetadata(span.first, span.count, self._bias(span), kv_index, pattern)

    def decode(self, layer: int, q: torch.Tensor, meta: InPlaceMetadata) -> torch.Tensor:
        d = q.shape[-1]
        k_rows, v_rows = self.cache.in_place(layer)  # [Hkv * S, D] each
        rows, length = meta.kv_index.shape
        scores = torch.sparse.sampled_addmm(meta.score_pattern, q.reshape(rows, d), k_rows.t(), beta=0.0)
        scores = scores.values().view(*q.shape[:3], length)  # [Hkv, B, G, L]
        probs = torch.softmax(scores.add_(meta.bias), dim=-1)
        out = F.embedding_bag(meta.kv_index, v_rows, mode="sum", per_sample_weights=probs.view(rows, length))
        return out.view(q.shape)  # [Hkv, B, G, D]


@dataclass(slots=True)
class GatheredMetadata(DecodeMetadata):
    block_tables: torch.Tensor  # [B, MB]
    bias: torch.Tensor  # [1, B, 1, L] fp32: 0 for the keys seen, -inf elsewhere


class GatheredDecode(DecodeBackend[GatheredMetadata]):
    name = "gathered"

    @classmethod
    def supports(cls, cache: KVCache) -> bool:
        return True

    def build(self, span: DecodeSpan) -> GatheredMetadata:
        return GatheredMetadata(span.first, span.count, self._to_device(span.block_tables), self._bias(span))

    def decode(self, layer: int, q: torch.Tensor, meta: GatheredMetadata) -> torch.Tensor:
        return gathered_attention(self.cache, layer, q, meta.block_tables, meta.bias)


def gathered_attention(cache: KVCache, layer: int, q: torch.Tensor, block_tables: torch.Tensor,
                       bias: torch.Tensor) -> torch.Tensor:
    """Attention [Hkv, B, G, D] of scaled queries ``q`` [Hkv, B, G, D] over the blocks ``block_tables``
    [B, MB] of cache layer ``layer``, copied out in the compute dtype, ``bias`` [1, B, 1, L] added to the scores."""
    kv = cache.gather_blocks(layer, block_tables)  # K, V [Hkv, B, L, D]
    scores = torch.matmul(q, kv.k.transpose(-1, -2)).float()  # [Hkv, B, G, L]
    if kv.k_scale is not None:
        scores.mul_(kv.k_scale)
    probs = torch.softmax(scores.add_(bias), dim=-1).to(q.dtype)
    if kv.v_scale is not None:
        probs.mul_(kv.v_scale)
    return torch.matmul(probs, kv.v)  # [Hkv, B, G, D]


@dataclass(slots=True)
class StagedMetadata(DecodeMetadata):
    block_tables: torch.Tensor  # [B, MB]
    # [B] int64: each sequence's context length, its new token included, where the fused kernel reads the
    # span (a full-attention view, fp32 compute, kernels built); None: gathered, masked by ``bias``
    lens: torch.Tensor | None
    bias: torch.Tensor | None  # [1, B, 1, L] fp32: 0 for the keys seen, -inf elsewhere


class StagedDecode(DecodeBackend[StagedMetadata]):
    """The staged fp8 cache (gpu_workers.model.kv_staged): decode over the step's tables, which name the
    staging block in place of each query's own block, in the cache's C kernel (full-attention views,
    fp32 compute, kernels built) or else as ``GatheredDecode`` (fp8 blocks read back, the sink and the
    staging block in bf16); a prefill chunk reads its context twice, as stored and as its queries' own
    blocks hold it in bf16, and its mask picks per query."""

    name = "staged"

    @classmethod
    def supports(cls, cache: KVCache) -> bool:
        return cache.format.staged

    def split(self, widths: list[int]) -> list[tuple[int, int]]:
        if self.cache.fused_attention and not self.windowed:  # the C kernel stops at each length, as FusedDecode's
            return [(0, len(widths))] if widths else []
        return super().split(widths)

    def build(self, span: DecodeSpan) -> StagedMetadata:
        tables = self._to_device(span.block_tables)
        if self.cache.fused_attention and span.key_start is None and span.window is None:
            return StagedMetadata(span.first, span.count, tables, span.positions + 1, None)
        return StagedMetadata(span.first, span.count, tables, None, self._bias(span))

    def decode(self, layer: int, q: torch.Tensor, meta: StagedMetadata) -> torch.Tensor:
        if meta.lens is not None:
            return self.cache.decode_attention(layer, q, meta.block_tables, meta.lens)
        assert meta.bias is not None
        return gathered_attention(self.cache, layer, q, meta.block_tables, meta.bias)

    def prefill_context(self, layer: int, k: torch.Tensor, v: torch.Tensor, own_slots: torch.Tensor,
                        chunk: PrefillChunk) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values [Hkv, 2S, D]: the S context keys as stored, then as bf16 (the staged tokens
        of the first query's block, and the chunk's own tokens rounded to bf16)."""
        cache = self.cache
        assert isinstance(cache, StagedKVCache) and chunk.kv_slots is not None
        s, n = chunk.kv_slots.shape[0], k.shape[0]
        own = chunk.kv_slots.clone()  # the context as the first query's block holds it: its staged tokens in bf16
        if chunk.dense_slots is not None and chunk.dense_slots.numel():
            dense = chunk.dense_slots + cache.num_blocks * cache.block_size  # dense slots as gather reads them
            own[chunk.dense_from : chunk.dense_from + dense.shape[0]] = dense
        keys, values = cache.gather(layer, torch.cat((chunk.kv_slots, own)))  # [Hkv, 2S, D] each, one read
        keys[:, 2 * s - n :] = k.to(DENSE_DTYPE).transpose(0, 1)  # the chunk's own tokens, rounded to bf16
        values[:, 2 * s - n :] = v.to(DENSE_DTYPE).transpose(0, 1)
        return keys, values


# In order of preference: a cache is read by the first that supports it (GatheredDecode reads any).
DECODE_BACKENDS: tuple[type[DecodeBackend[Any]], ...] = (StagedDecode, FusedDecode, InPlaceDecode, GatheredDecode)


@dataclass(frozen=True, slots=True)
class DecodeBackends:
    """The backends reading one cache: ``full`` for full-attention views, ``windowed`` for sliding-window ones."""

    full: DecodeBackend[Any]
    windowed: DecodeBackend[Any]

    @classmethod
    def choose(cls, cache: KVCache, *, queries_per_kv_head: int, group_tokens: int | None) -> DecodeBackends:
        def first(*, window: bool) -> DecodeBackend[Any]:
            backend = next(b for b in DECODE_BACKENDS if b.supports(cache) and (b.reads_windows or not window))
            return backend(cache, queries_per_kv_head=queries_per_kv_head, group_tokens=group_tokens, windowed=window)

        return cls(first(window=False), first(window=True))
