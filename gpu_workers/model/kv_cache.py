"""The paged KV cache: fixed-size blocks of token slots for every layer, in one allocation.

Slot ``s`` is token ``s % block_size`` of block ``s // block_size``; a sequence's block table lists
its blocks in order, so its token at position ``p`` lives in slot
``block_table[p // block_size] * block_size + p % block_size``.

Layout per layer and K/V: [num_kv_heads, num_blocks, block_size, head_dim], head-major so that the
blocks of many sequences gathered for one head form one contiguous [tokens, head_dim] matrix per
(head, sequence): attention then runs as a single batched matmul with no further copy.

KV formats (``--kv-dtype``, gpu_workers.model.kv_format): fp32, bf16 and fp16 store values as they are.
The default, ``fp8_e4m3``, centres keys per (block, channel) and keeps each sequence's sink and newest
block in bf16: its cache is gpu_workers.model.kv_staged's ``StagedKVCache``, a subclass. The other fp8
formats store uint8 codes of ``value / scale`` (gpu_workers.model.fp8) with fp32 scales:

- per block (``fp8_e4m3_block``, the default until issue 17, and ``fp8_e5m2``): one power-of-two scale per (block, KV
  head) for K and one for V, the smallest that holds the block's largest value. A block fills token
  by token; a token larger than the block's scale allows grows it, and the block's earlier codes are
  rescaled, which is exact for a power-of-two ratio (only values pushed below the smallest subnormal
  lose bits). A write at a block's first slot starts the block afresh. This relies on the block
  manager's invariant: a sequence writes only slots at or after its computed tokens and only full,
  computed blocks are shared, so a block written at offset ``o`` holds exactly its own sequence's
  tokens ``[0, o)``, all under the block's current scale; shared blocks are never written.
  Scales cost 4 bytes per block per head, 0.25 bytes per token at 16-token blocks.
- per tensor (``fp8_e4m3_per_tensor``): one static scale per layer for K and for V, 1.0 (what vLLM
  uses when a checkpoint has no calibrated scales); values past ±448 saturate, small ones fall into
  the subnormals. Kept to measure against (benchmarks/kv_cache.py).
- per token (``fp8_e4m3_per_token``): one exact scale per (token, KV head), 4 bytes per token per
  head: the alternative per-block scales were measured against; not offered on the command line.

Reads: ``gather`` (a prefill chunk's context by slot), ``gather_blocks`` (whole blocks, converted to
the compute dtype, fp8 scales returned for attention to apply to scores and probabilities),
``in_place`` (an fp32 pool as it lies) and ``decode_attention`` (the fused CPU kernel,
gpu_workers.model.fp8_kernels, converting codes as it reads them, only the blocks each sequence
lists and only up to its length). Which of them decode attention uses is its decode backend's,
chosen once per cache (gpu_workers.model.decode_backends) from ``fused_attention`` and
``reads_in_place``.

The pool must start zeroed: attention reads whole blocks and masks the unused slots, and a masked
NaN would still poison the weighted sum (no write ever produces a NaN or inf code).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gpu_workers.model import fp8_kernels
from gpu_workers.model.config import ModelConfig
from gpu_workers.model.fp8 import SCALE_DTYPE, code_values, pow2_scale, quantize, quantize_per_vector
from gpu_workers.model.kv_format import KV_FORMATS, KVFormat, kv_format
from gpu_workers.startup import phase

__all__ = ["KV_FORMATS", "BlockKV", "KVCache", "KVFormat", "kv_bytes_per_block", "kv_bytes_per_token", "kv_format"]

STATIC_SCALE = 1.0  # per-tensor scheme: the scale of every layer's K and V


def kv_bytes_per_block(config: ModelConfig, kv_dtype: str | KVFormat, *, block_size: int, tp_size: int = 1) -> int:
    """Cache bytes one block takes on one rank, all layers, K and V, scales included."""
    per_head = kv_format(kv_dtype).bytes_per_head_block(block_size, config.head_dim)
    return config.num_hidden_layers * 2 * config.kv_heads_per_rank(tp_size) * per_head


def kv_bytes_per_token(config: ModelConfig, kv_dtype: str | KVFormat, tp_size: int = 1, *, block_size: int = 16) -> float:
    """Cache bytes one token takes on one rank, all layers, K and V, scales included (per-block
    scales make it a fraction: 0.25 bytes per token per head at 16-token blocks)."""
    return kv_bytes_per_block(config, kv_dtype, block_size=block_size, tp_size=tp_size) / block_size


@dataclass(slots=True)
class BlockKV:
    """Gathered K and V [Hkv, B, L, D] in the compute dtype. With fp8 the scales are not applied
    yet: ``k_scale``/``v_scale`` broadcast against scores [Hkv, B, G, L] (for attention to apply to
    scores and probabilities, D / G times fewer values than K and V)."""

    k: torch.Tensor
    v: torch.Tensor
    k_scale: torch.Tensor | None = None
    v_scale: torch.Tensor | None = None


@dataclass(slots=True)
class _WritePlan:
    """Where one step's new tokens go, by block: computed once per step, used by every layer."""

    slots: torch.Tensor  # [T] the step's slot mapping (the cache key)
    blocks: torch.Tensor  # [N] distinct blocks written
    inverse: torch.Tensor  # [T] each token's index into ``blocks``
    fresh: torch.Tensor  # [N] bool: written from its first slot (earlier contents are not the sequence's)


