"""Paged attention over the KV cache for a flattened, unpadded batch of tokens.

A step's tokens are laid out decode tokens first (one per sequence, each attending to everything
its sequence has cached), then prefill chunks (several tokens of one sequence, attending causally
to the ``start`` tokens already cached and to each other). Every layer first writes all new K/V
into their cache slots, then attends:

- decode: batched over sequences. Decoding sequences come sorted by context length, split into a
  few groups (one on GPUs) so that padding each to its longest context (masked) wastes little.
  The queries of each KV head are viewed as [Hkv, B, G, D], so grouped-query attention never
  repeats K/V. How the cache is read (a fused kernel, in place, or gathered) is the view's decode
  backend's (gpu_workers.model.decode_backends), chosen once for the cache.
- prefill: a loop over chunks using ``scaled_dot_product_attention`` (GQA handled by the kernel),
  with a causal mask offset by ``start``. Every chunk reads its whole context, its own new tokens
  included, back from the cache, exactly as decode reads it (fp8 codes dequantized, bf16 rounded):
  a token's K/V look the same to every later query whichever step wrote them, so a request's
  logits do not depend on what was cached before it or on how its prompt was chunked. (vLLM lets
  a first chunk attend to its unquantized K/V; that made a warm prefix cache change answers.)
  Only where the cache stores the compute dtype itself does a first chunk use its fresh K/V: they
  are the very values a read would return. With the staged fp8 cache (gpu_workers.model.kv_staged)
  a chunk's keys are its context twice, as stored and as each query's own block holds them in bf16,
  and its mask picks for every query the copy a decode at its position would read.

Sliding-window layers (``sliding_window`` W: a query at position p sees keys p - W < k <= p, as
transformers' ``sliding_window_overlay``) read the step's view for their window
(``AttentionBatch.windowed``): decode block tables cut to the blocks that hold the window, with the
slots outside it masked, and prefill chunks whose keys start at the first one in any query's window.
Blocks wholly before the window are never read (the block manager gives them back).

KV cache groups (gpu_workers.kv_cache_groups.KVCacheGroups): each layer reads and writes its group's
blocks, so each group has its own view of the step (``AttentionBatch.groups``: the same tokens, its
own slot mapping and block tables), and the layer's K/V sit at its index within the group
(``cache_layer``) in the cache's per-block layers.

Softmax runs in fp32 (explicitly for decode; SDPA kernels accumulate in fp32).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from gpu_workers.model.attention_metadata import AttentionBatch, DecodeMetadata, PrefillChunk
from gpu_workers.model.kv_cache import KVCache
from gpu_workers.model.kv_staged import StagedKVCache

__all__ = ["AttentionBatch", "PagedAttention", "PrefillChunk"]


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
        # In a compiled model (gpu_workers.model.compilation): this layer's index among the model's
        # attentions, by which the graph calls it through the opaque op ``ryzanstein::attention``.
        self.op_index: int | None = None

    def place(self, kv_group: int, cache_layer: int) -> None:
        """Read and write KV cache group ``kv_group``'s blocks, at layer ``cache_layer`` of them."""
        self.kv_group, self.cache_layer = kv_group, cache_layer

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: AttentionBatch | None, cache: KVCache | None
    ) -> torch.Tensor:
        """Attention output [T, H * D] for queries ``q`` [T, H, D] and new keys/values [T, Hkv, D].
        ``batch`` and ``cache`` None: in a compiled graph, through ``ryzanstein::attention``, which
        reads them from the forward context (gpu_workers.model.compilation)."""
        if batch is None or cache is None:
            assert self.op_index is not None, "an eager step needs its batch and cache"
            return torch.ops.ryzanstein.attention(q, k, v, self.op_index)
        if batch.groups:
            batch = batch.groups[self.kv_group]
        staged = batch.staged
        if staged is not None:
            assert isinstance(cache, StagedKVCache)
            cache.write_staged(self.cache_layer, staged, k, v)
        else:
            cache.write(self.cache_layer, batch.slot_mapping, k, v)
        if self.sliding_window is not None:
            batch = batch.windowed[self.sliding_window]
        nd = batch.num_decode
        if not batch.prefills:
            return self._decode(q, batch)
        out = torch.empty_like(q)
        if nd:
            out[:nd] = self._decode(q[:nd], batch).view(nd, self.num_heads, self.head_dim)
        for p in batch.prefills:
            span = slice(p.first, p.first + p.length)
            out[span] = self._prefill(q[span], k[span], v[span], batch.slot_mapping[span], p, batch)
        if staged is not None:
            cache.write_late(self.cache_layer, staged, k, v)  # type: ignore[attr-defined]
        return out.view(q.shape[0], -1)

    def _decode(self, q: torch.Tensor, batch: AttentionBatch) -> torch.Tensor:
        """[B, H * D] for decode queries ``q`` [B, H, D]."""
        if len(batch.decode_groups) == 1:
            return self._decode_group(q, batch, batch.decode_groups[0])
        out = q.new_empty(q.shape[0], self.num_heads * self.head_dim)
        for g in batch.decode_groups:
            out[g.first : g.first + g.count] = self._decode_group(q[g.first : g.first + g.count], batch, g)
        return out

    def _decode_group(self, q: torch.Tensor, batch: AttentionBatch, group: DecodeMetadata) -> torch.Tensor:
        b, heads, d = q.shape
        kv_heads = self.num_kv_heads
        qg = (q * self.scale).view(b, kv_heads, heads // kv_heads, d).transpose(0, 1)  # [Hkv, B, G, D]
        out = batch.decode_backend.decode(self.cache_layer, qg, group)  # [Hkv, B, G, D]
        return out.permute(1, 0, 2, 3).reshape(b, heads * d)

    def _prefill(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, own_slots: torch.Tensor, p: PrefillChunk,
        batch: AttentionBatch,
    ) -> torch.Tensor:
        """[n, H, D] for a chunk's queries ``q`` [n, H, D]; its new K/V ``k``, ``v`` [n, Hkv, D] lie at ``own_slots`` [n]."""
        keys, values = batch.decode_backend.prefill_context(self.cache_layer, k, v, own_slots, p)  # [Hkv, S, D]
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
