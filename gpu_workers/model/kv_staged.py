"""The staged fp8 KV cache (``--kv-dtype fp8_e4m3``): centred fp8 blocks, with each sequence's sink
and newest block kept in bf16.

Numerics: gpu_workers.model.kv_quant (keys centred per (block, channel) under per-channel scales,
values per token), measured on real models by benchmarks/kv_schemes.py "kv_quant + own + sink".
A block is quantized once, when it completes, from its tokens' bf16 values, with its whole
statistics; what a query at position ``p`` (in block ``b``) reads is then a function of positions
alone, whichever step wrote what:

- block 0 (the attention sink) in bf16: it lives in a dense block (its table entry is a dense id);
- blocks ``1 .. b-1`` as their fp8 codes read back;
- its own block ``b`` in bf16: the sequence's staging block (``Chunk.staging``, one dense block per
  KV cache group) holds the tokens of its newest, incomplete block; a prefill chunk's own tokens
  come from the chunk itself, rounded to bf16 as the staging block would hold them.

Two pools: ``num_blocks`` fp8 blocks (ids ``[0, num_blocks)``: codes, K's centres and scales, V's
token scales) and ``num_dense_blocks`` bf16 blocks (ids ``[num_blocks, num_blocks +
num_dense_blocks)``: sinks and staging blocks), one id space so that a block table can hold both.
The block manager (gpu_workers.block_manager) hands out dense blocks for table entry 0 and for
staging. Each step's writes are planned once (``StagedWrites``, gpu_workers.step_inputs): tokens of
block 0 and of each chunk's last block go to dense blocks (a prefill chunk's once attention has read
the staging block's earlier tokens); a block that completes in the step is
quantized from its staged tokens and the step's own into its fp8 home block (its table entry).
Reads: ``gather_blocks`` (decode: fp8 blocks read back, dense ones as they are) and ``gather`` (a
prefill chunk's context, by slot). Scales per KV head, so the cache shards by head with tensor
parallelism like the others.

On CPUs where a C compiler builds them, gpu_workers.model.kv_staged_kernels does each layer's reads,
decode attention and writes in one call each (the same codes and reads bit for bit; attention to fp32
rounding); the torch code below is the reference and the fallback.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from gpu_workers.model import kv_quant, kv_staged_kernels
from gpu_workers.model.fp8 import SCALE_DTYPE
from gpu_workers.model.fp8_kernels import AttentionLayer
from gpu_workers.model.kv_cache import BlockKV, KVCache

DENSE_DTYPE = torch.bfloat16


def dense_pool_blocks(budget: int, dense_bytes: int, *, num_groups: int, max_num_seqs: int) -> int:
    """Dense (bf16) blocks a staged cache sets aside out of ``budget`` bytes, each ``dense_bytes``: a
    sink and a staging block per KV cache group for every sequence ``max_num_seqs`` allows, at most a
    quarter of the budget (but always one sequence's). Fewer would cap the sequences run at once
    below ``max_num_seqs`` while fp8 blocks sit free."""
    return min(2 * num_groups * max_num_seqs, max(2 * num_groups, budget // 4 // dense_bytes))


@dataclass(slots=True)
class StagedWrites:
    """A step's writes into a staged cache (one KV cache group's view), computed once per step and
    used by every layer. Rows index the step's tokens; dense slots are ``dense id * block_size +
    offset`` counted from the dense pool's first block."""

    dense_rows: torch.Tensor  # [Td] int64: tokens stored in bf16 (block 0, each chunk's last block)
    dense_slots: torch.Tensor  # [Td] int64: their dense slots (the sink, or the staging block)
    complete_blocks: torch.Tensor  # [C] int64: fp8 blocks completed this step (their home ids)
    # [C * block_size] int64: each completed block's tokens in order, as rows of the step's tokens
    # (< T) or T + i for the i-th of ``staged_slots`` (tokens staged by earlier steps)
    complete_src: torch.Tensor
    staged_slots: torch.Tensor  # [Ts] int64: dense slots of the staged tokens completions read
    # [Tl] int64 each: prefill chunks' tokens of their last block, staged after attention (``write_late``):
    # a chunk that spans blocks reads the staged tokens of its first block, in the same staging block
    late_rows: torch.Tensor
    late_slots: torch.Tensor


