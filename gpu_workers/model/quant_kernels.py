"""The weight-only 8-bit matmul of quant_kernels.c (GGUF blocks kept as int8 codes and fp32 block
constants), compiled on first use and loaded with ctypes.

torch has no CPU kernel for per-32-weight scales on int8 weights: ``aten._weight_int8pack_mm``
takes one scale per output row, and is unvectorized on AVX2 (~2.5x the time of the fp32 matmul at
one row, ~18x at 8; ``benchmarks/quant_matmul.py``); ``torch._int_mm`` quantizes activations and is
slower still here. The C kernel multiplies fp32 activations by the weights dequantized in registers,
so its products are those of the fp32 matmul of the dequantized weights.

Built as ``fp8_kernels`` builds its library: the machine's C compiler (``$CC``, else ``cc``),
``-march=native``, cached under the ryzanstein cache directory keyed by the source, the flags, the
compiler and the CPU's feature flags. Where no compiler works (or the CPU lacks AVX2 and FMA),
``load`` logs why once and returns None, and the loader dequantizes those weights to fp32 instead.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

from gpu_workers.model.presets import default_cache_dir

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("quant_kernels.c")
# No -ffp-contract: each weight is rounded as gguf rounds it (a multiply, then an add), not fused.
FLAGS = ("-O3", "-march=native", "-fPIC", "-shared", "-fopenmp", "-ffp-contract=off")
BUILD_TIMEOUT_S = 120

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
        if not {b"avx2", b"fma"} <= set(_cpu_flags().split()):
            raise OSError("the CPU lacks AVX2 or FMA")
        return Int8Kernels(ctypes.CDLL(str(_build())))
    except (OSError, subprocess.SubprocessError) as e:
        log.warning("int8 weight kernels unavailable (%s): 8-bit GGUF weights are dequantized to fp32", e)
        return None


def _build() -> Path:
    compiler = os.environ.get("CC") or "cc"
    if shutil.which(compiler) is None:
        raise OSError(f"no C compiler {compiler!r} on PATH")
    source = SOURCE.read_bytes()
    version = subprocess.run([compiler, "--version"], capture_output=True, timeout=30, check=True).stdout
    key = hashlib.sha256(b"\0".join([source, " ".join(FLAGS).encode(), version, _cpu_flags()]))
    out_dir = default_cache_dir() / "kernels"
    path = out_dir / f"int8-{key.hexdigest()[:16]}.so"
    if path.exists():
        return path
    out_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=out_dir)
    os.close(fd)
    try:
        done = subprocess.run([compiler, *FLAGS, "-o", tmp, str(SOURCE)], capture_output=True, text=True,
                              check=False, timeout=BUILD_TIMEOUT_S)
        if done.returncode != 0:
            raise OSError(f"{compiler} failed: {done.stderr.strip()[-500:]}")
        os.replace(tmp, path)  # atomic: a racing build leaves one complete library
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def _cpu_flags() -> bytes:
    try:
        with open("/proc/cpuinfo", "rb") as f:
            return next((line for line in f if line.startswith(b"flags")), b"")
    except OSError:
        return b""
