"""The fused KV-cache kernels of fp8_kernels.c (decode attention over fp8 blocks, and over fp32 blocks),
compiled on first use and loaded with ctypes.

One shared library per (head_dim, block_size), built for the CPU it runs on and cached by
``c_build.build_library``. Building takes well under a second.

Where no compiler works, ``load`` logs why once and returns None: the cache then falls back to
gathering and converting blocks with torch (slower, same results up to float rounding).
"""

from __future__ import annotations

import ctypes
import functools
import logging
import subprocess
from pathlib import Path
from typing import Any

import torch

from gpu_workers.model.c_build import build_library, function_address

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("fp8_kernels.c")
FLAGS = (
    "-O3", "-march=native", "-fPIC", "-shared", "-fopenmp",
    # lets the compiler vectorize float sums (reassociation only: no fast-math flush-to-zero)
    "-fassociative-math", "-fno-signed-zeros", "-fno-trapping-math",
)
LIBS = ("-lm",)
FORMAT_CODES = {torch.float8_e4m3fn: 0, torch.float8_e5m2: 1}
F32_CODE = 2

_P = ctypes.c_void_p
_I = ctypes.c_int64
_SIGNATURES = {
    "fp8_dequantize_rows": [_P, _P, _P, _I, ctypes.c_int, ctypes.c_int],
    "decode_attention": [_P, _P, _P, _P, _I, _I, _P, _P, _P, _P, _I, _I, _I, _I, _I, ctypes.c_int, ctypes.c_int],
}


class AttentionLayer(ctypes.Structure):
    """One layer of a cache as an ``attend_fn`` reads it (fp8_kernels.c ``struct attention_layer``): made by
    ``KVCache.attention_kernel``; it holds the tensors whose addresses it carries."""

    _fields_ = [("k", _P), ("v", _P), ("codes", _P), ("centre", _P), ("centre_scale", _P), ("k_scale", _P),
                ("v_scale", _P), ("dense", _P), ("num_blocks", _I), ("num_dense", _I), ("heads", _I),
                ("kv_heads", _I), ("scale", ctypes.c_float)]
    _tensors: tuple[torch.Tensor, ...]


class AttentionStep(ctypes.Structure):
    """A decode-only step's view of one KV cache group as an ``attend_fn`` reads it (fp8_kernels.c ``struct
    attention_step``): made by ``fused_decoder.attention_step``; it holds the tensors whose addresses it carries."""

    _fields_ = [("tables", _P), ("lens", _P), ("slots", _P), ("batch", _I), ("width", _I), ("complete", _P),
                ("complete_src", _P), ("staged_slots", _P), ("dense_rows", _P), ("dense_slots", _P), ("nc", _I),
                ("ns", _I), ("nd", _I)]
    _tensors: tuple[torch.Tensor, ...]


class KernelError(RuntimeError):
    """A kernel refused its input (a block id outside the pool)."""


def typed(lib: ctypes.CDLL, signatures: dict[str, Any]) -> ctypes.CDLL:
    """``lib`` with each function of ``signatures`` given its argument types and an int result."""
    for name, argtypes in signatures.items():
        fn = getattr(lib, name)
        fn.argtypes = argtypes
        fn.restype = ctypes.c_int
    return lib


