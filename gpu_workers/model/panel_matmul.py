"""fp32 matmuls on weights packed in 16-feature panels (panel_matmul.c): the CPU linears' kernel.

``pack(weight)`` turns a linear's [out, in] weight into ``ceil(out / 16)`` panels of [in, 16], and
``matmul(x, packed, out_features)`` multiplies by it: each panel is read once, front to back, for any
number of rows, so a decode step streams the weights at the memory's speed, and larger batches run as
a register-tiled GEMM. On the 2-core AVX-512 VM, against oneDNN on its own packed layout, SmolLM2's 121
linears of a decode step took 14.2 against 18.5 ms at 1 row, 19.9 against 23.6 at 8, 90 against 94 at
64 and even at 256 (benchmarks/matmul.py ``--kernels``).

Every output is one thread's in-order sum over the input features, the same operations for any
number of rows and threads, so a row's result does not depend on the rows beside it (batch
invariance, bit for bit).

``load()`` builds the library on first use (``c_build.build_library``); None where no compiler works
(logged once: the CPU linears then use oneDNN) or with ``RYZ_CPU_MATMUL=onednn`` (A/B measurements).
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import subprocess
from pathlib import Path

import torch

from gpu_workers.model.c_build import build_library

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("panel_matmul.c")
# -ffp-contract=fast: each step of a sum is one fused multiply-add, in every tile shape alike
FLAGS = ("-O3", "-march=native", "-fPIC", "-shared", "-pthread", "-ffp-contract=fast")
DEPENDS = (SOURCE.with_name("work_pool.h"),)
PANEL = 16  # output features per panel (panel_matmul.c)
# Layers from this size are packed (below it F.linear's MKL call costs little more); products of fewer
# multiply-adds than SERIAL_MACS run on the calling thread alone, cheaper than waking another.
MIN_WEIGHTS = 1 << 14
SERIAL_MACS = 1 << 16

_P = ctypes.c_void_p
_I = ctypes.c_int64


class PanelKernels:
    """Typed entry points; ValueError for operands the C code would misread (it reads raw fp32 memory)."""

    def __init__(self, lib: ctypes.CDLL) -> None:
        lib.panel_matmul.argtypes = [_P, _I, _I, _I, _P, _I, _P, _P, _I, ctypes.c_int]
        lib.panel_pack.argtypes = [_P, _I, _I, _I, _P]
        lib.panel_matmul.restype = lib.panel_pack.restype = None
        self._lib = lib

    def pack(self, weight: torch.Tensor) -> torch.Tensor:
        """``weight`` [out, in] (fp32, CPU) as panels [ceil(out / 16), in, 16], zero-padded."""
        _check_fp32(weight)
        if weight.dim() != 2 or weight.stride(1) != 1:
            weight = weight.reshape(weight.shape[0], -1).contiguous()
        n, k = weight.shape
        packed = torch.empty((n + PANEL - 1) // PANEL, k, PANEL)
        self._lib.panel_pack(weight.data_ptr(), n, k, weight.stride(0), packed.data_ptr())
        return packed

    def matmul(self, x: torch.Tensor, packed: torch.Tensor, out_features: int,
               bias: torch.Tensor | None = None) -> torch.Tensor:
        """``x`` [..., in] times the packed weight (``pack``) of ``out_features`` rows, plus ``bias``
        [out_features]: [..., out_features], as ``F.linear(x, weight, bias)``."""
        for t in (x, packed) if bias is None else (x, packed, bias):
            _check_fp32(t)
        k = packed.shape[1]
        if (x.shape[-1] != k or packed.dim() != 3 or packed.shape[2] != PANEL or not packed.is_contiguous()
                or packed.shape[0] != (out_features + PANEL - 1) // PANEL):
            raise ValueError(f"x {tuple(x.shape)} against panels {tuple(packed.shape)} of {out_features} outputs")
        if bias is not None:
            if bias.shape != (out_features,):
                raise ValueError(f"bias {tuple(bias.shape)} for {out_features} outputs")
            bias = bias.contiguous()
        rows = x.reshape(-1, k)
        if rows.stride(-1) != 1:
            rows = rows.contiguous()
        out = torch.empty(rows.shape[0], out_features)
        if out.numel():
            self._lib.panel_matmul(rows.data_ptr(), rows.shape[0], k, rows.stride(0), packed.data_ptr(), out_features,
                                   None if bias is None else bias.data_ptr(), out.data_ptr(), out_features,
                                   1 if out.numel() * k < SERIAL_MACS else torch.get_num_threads())
        return out.view(*x.shape[:-1], out_features)


def _check_fp32(t: torch.Tensor) -> None:
    if t.dtype is not torch.float32 or not t.is_cpu:
        raise ValueError(f"panel matmul operands are fp32 CPU tensors, not {t.dtype} on {t.device}")


@functools.cache
def load() -> PanelKernels | None:
    """The kernels, built if needed; None (logged once) where they cannot be built or are turned off."""
    if os.environ.get("RYZ_CPU_MATMUL", "panel") == "onednn":
        return None
    try:
        return PanelKernels(ctypes.CDLL(str(build_library(SOURCE, FLAGS, stem="panel", depends=DEPENDS))))
    except (OSError, subprocess.SubprocessError) as e:
        log.warning("panel matmul kernels unavailable (%s): fp32 CPU linears use oneDNN", e)
        return None
