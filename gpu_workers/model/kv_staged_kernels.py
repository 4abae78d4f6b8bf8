"""The staged fp8 KV cache's kernels of kv_staged_kernels.c (decode attention over a staged block table,
reads by slot, a step's writes), compiled on first use and loaded with ctypes.

One shared library per (head_dim, block_size), built with fp8_kernels.c's flags (whose code it
includes) and cached by ``c_build.build_library``. Where no compiler works, ``load`` logs why once and
returns None: the cache then reads and writes with torch (kv_staged.StagedKVCache's torch path; the
same codes and reads, attention up to float rounding).
"""

from __future__ import annotations

import ctypes
import functools
import logging
import subprocess
from dataclasses import dataclass
from pathlib import Path

import torch

from gpu_workers.model.c_build import build_library, function_address
from gpu_workers.model.fp8_kernels import FLAGS, FORMAT_CODES, LIBS, KernelError, typed
from gpu_workers.model.fp8_kernels import SOURCE as FP8_SOURCE

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("kv_staged_kernels.c")

_P = ctypes.c_void_p
_I = ctypes.c_int64
_C = ctypes.c_int
_SIGNATURES = {
    "staged_decode_attention": [_P] * 10 + [_I] * 6 + [_C, _C],
    "staged_gather": [_P] * 8 + [_I] * 4 + [_C, _C],
    "staged_write": [_P] * 8 + [_I, _P, _I, _P, _P, _I, _P, _P, _I, _I, _I, _I, _C],
}


@dataclass(frozen=True, slots=True)
class StagedLayer:
    """One layer of a staged cache (gpu_workers.model.kv_staged) as the kernels read it; every tensor
    contiguous, on the CPU. Shapes: ``codes`` uint8 [2, Hkv, NB * bs, D]; ``centre`` uint8 [Hkv, NB, D];
    ``centre_scale`` fp32 [Hkv, NB]; ``k_scale`` bf16 [Hkv, NB, D]; ``v_scale`` bf16 [Hkv, NB * bs];
    ``dense`` bf16 [2, Hkv, ND * bs, D]."""

    codes: torch.Tensor
    centre: torch.Tensor
    centre_scale: torch.Tensor
    k_scale: torch.Tensor
    v_scale: torch.Tensor
    dense: torch.Tensor
    dtype: torch.dtype  # the codes' fp8 format

    @property
    def heads(self) -> int:
        return self.codes.shape[1]

    def pointers(self) -> tuple[int, ...]:
        return tuple(t.data_ptr() for t in (self.codes, self.centre, self.centre_scale, self.k_scale, self.v_scale,
                                            self.dense))

    def sizes(self, block_size: int) -> tuple[int, int, int]:
        """(fp8 blocks, dense blocks, format code)"""
        return self.centre.shape[1], self.dense.shape[2] // block_size, FORMAT_CODES[self.dtype]


