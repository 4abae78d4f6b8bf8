"""The weight-only 8-bit and 4-bit matmuls of quant_kernels.c (GGUF blocks kept as int8 codes, or
4-bit codes packed two per byte, with fp32 block constants), compiled on first use and loaded with ctypes.

torch has no CPU kernel for per-32-weight scales on int8 weights: ``aten._weight_int8pack_mm``
takes one scale per output row, and is unvectorized on AVX2 (~2.5x the time of the fp32 matmul at
one row, ~18x at 8; ``benchmarks/quant_matmul.py``); ``torch._int_mm`` quantizes activations and is
slower still here. Its 4-bit kernel ``aten._weight_int4pack_mm_for_cpu`` rounds activations, block
constants and outputs to bf16, and at one row takes ~0.5x the fp32 matmul's time where reading 4.5
bits a weight instead of 32 allows much less. The C kernels multiply fp32 activations by the
weights dequantized in registers, so their products are those of the fp32 matmul of the dequantized
weights, only summed in another order.

Built and cached by ``c_build.build_library``, as the fp8 kernels are. Where no compiler works (or
the CPU lacks AVX2 and FMA), ``load`` logs why once and returns None: the loader then dequantizes
8-bit weights to fp32, and 4-bit ones fall back to torch's int4 kernel (``quantization.Int4Weight``).
"""

from __future__ import annotations

import ctypes
import functools
import logging
import subprocess
from pathlib import Path

import torch

from gpu_workers.model.c_build import build_library, cpu_flags, function_address

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("quant_kernels.c")
# No -ffp-contract: each weight is rounded as gguf rounds it (a multiply, then an add), not fused.
FLAGS = ("-O3", "-march=native", "-fPIC", "-shared", "-fopenmp", "-pthread", "-ffp-contract=off")
DEPENDS = (SOURCE.with_name("work_pool.h"),)

_P = ctypes.c_void_p
_I = ctypes.c_int64