class StagedKVCache(KVCache):
    """The fp8 pool (``values``: uint8 codes [layer, k|v, head, slot, D], and the scales) and the bf16
    dense pool (``dense`` [layer, k|v, head, dense slot, D])."""

    def __init__(self, *, num_dense_blocks: int, fused_kernels: bool = True, **kwargs: Any) -> None:
        """``num_dense_blocks``: bf16 blocks for sinks and staging; ``fused_kernels``: read with the C
        kernels of gpu_workers.model.kv_staged_kernels on CPUs where they build (False: torch only); the rest
        as ``KVCache``'s."""
        super().__init__(**{**kwargs, "fused_kernels": False})
        assert self.format.staged, f"{self.format} is not a staged format"
        layers, heads, d, nb = self.num_layers, self.num_kv_heads, self.head_dim, self.num_blocks
        device = self.values.device
        self.num_dense_blocks = num_dense_blocks
        self.dense = torch.zeros(layers, 2, heads, num_dense_blocks * self.block_size, d, dtype=DENSE_DTYPE,
                                 device=device)
        self.k_centre = torch.zeros(layers, heads, nb, d, dtype=torch.uint8, device=device)  # fp8 codes
        self.k_centre_scale = torch.ones(layers, heads, nb, dtype=SCALE_DTYPE, device=device)
        self.k_scale = torch.ones(layers, heads, nb, d, dtype=DENSE_DTYPE, device=device)  # per channel
        self.v_scale = torch.ones(layers, heads, nb * self.block_size, dtype=DENSE_DTYPE, device=device)  # per token
        self.staged_kernels: kv_staged_kernels.StagedKernels | None = None
        if fused_kernels and device.type == "cpu":
            self.staged_kernels = kv_staged_kernels.load(d, self.block_size)

    def kernel_layer(self, layer: int) -> kv_staged_kernels.StagedLayer:
        """Layer ``layer``'s tensors as the C kernels read them."""
        return kv_staged_kernels.StagedLayer(self.values[layer], self.k_centre[layer], self.k_centre_scale[layer],
                                             self.k_scale[layer], self.v_scale[layer], self.dense[layer],
                                             self.storage_dtype)

    def bytes_per_dense_block(self) -> int:
        """Bytes one dense block takes across all layers, K and V."""
        return self.num_layers * 2 * self.num_kv_heads * self.format.dense_bytes_per_head_block(
            self.block_size, self.head_dim)

    def nbytes(self) -> int:
        """Bytes of both pools."""
        return self.bytes_per_block() * self.num_blocks + self.bytes_per_dense_block() * self.num_dense_blocks

    @property
    def stores_compute_dtype(self) -> bool:
        return False

    @property
    def reads_in_place(self) -> bool:
        return False

    @property
    def fused_attention(self) -> bool:
        """Whether decode attention can run in one C kernel (``decode_attention``: full attention views,
        fp32 compute, on a CPU where the kernels build)."""
        return self.staged_kernels is not None and self.dtype == torch.float32

    def attention_kernel(self, layer: int, *, heads: int, scale: float) -> tuple[int, AttentionLayer] | None:
        """As ``KVCache.attention_kernel``: ``attend_staged`` (``write_staged``'s stores, then
        ``decode_attention``) where the kernels are loaded, compute is fp32 and the codes e4m3."""
        if not self.fused_attention or self.storage_dtype != torch.float8_e4m3fn or self.staged_kernels is None:
            return None
        t = self.kernel_layer(layer)
        num_blocks, num_dense, _ = t.sizes(self.block_size)
        layer_ = AttentionLayer(None, None, *t.pointers(), num_blocks, num_dense, heads, self.num_kv_heads, scale)
        layer_._tensors = (t.codes, t.centre, t.centre_scale, t.k_scale, t.v_scale, t.dense)
        return self.staged_kernels.attend_address(), layer_

    def decode_attention(self, layer: int, q: torch.Tensor, block_tables: torch.Tensor,
                         lens: torch.Tensor) -> torch.Tensor:
        """Attention [Hkv, B, G, D] of scaled queries ``q`` [Hkv, B, G, D] over the first ``lens`` [B]
        tokens of the blocks ``block_tables`` [B, MB] list (fp8 and dense ids), as ``gather_blocks``
        reads them."""
        assert self.staged_kernels is not None
        out = torch.empty(q.shape, dtype=torch.float32)
        return self.staged_kernels.staged_decode_attention(self.kernel_layer(layer), block_tables, lens,
                                                           q.contiguous(), out)

    # --- writes ---------------------------------------------------------------------------------

    def write(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        raise TypeError("a staged KV cache is written by the step's plan (write_staged)")

    def write_staged(self, layer: int, plan: StagedWrites, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store the step's new tokens' ``k``, ``v`` [T, Hkv, D] as ``plan`` says: completed blocks
        quantized into their fp8 blocks (read from the staging blocks first), then the bf16 writes."""
        if self.staged_kernels is not None and k.dtype == torch.float32 and self.storage_dtype == torch.float8_e4m3fn:
            self.staged_kernels.staged_write(self.kernel_layer(layer), k, v, complete_blocks=plan.complete_blocks,
                                             complete_src=plan.complete_src, staged_slots=plan.staged_slots,
                                             dense_rows=plan.dense_rows, dense_slots=plan.dense_slots)
            return
        fresh = torch.stack((k, v)).to(DENSE_DTYPE).transpose(1, 2)  # [2, Hkv, T, D]
        if plan.complete_blocks.numel():
            heads, bs, d = self.num_kv_heads, self.block_size, self.head_dim
            staged = self.dense[layer].index_select(2, plan.staged_slots)  # [2, Hkv, Ts, D]
            blocks = torch.cat((fresh, staged), dim=2).index_select(2, plan.complete_src)
            blocks = blocks.view(2, heads, -1, bs, d)  # [2, Hkv, C, BS, D]
            ids = plan.complete_blocks
            qk = kv_quant.quantize_keys(blocks[0], self.storage_dtype)
            qv = kv_quant.quantize_values(blocks[1], self.storage_dtype)
            slots = (ids[:, None] * bs + torch.arange(bs, device=ids.device)).view(-1)
            self.values[layer, 0].index_copy_(1, slots, qk.codes.view(heads, -1, d))
            self.values[layer, 1].index_copy_(1, slots, qv.codes.view(heads, -1, d))
            self.k_centre[layer].index_copy_(1, ids, qk.centre_codes)
            self.k_centre_scale[layer].index_copy_(1, ids, qk.centre_scale)
            self.k_scale[layer].index_copy_(1, ids, qk.scale)
            self.v_scale[layer].index_copy_(1, slots, qv.scale.reshape(heads, -1))
        if plan.dense_rows.numel():
            self.dense[layer].index_copy_(2, plan.dense_slots, fresh.index_select(2, plan.dense_rows))

    def write_late(self, layer: int, plan: StagedWrites, k: torch.Tensor, v: torch.Tensor) -> None:
        """Stage the prefill chunks' newest tokens (``plan.late_rows`` of ``k``, ``v`` [T, Hkv, D]), once
        the layer's attention has read the staging blocks' earlier tokens."""
        if plan.late_rows.numel():
            fresh = torch.stack((k.index_select(0, plan.late_rows), v.index_select(0, plan.late_rows)))
            self.dense[layer].index_copy_(2, plan.late_slots, fresh.to(DENSE_DTYPE).transpose(1, 2))

    # --- reads ----------------------------------------------------------------------------------

    def _read_slots(self, layer: int, slots: torch.Tensor) -> torch.Tensor:
        """fp32 K and V [2, Hkv, S, D] of fp8-pool ``slots`` [S] (each read back from its block)."""
        blocks = slots // self.block_size
        codes = self.values[layer].index_select(2, slots)  # [2, Hkv, S, D]
        keys = kv_quant.QuantizedKeys(
            codes[0][:, :, None, :],  # [Hkv, S, 1, D]: each token a block of one
            self.k_centre[layer].index_select(1, blocks), self.k_centre_scale[layer].index_select(1, blocks),
            self.k_scale[layer].index_select(1, blocks), self.storage_dtype,
        )
        values = kv_quant.QuantizedValues(codes[1], self.v_scale[layer].index_select(1, slots), self.storage_dtype)
        return torch.stack((kv_quant.dequantize_keys(keys)[:, :, 0], kv_quant.dequantize_values(values)))

    def gather(self, layer: int, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V [Hkv, S, D] in the compute dtype of ``slots`` [S] (dense slots are those past the
        fp8 pool's, ``num_blocks * block_size + dense slot``)."""
        if self.staged_kernels is not None:
            kv = self.staged_kernels.staged_gather(self.kernel_layer(layer), slots).to(self.dtype)
            return kv[0], kv[1]
        fp8_slots = self.num_blocks * self.block_size
        dense = slots >= fp8_slots
        kv = self._read_slots(layer, torch.where(dense, 0, slots))
        where = dense.nonzero()[:, 0]
        if where.numel():
            kv.index_copy_(2, where, self.dense[layer].index_select(2, slots[where] - fp8_slots).float())
        return kv[0].to(self.dtype), kv[1].to(self.dtype)

    def gather_dense(self, layer: int, dense_slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V [Hkv, S, D] in the compute dtype of dense pool slots ``dense_slots`` [S]."""
        kv = self.dense[layer].index_select(2, dense_slots).to(self.dtype)
        return kv[0], kv[1]

    def gather_blocks(self, layer: int, block_tables: torch.Tensor) -> BlockKV:
        """K and V [Hkv, B, MB * block_size, D] in the compute dtype of the blocks ``block_tables``
        [B, MB] lists, fp8 blocks read back, dense ones as they are (scales applied: none returned)."""
        b, mb = block_tables.shape
        ids = block_tables.reshape(-1)
        heads, bs, d, nb = self.num_kv_heads, self.block_size, self.head_dim, self.num_blocks
        if self.staged_kernels is not None:
            slots = (ids[:, None] * bs + torch.arange(bs)).view(-1)  # [B * MB * BS]
            kv = self.staged_kernels.staged_gather(self.kernel_layer(layer), slots).to(self.dtype)
            kv = kv.view(2, heads, b, mb * bs, d)
            return BlockKV(kv[0], kv[1])
        dense = ids >= nb
        fp8_ids = torch.where(dense, 0, ids)
        codes = self.values[layer].view(2, heads, nb, bs, d).index_select(2, fp8_ids)  # [2, Hkv, n, BS, D]
        keys = kv_quant.QuantizedKeys(codes[0], self.k_centre[layer].index_select(1, fp8_ids),
                                      self.k_centre_scale[layer].index_select(1, fp8_ids),
                                      self.k_scale[layer].index_select(1, fp8_ids), self.storage_dtype)
        scales = self.v_scale[layer].view(heads, nb, bs).index_select(1, fp8_ids)
        values = kv_quant.QuantizedValues(codes[1], scales, self.storage_dtype)
        kv = torch.stack((kv_quant.dequantize_keys(keys), kv_quant.dequantize_values(values)))
        where = dense.nonzero()[:, 0]
        if where.numel():
            pool = self.dense[layer].view(2, heads, self.num_dense_blocks, bs, d)
            kv.index_copy_(2, where, pool.index_select(2, ids[where] - nb).float())
        kv = kv.to(self.dtype).view(2, heads, b, mb * bs, d)
        return BlockKV(kv[0], kv[1])