class StagedKernels:
    """Typed entry points into one compiled library; all tensors are CPU tensors."""

    def __init__(self, lib: ctypes.CDLL, *, head_dim: int, block_size: int) -> None:
        self.head_dim = head_dim
        self.block_size = block_size
        self._lib = typed(lib, _SIGNATURES)

    def attend_address(self) -> int:
        """The address of ``attend_staged`` (a staged e4m3 cache's ``attend_fn``: ``staged_write``, then
        ``staged_decode_attention``), for the fused decoder's C code to call."""
        return function_address(self._lib, "attend_staged")

    def staged_decode_attention(self, layer: StagedLayer, tables: torch.Tensor, lens: torch.Tensor, q: torch.Tensor,
                                out: torch.Tensor) -> torch.Tensor:
        """``out`` [Hkv, B, G, D] = attention of the scaled queries ``q`` [Hkv, B, G, D] over the first ``lens``
        [B] tokens of each sequence's blocks ``tables`` [B, MB] in one layer of a staged cache (ids below its
        fp8 pool's size are fp8 blocks, the rest dense ones). Raises KernelError for an id or a length
        outside the pools."""
        heads, batch, width = layer.heads, *tables.shape
        shape = (heads, batch, q.shape[2], self.head_dim)
        ok = (q.dtype == out.dtype == torch.float32 and q.is_contiguous() and out.is_contiguous()
              and tables.dtype == lens.dtype == torch.int64 and tables.is_contiguous() and lens.is_contiguous()
              and tuple(lens.shape) == (batch,) and tuple(q.shape) == tuple(out.shape) == shape)
        if not ok:
            raise ValueError(f"staged decode attention arguments: tables {tuple(tables.shape)}, lens "
                             f"{tuple(lens.shape)} {lens.dtype}, q {tuple(q.shape)} {q.dtype} (expected {shape})")
        rc = self._lib.staged_decode_attention(*layer.pointers(), tables.data_ptr(), lens.data_ptr(), q.data_ptr(),
                                               out.data_ptr(), heads, batch, width, shape[2], *layer.sizes(self.block_size),
                                               torch.get_num_threads())
        if rc == -2:
            raise MemoryError("staged_decode_attention: no scratch memory for the scores")
        if rc != 0:
            raise KernelError("a block table names a block outside the KV cache, or a length outside its blocks")
        return out

    def staged_gather(self, layer: StagedLayer, slots: torch.Tensor) -> torch.Tensor:
        """fp32 K and V [2, Hkv, S, D] of ``slots`` [S] int64 of one layer of a staged cache (slots past the fp8
        pool's are dense slots), fp8 ones read back. Raises KernelError for a slot outside the pools."""
        slots = slots.contiguous()
        if slots.dtype != torch.int64 or slots.dim() != 1:
            raise ValueError(f"slots {tuple(slots.shape)} {slots.dtype}: expected int64 [S]")
        out = torch.empty(2, layer.heads, slots.shape[0], self.head_dim, dtype=torch.float32)
        rc = self._lib.staged_gather(*layer.pointers(), slots.data_ptr(), out.data_ptr(), layer.heads, slots.shape[0],
                                     *layer.sizes(self.block_size), torch.get_num_threads())
        if rc != 0:
            raise KernelError("a slot outside the KV cache")
        return out

    def staged_write(self, layer: StagedLayer, k: torch.Tensor, v: torch.Tensor, *, complete_blocks: torch.Tensor,
                     complete_src: torch.Tensor, staged_slots: torch.Tensor, dense_rows: torch.Tensor,
                     dense_slots: torch.Tensor) -> None:
        """Store new tokens' fp32 ``k``, ``v`` [T, Hkv, D] into one layer of a staged cache, as
        kv_staged.StagedKVCache.write_staged (the plan's fields, int64, as named there): completed blocks
        quantized (kv_quant's functions, the same codes and scales bit for bit), then the bf16 rows.
        Raises KernelError (nothing written) for an id, row or slot out of range; e4m3 only."""
        if layer.dtype != torch.float8_e4m3fn:
            raise ValueError(f"staged_write: {layer.dtype} codes (e4m3 only)")
        k, v = k.contiguous(), v.contiguous()
        index = [t.contiguous() for t in (complete_blocks, complete_src, staged_slots, dense_rows, dense_slots)]
        if k.dtype != torch.float32 or k.shape != v.shape or k.shape[1:] != (layer.heads, self.head_dim) or any(
                t.dtype != torch.int64 for t in index):
            raise ValueError(f"staged_write arguments: k {tuple(k.shape)} {k.dtype}, v {tuple(v.shape)}")
        complete_blocks, complete_src, staged_slots, dense_rows, dense_slots = index
        num_blocks, num_dense, _ = layer.sizes(self.block_size)
        rc = self._lib.staged_write(
            *layer.pointers(), k.data_ptr(), v.data_ptr(), k.shape[0], complete_blocks.data_ptr(),
            complete_blocks.numel(), complete_src.data_ptr(), staged_slots.data_ptr(), staged_slots.numel(),
            dense_rows.data_ptr(), dense_slots.data_ptr(), dense_rows.numel(), layer.heads, num_blocks, num_dense,
            torch.get_num_threads(),
        )
        if rc != 0:
            raise KernelError("a staged write names a block, row or slot outside the KV cache or the step")


@functools.cache
def load(head_dim: int, block_size: int) -> StagedKernels | None:
    """The kernels for this shape, built if needed; None (logged once) where they cannot be built."""
    try:
        defines = (f"-DDIM={head_dim}", f"-DBS={block_size}")
        path = build_library(SOURCE, FLAGS + defines, stem=f"staged-d{head_dim}-bs{block_size}", libs=LIBS,
                             depends=(FP8_SOURCE,))
        return StagedKernels(ctypes.CDLL(str(path)), head_dim=head_dim, block_size=block_size)
    except (OSError, subprocess.SubprocessError) as e:
        log.warning("staged KV-cache kernels unavailable (%s); falling back to torch (slower)", e)
        return None