class Fp8Kernels:
    """Typed entry points into one compiled library; all tensors are CPU tensors."""

    def __init__(self, lib: ctypes.CDLL, *, head_dim: int, block_size: int) -> None:
        self.head_dim = head_dim
        self.block_size = block_size
        self._lib = typed(lib, _SIGNATURES)

    def decode_attention(
        self, k_pool: torch.Tensor, v_pool: torch.Tensor, k_scales: torch.Tensor | None, v_scales: torch.Tensor | None,
        tables: torch.Tensor, lens: torch.Tensor, q: torch.Tensor, dtype: torch.dtype, out: torch.Tensor,
    ) -> torch.Tensor:
        """``out`` [Hkv, B, G, D] = attention of the scaled queries ``q`` [Hkv, B, G, D] over the first
        ``lens`` [B] tokens of each sequence's blocks ``tables`` [B, MB]. K and V pools [Hkv, NB, bs, D]
        hold fp32 values (``dtype`` float32, scales None) or the uint8 codes of fp8 ``dtype`` with their
        scales [Hkv, NB] (or 0-dim: one for all)."""
        heads, num_blocks = k_pool.shape[:2]
        batch, width = tables.shape
        shape = (heads, batch, q.shape[2], self.head_dim)
        fp8 = dtype in FORMAT_CODES
        if k_scales is None or v_scales is None:
            k_scales = v_scales = torch.zeros((), dtype=torch.float32)
        ok = (
            k_pool.dtype == v_pool.dtype == (torch.uint8 if fp8 else torch.float32) and (fp8 or dtype == torch.float32)
            and k_pool.shape == v_pool.shape and k_pool.is_contiguous() and v_pool.is_contiguous()
            and tuple(k_pool.shape[2:]) == (self.block_size, self.head_dim)
            and _scale_strides(k_scales) == _scale_strides(v_scales)
            and q.dtype == out.dtype == torch.float32 and q.is_contiguous() and out.is_contiguous()
            and tables.dtype == lens.dtype == torch.int64 and tables.is_contiguous() and lens.is_contiguous()
            and tuple(lens.shape) == (batch,) and tuple(q.shape) == tuple(out.shape) == shape
        )
        if not ok:
            raise ValueError(
                f"decode attention arguments: pools {tuple(k_pool.shape)} {k_pool.dtype} as {dtype}, tables "
                f"{tuple(tables.shape)}, lens {tuple(lens.shape)} {lens.dtype}, q {tuple(q.shape)} {q.dtype} "
                f"(expected {shape}), out {tuple(out.shape)}"
            )
        rc = self._lib.decode_attention(
            k_pool.data_ptr(), v_pool.data_ptr(), k_scales.data_ptr(), v_scales.data_ptr(), *_scale_strides(k_scales),
            tables.data_ptr(), lens.data_ptr(), q.data_ptr(), out.data_ptr(), heads, batch, width, shape[2],
            num_blocks, FORMAT_CODES.get(dtype, F32_CODE), torch.get_num_threads(),
        )
        if rc == -2:
            raise MemoryError("decode_attention: no scratch memory for the scores")
        if rc != 0:
            raise KernelError("a block table names a block outside the KV cache, or a length outside its blocks")
        return out

    def attend_address(self) -> int:
        """The address of ``attend_fp32`` (an fp32 cache's ``attend_fn``), for the fused decoder's C code
        to call. The library stays loaded while this object lives."""
        return function_address(self._lib, "attend_fp32")

    def dequantize_rows(self, codes: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """fp32 values [..., D] of ``codes`` [..., D], each row times its scale (``scales`` [...])."""
        codes, scales = codes.contiguous(), scales.to(torch.float32).expand(codes.shape[:-1]).contiguous()
        if codes.shape[-1] != self.head_dim or codes.dtype != torch.uint8:
            raise ValueError(f"codes {tuple(codes.shape)} {codes.dtype}: expected uint8 rows of {self.head_dim}")
        out = torch.empty(codes.shape, dtype=torch.float32)
        rows = codes.numel() // self.head_dim
        self._lib.fp8_dequantize_rows(
            codes.data_ptr(), scales.data_ptr(), out.data_ptr(), rows, FORMAT_CODES[dtype], torch.get_num_threads()
        )
        return out


def _scale_strides(scales: torch.Tensor) -> tuple[int, int]:
    """(head stride, block stride) of a [Hkv, NB] scale tensor; (0, 0) for one scale for all."""
    if scales.dim() == 0:
        return 0, 0
    if scales.dtype != torch.float32 or scales.dim() != 2:
        raise ValueError(f"scales {tuple(scales.shape)} {scales.dtype}: expected fp32 [heads, blocks] or 0-dim")
    return scales.stride(0), scales.stride(1)


@functools.cache
def load(head_dim: int, block_size: int) -> Fp8Kernels | None:
    """The kernels for this shape, built if needed; None (logged once) where they cannot be built."""
    try:
        path = _build(head_dim, block_size)
        return Fp8Kernels(ctypes.CDLL(str(path)), head_dim=head_dim, block_size=block_size)
    except (OSError, subprocess.SubprocessError) as e:
        log.warning("fused KV-cache kernels unavailable (%s); falling back to torch (slower decode)", e)
        return None


def _build(head_dim: int, block_size: int) -> Path:
    defines = (f"-DDIM={head_dim}", f"-DBS={block_size}")
    return build_library(SOURCE, FLAGS + defines, stem=f"fp8-d{head_dim}-bs{block_size}", libs=LIBS)
