"""The paged KV cache: fixed-size blocks of token slots for every layer, in one allocation.

Slot ``s`` is token ``s % block_size`` of block ``s // block_size``; a sequence's block table lists
its blocks in order, so its token at position ``p`` lives in slot
``block_table[p // block_size] * block_size + p % block_size``.

Layout per layer and K/V: [num_kv_heads, num_blocks, block_size, head_dim], head-major so that the
blocks of many sequences gathered for one head form one contiguous [tokens, head_dim] matrix per
(head, sequence): attention then runs as a single batched matmul with no further copy.

KV dtypes: fp32, bf16, fp16 store values as they are; fp8 (e4m3 or e5m2) stores each value divided
by a per-(token, head) fp32 scale (amax / fp8 max, computed when the token is written) and
multiplies it back on read. The pool must start zeroed: attention reads whole blocks and masks the
unused slots, and a masked NaN would still poison the weighted sum.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gpu_workers.model.config import ModelConfig

STORAGE_DTYPES: dict[str, torch.dtype] = {
    "fp32": torch.float32,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
    "fp8_e4m3": torch.float8_e4m3fn,
    "fp8_e5m2": torch.float8_e5m2,
}
FP8_DTYPES = ("fp8_e4m3", "fp8_e5m2")
SCALE_DTYPE = torch.float32


def _storage_dtype(kv_dtype: str) -> torch.dtype:
    try:
        return STORAGE_DTYPES[kv_dtype]
    except KeyError:
        raise ValueError(f"kv_dtype {kv_dtype!r}: one of {', '.join(STORAGE_DTYPES)}") from None


def kv_bytes_per_token(config: ModelConfig, kv_dtype: str, tp_size: int = 1) -> int:
    """Cache bytes one token takes on one rank, all layers, K and V, scales included."""
    value_bytes = _storage_dtype(kv_dtype).itemsize * config.head_dim
    if kv_dtype in FP8_DTYPES:
        value_bytes += SCALE_DTYPE.itemsize
    return config.num_hidden_layers * 2 * config.kv_heads_per_rank(tp_size) * value_bytes


def quantize_fp8(x: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(values in ``dtype``, fp32 scales [...]) for ``x`` [..., D], one scale per vector.

    Finite input never yields NaN or inf: an all-zero vector gets the smallest normal scale (and
    stays zero), and values are clamped to the format's range after division.
    """
    fmax = torch.finfo(dtype).max
    amax = x.abs().amax(dim=-1).to(SCALE_DTYPE)
    scale = (amax / fmax).clamp_(min=torch.finfo(SCALE_DTYPE).tiny)
    q = (x.to(SCALE_DTYPE) / scale[..., None]).clamp_(-fmax, fmax).to(dtype)
    return q, scale


@dataclass(slots=True)
class BlockKV:
    """Gathered K and V [Hkv, B, L, D] in the compute dtype; fp8 scales [Hkv, B, L] (fp32) not yet applied."""

    k: torch.Tensor
    v: torch.Tensor
    k_scale: torch.Tensor | None = None
    v_scale: torch.Tensor | None = None


