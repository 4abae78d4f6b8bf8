"""The weight-only 8-bit matmul of quant_kernels.c (GGUF blocks kept as int8 codes and fp32 block
constants), compiled on first use and loaded with ctypes.

torch has no CPU kernel for per-32-weight scales on int8 weights: ``aten._weight_int8pack_mm``
takes one scale per output row, and is unvectorized on AVX2 (~2.5x the time of the fp32 matmul at
one row, ~18x at 8; ``benchmarks/quant_matmul.py``); ``torch._int_mm`` quantizes activations and is
slower still here. The C kernel multiplies fp32 activations by the weights dequantized in registers,
so its products are those of the fp32 matmul of the dequantized weights.

Built and cached by ``c_build.build_library``, as the fp8 kernels are. Where no compiler works (or the CPU lacks AVX2 and FMA),
``load`` logs why once and returns None, and the loader dequantizes those weights to fp32 instead.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import subprocess
from pathlib import Path

import torch

from gpu_workers.model.c_build import build_library, cpu_flags

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("quant_kernels.c")
# No -ffp-contract: each weight is rounded as gguf rounds it (a multiply, then an add), not fused.
FLAGS = ("-O3", "-march=native", "-fPIC", "-shared", "-fopenmp", "-ffp-contract=off")

_P = ctypes.c_void_p
_I = ctypes.c_int64


class Int8Kernels:
    """Typed entry points into the compiled library; all tensors are CPU tensors."""

    def __init__(self, lib: ctypes.CDLL) -> None:
        lib.int8_matmul.argtypes = [_P, _I, _I, _P, _P, _P, _I, _I, _P, ctypes.c_int]
        lib.int8_matmul.restype = ctypes.c_int
        lib.int8_dequantize.argtypes = [_P, _P, _P, _I, _I, _I, _P, ctypes.c_int]
        lib.int8_dequantize.restype = None
        self._lib = lib

    def matmul(self, x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
               group: int) -> torch.Tensor:
        """``x`` [M, K] fp32 times the weight [N, K] ``codes * scale (+ zero)``: [M, N] fp32.
        ``codes`` int8 [N, K], ``scale`` and ``zero`` fp32 [N, K / group], all contiguous.
        ValueError unless K is a multiple of 32 and of ``group``, a multiple of 8."""
        x = x.to(torch.float32).contiguous()
        (m, k), n = x.shape, codes.shape[0]
        if codes.shape[1] != k:
            raise ValueError(f"x {tuple(x.shape)} against weight codes {tuple(codes.shape)}")
        y = torch.empty(m, n, dtype=torch.float32)
        rc = self._lib.int8_matmul(x.data_ptr(), m, k, codes.data_ptr(), scale.data_ptr(),
                                   None if zero is None else zero.data_ptr(), n, group, y.data_ptr(),
                                   torch.get_num_threads())
        if rc != 0:
            raise ValueError(f"{k} inputs in groups of {group}: need multiples of 32 and of the group")
        return y

    def dequantize(self, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
                   group: int) -> torch.Tensor:
        """The fp32 weight [N, K]: ``code * scale (+ zero)`` rounded as the gguf package rounds."""
        n, k = codes.shape
        out = torch.empty(n, k, dtype=torch.float32)
        self._lib.int8_dequantize(codes.data_ptr(), scale.data_ptr(), None if zero is None else zero.data_ptr(),
                                  n, k, group, out.data_ptr(), torch.get_num_threads())
        return out


@functools.cache
def load() -> Int8Kernels | None:
    """The kernels, built if needed; None (logged once) where they cannot be built."""
    try:
        if not {b"avx2", b"fma"} <= set(cpu_flags().split()):
            raise OSError("the CPU lacks AVX2 or FMA")
        return Int8Kernels(ctypes.CDLL(str(build_library(SOURCE, FLAGS, stem="int8"))))
    except (OSError, subprocess.SubprocessError) as e:
        log.warning("int8 weight kernels unavailable (%s): 8-bit GGUF weights are dequantized to fp32", e)
        return None