class QuantKernels:
    """Typed entry points into the compiled library; all tensors are CPU tensors."""

    def __init__(self, lib: ctypes.CDLL) -> None:
        lib.int8_matmul.argtypes = [_P, _I, _I, _P, _P, _P, _I, _I, _P, ctypes.c_int]
        lib.int8_matmul.restype = ctypes.c_int
        lib.int8_dequantize.argtypes = [_P, _P, _P, _I, _I, _I, _P, ctypes.c_int]
        lib.int8_dequantize.restype = None
        lib.int4_matmul.argtypes = [_P, _I, _I, _P, _P, _P, _I, _P, ctypes.c_int]
        lib.int4_matmul.restype = ctypes.c_int
        lib.int4_dequantize.argtypes = [_P, _P, _P, _I, _I, _P, ctypes.c_int]
        lib.int4_dequantize.restype = ctypes.c_int
        self._lib = lib

    def address(self, name: str) -> int:
        """The address of the kernel ``name``, ``int8_matmul`` or ``int4_linear`` (``int4_matmul`` with
        ``int8_matmul``'s arguments), for the fused decoder layers' C code to call
        (panel_matmul.kernel_linear). The library stays loaded while this object lives."""
        if name not in ("int8_matmul", "int4_linear"):
            raise ValueError(f"no kernel {name!r} to call from C")
        return function_address(self._lib, name)

    def matmul(self, x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
               group: int) -> torch.Tensor:
        """``x`` [M, K] fp32 times the weight [N, K] ``codes * scale (+ zero)``: [M, N] fp32.
        ``codes`` int8 [N, K], ``scale`` and ``zero`` fp32 [N, K / group], all contiguous.
        ValueError unless K is a positive multiple of 32 and ``group`` 16 or 32, or for operands of
        other shapes or dtypes."""
        x = x.to(torch.float32).contiguous()
        (m, k), n = x.shape, codes.shape[0]
        constants = [scale] if zero is None else [scale, zero]
        if (codes.shape[1] != k or codes.dtype is not torch.int8 or group not in (16, 32)
                or any(c.shape != (n, k // group) or c.dtype is not torch.float32 for c in constants)
                or not all(t.is_contiguous() for t in (codes, *constants))):
            raise ValueError(f"x {tuple(x.shape)} against weight codes {tuple(codes.shape)} ({codes.dtype}), "
                             f"constants {[tuple(c.shape) for c in constants]} in groups of {group}")
        y = torch.empty(m, n, dtype=torch.float32)
        rc = self._lib.int8_matmul(x.data_ptr(), m, k, codes.data_ptr(), scale.data_ptr(),
                                   None if zero is None else zero.data_ptr(), n, group, y.data_ptr(),
                                   torch.get_num_threads())
        if rc != 0:
            raise ValueError(f"{k} inputs: need a positive multiple of 32")
        return y

    def dequantize(self, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
                   group: int) -> torch.Tensor:
        """The fp32 weight [N, K]: ``code * scale (+ zero)`` rounded as the gguf package rounds."""
        n, k = codes.shape
        out = torch.empty(n, k, dtype=torch.float32)
        self._lib.int8_dequantize(codes.data_ptr(), scale.data_ptr(), None if zero is None else zero.data_ptr(),
                                  n, k, group, out.data_ptr(), torch.get_num_threads())
        return out

    def int4_matmul(self, x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor,
                    zero: torch.Tensor) -> torch.Tensor:
        """``x`` [M, K] fp32 times the weight [N, K] ``code * scale + zero``: [M, N] fp32. ``packed``
        uint8 [N, K / 2] (``pack_int4``'s layout), ``scale`` and ``zero`` fp32 [N, K / 32], all
        contiguous. ValueError unless K is a positive multiple of 32 matching ``packed``."""
        x = x.to(torch.float32).contiguous()
        (m, k), n = x.shape, packed.shape[0]
        if packed.shape[1] * 2 != k or scale.shape != (n, k // 32) or zero.shape != scale.shape:
            raise ValueError(f"x {tuple(x.shape)} against packed codes {tuple(packed.shape)}, "
                             f"block constants {tuple(scale.shape)}")
        y = torch.empty(m, n, dtype=torch.float32)
        if self._lib.int4_matmul(x.data_ptr(), m, k, packed.data_ptr(), scale.data_ptr(), zero.data_ptr(), n,
                                 y.data_ptr(), torch.get_num_threads()) != 0:
            raise ValueError(f"{k} inputs: need a positive multiple of 32")
        return y

    def int4_dequantize(self, packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
        """The fp32 weight [N, K] of ``int4_matmul``'s operands: ``code * scale + zero``, rounded as
        the gguf package rounds (a multiply, then an add)."""
        n, k = packed.shape[0], packed.shape[1] * 2
        out = torch.empty(n, k, dtype=torch.float32)
        if self._lib.int4_dequantize(packed.data_ptr(), scale.data_ptr(), zero.data_ptr(), n, k, out.data_ptr(),
                                     torch.get_num_threads()) != 0:
            raise ValueError(f"{k} inputs: need a positive multiple of 32")
        return out


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """4-bit codes [N, K] (integers 0..15, any dtype; K a multiple of 32) packed for ``int4_matmul``:
    uint8 [N, K / 2]. Per 64 inputs, eight little-endian 32-bit lanes, lane i holding the code of
    input ``i + 8 j`` in bits ``4 j .. 4 j + 3`` (j = 0..7); a trailing 32 inputs as eight 16-bit lanes
    of four codes. ValueError for codes outside 0..15 or K not a multiple of 32."""
    n, k = codes.shape
    if k % 32:
        raise ValueError(f"{k} inputs: not a multiple of 32")
    c = codes.to(torch.int64)
    if c.numel() and (c.min() < 0 or c.max() > 15):
        raise ValueError("4-bit codes outside 0..15")
    full = k - k % 64
    parts = []
    for width, lanes in ((64, c[:, :full]), (32, c[:, full:])):
        j = width // 8  # codes per lane
        if lanes.shape[1]:
            shifts = 4 * torch.arange(j).view(1, 1, j, 1)
            words = (lanes.reshape(n, -1, j, 8) << shifts).sum(2)  # [N, blocks, 8 lanes]
            byte_shifts = 8 * torch.arange(j // 2).view(1, 1, 1, -1)
            parts.append(((words.unsqueeze(-1) >> byte_shifts) & 0xFF).reshape(n, -1))  # little-endian bytes
    return torch.cat(parts, dim=1).to(torch.uint8).contiguous()


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """The codes [N, K] (uint8) of ``pack_int4``'s ``packed`` [N, K / 2]."""
    n, k = packed.shape[0], packed.shape[1] * 2
    b = packed.to(torch.int64)
    full = k - k % 64
    parts = []
    for width, data in ((64, b[:, :full // 2]), (32, b[:, full // 2:])):
        j = width // 8
        if data.shape[1]:
            words = (data.reshape(n, -1, 8, j // 2) << 8 * torch.arange(j // 2)).sum(-1)  # [N, blocks, 8 lanes]
            codes = (words.unsqueeze(2) >> 4 * torch.arange(j).view(1, 1, j, 1)) & 0x0F  # [N, blocks, j, 8]
            parts.append(codes.reshape(n, -1))
    return torch.cat(parts, dim=1).to(torch.uint8)


@functools.cache
def load() -> QuantKernels | None:
    """The kernels, built if needed; None (logged once) where they cannot be built."""
    try:
        if not {b"avx2", b"fma"} <= set(cpu_flags().split()):
            raise OSError("the CPU lacks AVX2 or FMA")
        return QuantKernels(ctypes.CDLL(str(build_library(SOURCE, FLAGS, stem="quant", depends=DEPENDS))))
    except (OSError, subprocess.SubprocessError) as e:
        log.warning("int8/int4 weight kernels unavailable (%s): 8-bit GGUF weights are dequantized to fp32, "
                    "4-bit ones multiplied by torch's bf16 int4 kernel", e)
        return None