class KVCache:
    """K/V storage of ``num_layers`` layers, with the writes and gathers attention needs."""

    def __init__(
        self, *, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int,
        kv_dtype: str = "fp32", dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
    ) -> None:
        self.kv_dtype = kv_dtype
        self.storage_dtype = _storage_dtype(kv_dtype)
        self.dtype = dtype  # what reads return: the model's compute dtype
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.fp8 = kv_dtype in FP8_DTYPES
        self.num_layers = num_layers
        slots = num_blocks * block_size
        # [layer, k|v, head, slot, D]; fp8 as raw bytes, since CPU index kernels lack fp8
        self.values = torch.zeros(
            num_layers, 2, num_kv_heads, slots, head_dim, dtype=torch.uint8 if self.fp8 else self.storage_dtype,
            device=device,
        )
        # [layer, k|v, head, slot]
        self.scales = (
            torch.ones(num_layers, 2, num_kv_heads, slots, dtype=SCALE_DTYPE, device=device) if self.fp8 else None
        )
        # Reused gather buffers: large fresh allocations cost page faults on every decode step.
        self._workspace: dict[str, torch.Tensor] = {}
        # On CPUs, converting e4m3 to float is a slow scalar loop; a 256-entry table lookup is ~3x
        # faster (NaN codes are never written, so their entries do not matter).
        self._fp8_table = None
        if kv_dtype == "fp8_e4m3" and self.values.device.type == "cpu":
            codes = torch.arange(256, dtype=torch.uint8).view(self.storage_dtype)
            self._fp8_table = torch.nan_to_num(codes.to(dtype))

    @property
    def reads_in_place(self) -> bool:
        """Whether decode attention can read K/V where they lie (``in_place``), with no gather:
        fp32 values on a CPU, where sparse kernels index the pool directly."""
        return self.values.device.type == "cpu" and self.values.dtype == self.dtype == torch.float32

    def in_place(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of every slot of ``layer`` as [Hkv * num_slots, D] views (row ``h * num_slots + s``)."""
        k, v = self.values[layer]  # [Hkv, S, D] each
        return k.view(-1, self.head_dim), v.view(-1, self.head_dim)

    def bytes_per_block(self) -> int:
        """Bytes one block takes across all layers, K and V, scales included."""
        per_slot = self.head_dim * self.storage_dtype.itemsize + (SCALE_DTYPE.itemsize if self.fp8 else 0)
        return self.num_layers * 2 * self.num_kv_heads * self.block_size * per_slot

    def write(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store new tokens' ``k``, ``v`` [T, Hkv, D] at cache ``slots`` [T]."""
        for i, x in enumerate((k, v)):
            if self.fp8:
                x, scale = quantize_fp8(x, self.storage_dtype)
                self.scales[layer, i].index_copy_(1, slots, scale.t())  # type: ignore[index]
                x = x.view(torch.uint8)
            self.values[layer, i].index_copy_(1, slots, x.transpose(0, 1).to(self.values.dtype))

    def gather(self, layer: int, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V [Hkv, S, D] in the compute dtype for cache ``slots`` [S] (one sequence's context)."""
        kv = self.values[layer].index_select(2, slots)  # [2, Hkv, S, D]
        if kv.dtype != self.dtype:
            kv = self._convert(kv, torch.empty(kv.shape, dtype=self.dtype, device=kv.device))
        if self.fp8:
            kv.mul_(self.scales[layer].index_select(2, slots)[..., None].to(self.dtype))  # type: ignore[index]
        return kv[0], kv[1]

    def gather_blocks(self, layer: int, block_tables: torch.Tensor) -> BlockKV:
        """K and V of the blocks ``block_tables`` [B, MB] lists, each sequence's blocks in order.

        The tensors are reused by the next call. With fp8 the scales are returned, not applied:
        attention applies them to scores and probabilities, D / G times fewer values than K and V.
        """
        b, mb = block_tables.shape
        ids = block_tables.reshape(-1)
        heads, bs, d = self.num_kv_heads, self.block_size, self.head_dim
        pool = self.values[layer].view(2 * heads, self.num_blocks, bs * d)
        kv = torch.index_select(pool, 1, ids, out=self._buffer("blocks", pool.dtype, (2 * heads, b * mb, bs * d)))
        if kv.dtype != self.dtype:
            kv = self._convert(kv, self._buffer("converted", self.dtype, kv.shape))
        kv = kv.view(2, heads, b, mb * bs, d)
        if not self.fp8:
            return BlockKV(kv[0], kv[1])
        scales = self.scales[layer].view(2 * heads, self.num_blocks, bs).index_select(1, ids)  # type: ignore[union-attr]
        scales = scales.view(2, heads, b, mb * bs)
        return BlockKV(kv[0], kv[1], scales[0], scales[1])

    def _convert(self, raw: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """``raw`` stored values as the compute dtype, into ``out``."""
        if self._fp8_table is not None:
            return torch.index_select(self._fp8_table, 0, raw.reshape(-1).int(), out=out.view(-1)).view(out.shape)
        return out.copy_(raw.view(self.storage_dtype) if self.fp8 else raw)

    def _buffer(self, name: str, dtype: torch.dtype, shape: tuple[int, ...] | torch.Size) -> torch.Tensor:
        numel = 1
        for n in shape:
            numel *= n
        buf = self._workspace.get(name)
        if buf is None or buf.numel() < numel:
            buf = torch.empty(numel, dtype=dtype, device=self.values.device)
            self._workspace[name] = buf
        return buf[:numel].view(shape)