class KVCache:
    """K/V storage of ``num_layers`` layers, with the writes and reads attention needs."""

    def __init__(
        self, *, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int,
        kv_dtype: str | KVFormat = "fp32", dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
        fused_kernels: bool = True,
    ) -> None:
        """``fused_kernels``: use the fused decode-attention kernels on CPUs where they build (False: torch only)."""
        self.format = kv_format(kv_dtype)
        self.kv_dtype = self.format.name
        self.storage_dtype = self.format.storage
        self.dtype = dtype  # what reads return: the model's compute dtype
        self.num_blocks = num_blocks
        self.num_dense_blocks = 0  # a staged cache's bf16 blocks (gpu_workers.model.kv_staged)
        self.block_size = block_size
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.fp8 = self.format.fp8
        self.num_layers = num_layers
        slots = num_blocks * block_size
        # [layer, k|v, head, slot, D]; fp8 as raw bytes, since CPU index kernels lack fp8
        self.values = torch.zeros(
            num_layers, 2, num_kv_heads, slots, head_dim, dtype=torch.uint8 if self.fp8 else self.storage_dtype,
            device=device,
        )
        # block: [layer, k|v, head, block]; token: [layer, k|v, head, slot]; tensor: [layer, k|v]
        scale_shape = {
            "block": (num_layers, 2, num_kv_heads, num_blocks),
            "token": (num_layers, 2, num_kv_heads, slots),
            "tensor": (num_layers, 2),
        }
        self.scales = None
        if self.format.scale in scale_shape:
            fill = STATIC_SCALE if self.format.scale == "tensor" else 1.0
            self.scales = torch.full(scale_shape[self.format.scale], fill, dtype=SCALE_DTYPE, device=device)
        self.kernels: fp8_kernels.Fp8Kernels | None = None
        fp32_on_cpu = self.values.dtype == dtype == torch.float32
        if fused_kernels and self.values.device.type == "cpu" and (self.format.scale in ("block", "tensor")
                                                                   or fp32_on_cpu):
            with phase("kernel compile", f"fused decode attention, head_dim {head_dim}"):  # cached after once
                self.kernels = fp8_kernels.load(head_dim, block_size)
        # Reused buffers: large fresh allocations cost page faults on every decode step.
        self._workspace: dict[str, torch.Tensor] = {}
        self._plan: _WritePlan | None = None

    # --- sizes ----------------------------------------------------------------------------------

    def bytes_per_block(self) -> int:
        """Bytes one block takes across all layers, K and V, scales included."""
        per_head = self.format.bytes_per_head_block(self.block_size, self.head_dim)
        return self.num_layers * 2 * self.num_kv_heads * per_head

    def nbytes(self) -> int:
        """Bytes of the whole cache (its blocks, scales included)."""
        return self.bytes_per_block() * self.num_blocks

    # --- writes ---------------------------------------------------------------------------------

    def write(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store new tokens' ``k``, ``v`` [T, Hkv, D] at cache ``slots`` [T]."""
        if self.format.scale == "block":
            plan = self._write_plan(slots)
        for i, x in enumerate((k, v)):
            if self.format.scale is None:
                codes = x.to(self.storage_dtype)
            elif self.format.scale == "block":
                codes = self._quantize_into_blocks(layer, i, plan, x)
            elif self.format.scale == "token":
                codes, scale = quantize_per_vector(x, self.storage_dtype)
                self.scales[layer, i].index_copy_(1, slots, scale.t())  # type: ignore[index]
            else:
                codes = quantize(x, self.scales[layer, i], self.storage_dtype)  # type: ignore[index]
            self.values[layer, i].index_copy_(1, slots, codes.transpose(0, 1))

    def _write_plan(self, slots: torch.Tensor) -> _WritePlan:
        """The step's write plan; every layer gets the same ``slots`` tensor, so it is computed once."""
        if self._plan is None or self._plan.slots is not slots:
            blocks, inverse = torch.unique(slots // self.block_size, return_inverse=True)
            first = torch.full_like(blocks, self.block_size).scatter_reduce_(
                0, inverse, slots % self.block_size, "amin"
            )
            self._plan = _WritePlan(slots, blocks, inverse, first == 0)
        return self._plan

    def _quantize_into_blocks(self, layer: int, i: int, plan: _WritePlan, x: torch.Tensor) -> torch.Tensor:
        """Codes of ``x`` [T, Hkv, D] under its blocks' scales, growing (and rescaling) blocks first."""
        scales = self.scales[layer, i]  # type: ignore[index]  # [Hkv, num_blocks]
        amax = x.abs().amax(dim=-1).to(SCALE_DTYPE)  # [T, Hkv]
        needed = torch.zeros(len(plan.blocks), self.num_kv_heads, dtype=SCALE_DTYPE, device=x.device)
        needed.scatter_reduce_(0, plan.inverse[:, None].expand_as(amax), amax, "amax")
        needed = pow2_scale(needed, self.storage_dtype)  # [N, Hkv]
        old = scales.index_select(1, plan.blocks).t()  # [N, Hkv]
        new = torch.where(plan.fresh[:, None], needed, torch.maximum(old, needed))
        grown = (new > old) & ~plan.fresh[:, None]
        if grown.any():
            rows = grown.any(dim=1).nonzero()[:, 0]
            self._rescale(layer, i, plan.blocks[rows], (old[rows] / new[rows]).t())
        scales.index_copy_(1, plan.blocks, new.t())
        return quantize(x, new.index_select(0, plan.inverse)[..., None], self.storage_dtype)

    def _rescale(self, layer: int, i: int, blocks: torch.Tensor, ratio: torch.Tensor) -> None:
        """Multiply the codes of ``blocks`` [R] by ``ratio`` [Hkv, R] (powers of two <= 1)."""
        pool = self.values[layer, i].view(self.num_kv_heads, self.num_blocks, -1)  # [Hkv, NB, bs * D]
        codes = pool.index_select(1, blocks)
        codes = codes.view(*codes.shape[:2], self.block_size, self.head_dim)  # [Hkv, R, bs, D]
        values = self._values_of(codes, ratio[:, :, None, None])
        one = torch.ones((), device=values.device)
        pool.index_copy_(1, blocks, quantize(values, one, self.storage_dtype).view(*codes.shape[:2], -1))

    # --- reads ----------------------------------------------------------------------------------

    @property
    def stores_compute_dtype(self) -> bool:
        """Whether the cache holds K/V exactly as computed (values in the compute dtype): reading a
        token back returns the very tensor written."""
        return self.values.dtype == self.dtype

    @property
    def reads_in_place(self) -> bool:
        """Whether decode attention can read K/V where they lie (``in_place``), with no gather:
        fp32 values on a CPU, where sparse kernels index the pool directly."""
        return self.values.device.type == "cpu" and self.values.dtype == self.dtype == torch.float32

    def in_place(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of every slot of ``layer`` as [Hkv * num_slots, D] views (row ``h * num_slots + s``)."""
        k, v = self.values[layer]  # [Hkv, S, D] each
        return k.view(-1, self.head_dim), v.view(-1, self.head_dim)

    @property
    def fused_attention(self) -> bool:
        """Whether decode attention runs whole in one fused kernel (``decode_attention``): an fp32
        cache, or an fp8 one with per-block or per-tensor scales (the caches the kernels are loaded
        for), on a CPU, with fp32 compute; blocks are read where they lie, up to each sequence's length."""
        return self.kernels is not None and self.dtype == torch.float32

    def attention_kernel(self, layer: int, *, heads: int, scale: float) -> tuple[int, fp8_kernels.AttentionLayer] | None:
        """Layer ``layer``'s writes and decode attention as one C function (an ``attend_fn``, fp8_kernels.c,
        for the fused decoder) for ``heads`` query heads and query-key ``scale``: its address and the
        layer's operands; None where this cache has none (an fp32 cache without the kernels, other formats)."""
        if self.kernels is None or self.format.scale is not None or self.dtype != torch.float32:
            return None
        k, v = self.values[layer]
        layer_ = fp8_kernels.AttentionLayer(k=k.data_ptr(), v=v.data_ptr(), num_blocks=self.num_blocks, heads=heads,
                                            kv_heads=self.num_kv_heads, scale=scale)
        layer_._tensors = (k, v)
        return self.kernels.attend_address(), layer_

    def decode_attention(self, layer: int, q: torch.Tensor, block_tables: torch.Tensor,
                         lens: torch.Tensor) -> torch.Tensor:
        """Attention [Hkv, B, G, D] of scaled queries ``q`` [Hkv, B, G, D] over the first ``lens`` [B]
        tokens of the blocks ``block_tables`` [B, MB] list."""
        assert self.kernels is not None
        k, v = (self._pool(layer, i) for i in (0, 1))
        out = torch.empty(q.shape, dtype=torch.float32)
        k_scales, v_scales = (self.scales[layer, 0], self.scales[layer, 1]) if self.scales is not None else (None, None)
        return self.kernels.decode_attention(k, v, k_scales, v_scales, block_tables, lens, q.contiguous(),
                                             self.storage_dtype, out)

    def gather(self, layer: int, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V [Hkv, S, D] in the compute dtype for cache ``slots`` [S] (one sequence's context)."""
        kv = self.values[layer].index_select(2, slots)  # [2, Hkv, S, D]
        if self.fp8:
            kv = self._values_of(kv, self._slot_scales(layer, slots)[..., None])
        return kv[0].to(self.dtype), kv[1].to(self.dtype)

    def gather_blocks(self, layer: int, block_tables: torch.Tensor) -> BlockKV:
        """K and V of the blocks ``block_tables`` [B, MB] lists, each sequence's blocks in order.

        The tensors are reused by the next call. With fp8 the scales are returned, not applied.
        """
        b, mb = block_tables.shape
        ids = block_tables.reshape(-1)
        heads, bs, d = self.num_kv_heads, self.block_size, self.head_dim
        pool = self.values[layer].view(2 * heads, self.num_blocks, bs * d)
        kv = torch.index_select(pool, 1, ids, out=self._buffer("blocks", pool.dtype, (2 * heads, b * mb, bs * d)))
        if self.fp8:
            kv = code_values(kv, self.storage_dtype, self.dtype)
        elif kv.dtype != self.dtype:
            kv = self._buffer("converted", self.dtype, kv.shape).copy_(kv)
        kv = kv.view(2, heads, b, mb * bs, d)
        if not self.fp8:
            return BlockKV(kv[0], kv[1])
        scales = self._block_scales(layer, ids).to(self.dtype)
        if self.format.scale != "tensor":
            scales = scales.view(2, heads, b, 1, mb * bs)  # broadcasts against scores [Hkv, B, G, L]
        return BlockKV(kv[0], kv[1], scales[0], scales[1])

    def _pool(self, layer: int, i: int) -> torch.Tensor:
        """Layer ``layer``'s K (i=0) or V (i=1) codes as [Hkv, num_blocks, block_size, D]."""
        return self.values[layer, i].view(self.num_kv_heads, self.num_blocks, self.block_size, self.head_dim)

    def _slot_scales(self, layer: int, slots: torch.Tensor) -> torch.Tensor:
        """Scales of K and V at ``slots`` [S]: [2, Hkv, S], or [2, 1, 1] for per-tensor scales."""
        scales = self.scales[layer]  # type: ignore[index]
        if self.format.scale == "block":
            return scales.index_select(2, slots // self.block_size)
        if self.format.scale == "token":
            return scales.index_select(2, slots)
        return scales[:, None, None]

    def _block_scales(self, layer: int, ids: torch.Tensor) -> torch.Tensor:
        """Scales of K and V for every slot of blocks ``ids`` [n]: [2, Hkv, n * block_size]; [2] with
        per-tensor scales."""
        scales = self.scales[layer]  # type: ignore[index]
        if self.format.scale == "block":
            per_block = scales.index_select(2, ids)  # [2, Hkv, n]
            return per_block[..., None].expand(*per_block.shape, self.block_size).reshape(*per_block.shape[:2], -1)
        if self.format.scale == "token":
            slots = (ids[:, None] * self.block_size + torch.arange(self.block_size, device=ids.device)).view(-1)
            return scales.index_select(2, slots)
        return scales

    def _values_of(self, codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
        """fp32 values of fp8 ``codes`` [..., D] times ``scales`` (broadcasting against [..., 1])."""
        if self.kernels is not None:
            return self.kernels.dequantize_rows(codes, scales[..., 0], self.storage_dtype)
        return code_values(codes, self.storage_dtype, torch.float32).mul_(scales)

    def _buffer(self, name: str, dtype: torch.dtype, shape: tuple[int, ...] | torch.Size) -> torch.Tensor:
        numel = 1
        for n in shape:
            numel *= n
        buf = self._workspace.get(name)
        if buf is None or buf.numel() < numel or buf.dtype != dtype:
            buf = torch.empty(numel, dtype=dtype, device=self.values.device)
            self._workspace[name] = buf
        return buf[:numel].view(shape)
