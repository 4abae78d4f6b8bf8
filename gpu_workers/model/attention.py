"""Paged attention over the KV cache for a flattened, unpadded batch of tokens.

A step's tokens are laid out decode tokens first (one per sequence, each attending to everything
its sequence has cached), then prefill chunks (several tokens of one sequence, attending causally
to the ``start`` tokens already cached and to each other). Every layer first writes all new K/V
into their cache slots, then attends:

- decode: batched over sequences. Decoding sequences come sorted by context length, split into a
  few groups (one on GPUs) so that padding each to its longest context (masked) wastes little.
  The queries of each KV head are viewed as [Hkv, B, G, D], so grouped-query attention never
  repeats K/V. Three ways to read the cache:
  - fused (an fp32 cache, or an fp8 one with per-block or per-tensor scales, on a CPU where the
    kernels build): one kernel per layer computes the scores, the softmax and the weighted sum of V
    for each (KV head, sequence), reading every K and V row once for the head's G queries and only
    up to the sequence's length, fp8 codes converted as they are read (1 byte per value read); all
    decodes form one group, since padding costs nothing there;
  - in place (fp32 cache on a CPU, without the kernels): a sampled matmul (SDDMM,
    ``torch.sparse.sampled_addmm``) computes exactly the (query row, context slot) scores from the
    pool, and ``embedding_bag`` sums the V rows weighted by the probabilities: nothing is copied;
  - gathered (other dtypes, GPUs): the group's blocks are copied into [Hkv, B, L, D] (converted
    from the storage dtype), then two batched matmuls; fp8 scales multiply scores and probabilities.
- prefill: a loop over chunks using ``scaled_dot_product_attention`` (GQA handled by the kernel),
  with a causal mask offset by ``start``. Every chunk reads its whole context, its own new tokens
  included, back from the cache, exactly as decode reads it (fp8 codes dequantized, bf16 rounded):
  a token's K/V look the same to every later query whichever step wrote them, so a request's
  logits do not depend on what was cached before it or on how its prompt was chunked. (vLLM lets
  a first chunk attend to its unquantized K/V; that made a warm prefix cache change answers.)
  Only where the cache stores the compute dtype itself does a first chunk use its fresh K/V: they
  are the very values a read would return.

Sliding-window layers (``sliding_window`` W: a query at position p sees keys p - W < k <= p, as
transformers' ``sliding_window_overlay``) read the step's view for their window
(``AttentionBatch.windowed``): decode block tables cut to the blocks that hold the window, with the
slots outside it masked, and prefill chunks whose keys start at the first one in any query's window.
Blocks wholly before the window are never read (the block manager gives them back).

KV cache groups (gpu_workers.block_manager.KVCacheGroups): each layer reads and writes its group's
blocks, so each group has its own view of the step (``AttentionBatch.groups``: the same tokens, its
own slot mapping and block tables), and the layer's K/V sit at its index within the group
(``cache_layer``) in the cache's per-block layers.

Softmax runs in fp32 (explicitly for decode; SDPA kernels accumulate in fp32).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from gpu_workers.model.kv_cache import KVCache


@dataclass(slots=True)
class PrefillChunk:
    first: int  # index of its first token in the step's flattened tokens
    length: int  # tokens computed now
    start: int  # tokens of this sequence already cached (prefix-cache hits, earlier chunks)
    # [S] cache slots of the keys it attends to (its context, or the part in its window); None: it
    # attends only to its own new tokens (nothing cached before it), read back from their slots
    kv_slots: torch.Tensor | None
    # [length, S] bool (or [length, length] when kv_slots is None), True where a key is visible;
    # None: plain causal attention over its own tokens
    mask: torch.Tensor | None


@dataclass(slots=True)
class DecodeGroup:
    first: int  # index of its first token (= sequence) among the step's tokens
    count: int  # sequences in the group, one token each
    block_tables: torch.Tensor  # [B, MB] blocks of each sequence, padded
    # [1, B, 1, L] fp32, L = MB * block_size: 0 for the context, -inf beyond (not for fused reads)
    bias: torch.Tensor | None = None
    # In-place reads only: row (h, b, g) lists the K/V rows ``h * num_slots + slot`` of sequence
    # b's L context slots, [Hkv * B * G, L]; and the same as a sparse CSR pattern for the SDDMM.
    kv_index: torch.Tensor | None = None
    score_pattern: torch.Tensor | None = None
    # Fused reads only: each sequence's context length (its new token included), [B] int64.
    lens: torch.Tensor | None = None


@dataclass(slots=True)
class AttentionBatch:
    """What attention needs to know about a step, built once per step and shared by all layers."""

    slot_mapping: torch.Tensor  # [T] cache slot of every new token
    num_decode: int = 0  # tokens [0, num_decode) are decode tokens, one per sequence
    decode_groups: list[DecodeGroup] = field(default_factory=list)  # covering [0, num_decode) in order
    prefills: list[PrefillChunk] = field(default_factory=list)
    # Dynamic NTK RoPE only: each token's sequence length at the end of its chunk, when some
    # sequence is past max_position_embeddings (None otherwise).
    rope_seq_lens: torch.Tensor | None = None
    # Sliding-window layers' views of this step, by window: the same tokens and slot mapping, with
    # decode groups and prefill chunks that read only the window; the step itself when the window
    # holds every sequence's whole context.
    windowed: dict[int, AttentionBatch] = field(default_factory=dict)
    # Every KV cache group's view of this step, by group (this batch is group 0's); empty: one group.
    groups: list[AttentionBatch] = field(default_factory=list)


class PagedAttention(nn.Module):
    def __init__(self, layer: int, *, num_heads: int, num_kv_heads: int, head_dim: int, scale: float | None = None,
                 sliding_window: int | None = None) -> None:
        """``scale``: of the query-key products (default ``head_dim ** -0.5``); ``sliding_window``:
        tokens each query sees, its own included (None: all before it). The layer's place in the KV
        cache (``kv_group``, ``cache_layer``) is its model index in group 0 until ``place`` says."""
        super().__init__()
        self.layer = layer
        self.kv_group = 0
        self.cache_layer = layer
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = head_dim**-0.5 if scale is None else scale
        self.sliding_window = sliding_window

    def place(self, kv_group: int, cache_layer: int) -> None:
        """Read and write KV cache group ``kv_group``'s blocks, at layer ``cache_layer`` of them."""
        self.kv_group, self.cache_layer = kv_group, cache_layer

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: AttentionBatch, cache: KVCache
    ) -> torch.Tensor:
        """Attention output [T, H * D] for queries ``q`` [T, H, D] and new keys/values [T, Hkv, D]."""
        if batch.groups:
            batch = batch.groups[self.kv_group]
        cache.write(self.cache_layer, batch.slot_mapping, k, v)
        if self.sliding_window is not None:
            batch = batch.windowed[self.sliding_window]
        nd = batch.num_decode
        if not batch.prefills:
            return self._decode(q, batch, cache)
        out = torch.empty_like(q)
        if nd:
            out[:nd] = self._decode(q[:nd], batch, cache).view(nd, self.num_heads, self.head_dim)
        for p in batch.prefills:
            span = slice(p.first, p.first + p.length)
            out[span] = self._prefill(q[span], k[span], v[span], batch.slot_mapping[span], p, cache)
        return out.view(q.shape[0], -1)

    def _decode(self, q: torch.Tensor, batch: AttentionBatch, cache: KVCache) -> torch.Tensor:
        """[B, H * D] for decode queries ``q`` [B, H, D]."""
        if len(batch.decode_groups) == 1:
            return self._decode_group(q, batch.decode_groups[0], cache)
        out = q.new_empty(q.shape[0], self.num_heads * self.head_dim)
        for g in batch.decode_groups:
            out[g.first : g.first + g.count] = self._decode_group(q[g.first : g.first + g.count], g, cache)
        return out

    def _decode_group(self, q: torch.Tensor, group: DecodeGroup, cache: KVCache) -> torch.Tensor:
        b, heads, d = q.shape
        kv_heads = self.num_kv_heads
        qg = (q * self.scale).view(b, kv_heads, heads // kv_heads, d).transpose(0, 1)  # [Hkv, B, G, D]
        if group.lens is not None:
            out = cache.decode_attention(self.cache_layer, qg, group.block_tables, group.lens)  # [Hkv, B, G, D]
        elif group.kv_index is not None:
            k_rows, v_rows = cache.in_place(self.cache_layer)  # [Hkv * S, D] each
            rows, length = group.kv_index.shape
            scores = torch.sparse.sampled_addmm(group.score_pattern, qg.reshape(rows, d), k_rows.t(), beta=0.0)
            scores = scores.values().view(*qg.shape[:3], length)  # [Hkv, B, G, L]
            probs = torch.softmax(scores.add_(group.bias), dim=-1)
            out = F.embedding_bag(group.kv_index, v_rows, mode="sum", per_sample_weights=probs.view(rows, length))
            out = out.view(qg.shape)  # [Hkv, B, G, D]
        else:
            kv = cache.gather_blocks(self.cache_layer, group.block_tables)  # K, V [Hkv, B, L, D]
            scores = torch.matmul(qg, kv.k.transpose(-1, -2)).float()  # [Hkv, B, G, L]
            if kv.k_scale is not None:
                scores.mul_(kv.k_scale)
            assert group.bias is not None, "a gathered-read decode group comes with its bias (ModelRunner)"
            probs = torch.softmax(scores.add_(group.bias), dim=-1).to(q.dtype)
            if kv.v_scale is not None:
                probs.mul_(kv.v_scale)
            out = torch.matmul(probs, kv.v)  # [Hkv, B, G, D]
        return out.permute(1, 0, 2, 3).reshape(b, heads * d)

    def _prefill(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, own_slots: torch.Tensor, p: PrefillChunk,
        cache: KVCache,
    ) -> torch.Tensor:
        """[n, H, D] for a chunk's queries ``q`` [n, H, D]; its new K/V ``k``, ``v`` [n, Hkv, D] lie at ``own_slots`` [n]."""
        if p.kv_slots is None and cache.stores_compute_dtype:
            keys, values = k.transpose(0, 1), v.transpose(0, 1)  # [Hkv, n, D]
        else:  # read back as stored, as decode reads them
            keys, values = cache.gather(self.cache_layer, own_slots if p.kv_slots is None else p.kv_slots)  # [Hkv, S, D]
        out = F.scaled_dot_product_attention(
            q.transpose(0, 1)[None],  # [1, H, n, D]
            keys[None],
            values[None],
            attn_mask=p.mask,
            is_causal=p.mask is None,
            scale=self.scale,
            enable_gqa=True,
        )
        return out[0].transpose(0, 1)  # [n, H, D]
