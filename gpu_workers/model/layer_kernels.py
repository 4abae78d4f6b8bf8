"""One-pass C kernels (layer_kernels.c) for a decoder layer's small fp32 CPU operations: RMSNorm, the
residual add fused into it, rotary embedding, SiLU-and-multiply.

At decode batch sizes each of these is a few thousand floats, and its torch form costs the dispatch
of 3-8 operations (RMSNorm ~35 us, RoPE ~25 us per call on the 2-core CPU measured, against 5-8 us
for the kernel call with its checks): with SmolLM2's 30 layers, milliseconds of a ~35 ms step. Eager mode only:
under ``torch.compile`` (``--compilation-config 3``) the torch forms stay, for inductor to fuse.

``enabled(*operands)`` says whether the operands take these kernels: all fp32, on the CPU, none
needing its gradient, not being compiled, and the library built (``c_build.build_library``; where
no compiler works, ``load`` logs why once and the torch forms are used). ``RYZ_LAYER_KERNELS=0``
turns them off, and with them the fused decoder path (``fused_decoder``; A/B measurements).
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

SOURCE = Path(__file__).with_name("layer_kernels.c")
# -ffp-contract=off: every product and sum rounded alone, as the torch operations replaced round them
FLAGS = ("-O3", "-march=native", "-fPIC", "-shared", "-fopenmp", "-ffp-contract=off")

_P = ctypes.c_void_p
_I = ctypes.c_int64
_F = ctypes.c_float
_N = ctypes.c_int


class LayerKernels:
    """Typed entry points; every tensor fp32, on the CPU (``enabled`` checks that: nothing here can,
    the C code reads raw memory). Outputs are new tensors. ValueError for shapes the C code would
    read past."""

    def __init__(self, lib: ctypes.CDLL) -> None:
        lib.rms_norm.argtypes = [_P, _P, _F, _N, _I, _I, _P, _N]
        lib.fused_add_rms_norm.argtypes = [_P, _P, _P, _F, _N, _I, _I, _P, _P, _N]
        lib.rotary_embedding.argtypes = [_P, _I, _P, _P, _I, _I, _I, _P, _N]
        lib.silu_and_mul.argtypes = [_P, _I, _I, _P, _N]
        for f in (lib.rms_norm, lib.fused_add_rms_norm, lib.rotary_embedding, lib.silu_and_mul):
            f.restype = None
        self._lib = lib

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float, *, offset: bool) -> torch.Tensor:
        """``x * rsqrt(mean(x^2) + eps) * weight`` over the last dim of ``x`` [..., n], ``weight`` [n];
        ``offset``: times ``1 + weight`` (Gemma)."""
        x, weight = x.contiguous(), _check_weight(weight, x)
        out = torch.empty_like(x)
        n = x.shape[-1]
        if out.numel():
            self._lib.rms_norm(x.data_ptr(), weight.data_ptr(), eps, int(offset), x.numel() // n, n, out.data_ptr(),
                               torch.get_num_threads())
        return out

    def fused_add_rms_norm(self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float, *,
                           offset: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """(RMSNorm(x + residual), x + residual) for ``x``, ``residual`` [..., n] of one shape, ``weight`` [n]."""
        x, residual, weight = x.contiguous(), residual.contiguous(), _check_weight(weight, x)
        if residual.shape != x.shape:
            raise ValueError(f"residual {tuple(residual.shape)} against x {tuple(x.shape)}")
        out, summed = torch.empty_like(x), torch.empty_like(x)
        n = x.shape[-1]
        if out.numel():
            self._lib.fused_add_rms_norm(x.data_ptr(), residual.data_ptr(), weight.data_ptr(), eps, int(offset),
                                         x.numel() // n, n, out.data_ptr(), summed.data_ptr(),
                                         torch.get_num_threads())
        return out, summed

    def rotary_embedding(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """``x`` [T, N, D] (heads D apart; rows may be strided, e.g. a slice of the fused QKV output)
        rotated by ``cos``, ``sin`` [T, 1, D / 2] (or [1, 1, D / 2], one position for all): a new
        contiguous [T, N, D]. ValueError for other cos, sin shapes (per-head angles) or an odd D."""
        t, heads, d = x.shape
        if d % 2 or cos.shape not in ((t, 1, d // 2), (1, 1, d // 2)) or sin.shape != cos.shape:
            raise ValueError(f"cos {tuple(cos.shape)}, sin {tuple(sin.shape)} against x {tuple(x.shape)}: "
                             f"need [T or 1, 1, D / 2] each")
        if x.stride(2) != 1 or x.stride(1) != d:
            x = x.contiguous()
        cos, sin = (c.expand(t, 1, d // 2).contiguous() for c in (cos, sin))
        out = torch.empty(t, heads, d, dtype=x.dtype)
        self._lib.rotary_embedding(x.data_ptr(), x.stride(0), cos.data_ptr(), sin.data_ptr(), t, heads, d,
                                   out.data_ptr(), torch.get_num_threads())
        return out

    def silu_and_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        """``silu(gate) * up`` for ``gate_up`` [..., 2 I] (gate first): [..., I]. ValueError for an odd
        last dim."""
        if gate_up.shape[-1] % 2:
            raise ValueError(f"gate_up {tuple(gate_up.shape)}: the last dim is not two halves")
        gate_up = gate_up.contiguous()
        n = gate_up.shape[-1] // 2
        out = torch.empty(*gate_up.shape[:-1], n, dtype=gate_up.dtype)
        if out.numel():
            self._lib.silu_and_mul(gate_up.data_ptr(), out.numel() // n, n, out.data_ptr(), torch.get_num_threads())
        return out


def _check_weight(weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``weight`` contiguous, after checking it is [n] for ``x`` [..., n]: the C code reads n values."""
    if weight.shape != x.shape[-1:]:
        raise ValueError(f"weight {tuple(weight.shape)} against x {tuple(x.shape)}")
    return weight.contiguous()


@functools.cache
def load() -> LayerKernels | None:
    """The kernels, built if needed; None (logged once) where they cannot be built or are turned off."""
    if os.environ.get("RYZ_LAYER_KERNELS", "1") == "0":
        return None
    try:
        return LayerKernels(ctypes.CDLL(str(build_library(SOURCE, FLAGS, stem="layer", depends=(SOURCE.with_name("layer_ops.h"),)))))
    except (OSError, subprocess.SubprocessError) as e:
        log.warning("layer kernels unavailable (%s): RMSNorm, RoPE and SiLU run as torch operations", e)
        return None


def enabled(*operands: torch.Tensor) -> LayerKernels | None:
    """The kernels when ``operands`` (an operation's every tensor input) take them, else None: each
    fp32 on the CPU (the C code reads fp32 memory; the torch forms promote mixed dtypes), none
    needing a gradient (the C code records no autograd graph), in eager mode."""
    if torch.compiler.is_compiling():
        return None
    grad = torch.is_grad_enabled()
    for t in operands:
        if t.dtype is not torch.float32 or not t.is_cpu or (grad and t.requires_grad):
            return None
    return load()
