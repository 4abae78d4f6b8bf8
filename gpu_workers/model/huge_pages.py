"""Weights in memory the kernel may back with 2 MiB pages (transparent huge pages), for the CPU kernels.

A decode step at small batch streams every weight once from memory. With 4 KiB pages that is a TLB
miss every 4 KiB, costlier under a VM's nested paging, and the hardware prefetchers stop at each page
boundary. On Linux with transparent huge pages in ``madvise`` mode (the common default, and this
project's VMs') an anonymous range gets 2 MiB pages only where ``madvise(MADV_HUGEPAGE)`` asked
before it was touched. Measured on the 2-CPU AMD EPYC VM, SmolLM2's fp32 LM head (113 MB of panels)
at one row, 40 calls alternating: 3.37 against 3.80, 2.87 against 2.89, 1.78 against 1.96 ms median
in three runs (the host's bandwidth moved between them).

``empty(shape, dtype)`` hands out 64-byte-aligned views of 64 MiB arenas (a larger tensor gets an arena
of its own), each arena ``madvise``d as a whole before anything is written to it: no 2 MiB of slack
per tensor. Where ``madvise`` is missing or refuses (other systems, THP ``never``), the memory is
ordinary; nothing else changes. The arenas live as long as some view of them does.
"""

from __future__ import annotations

import ctypes
import mmap
import threading

import torch

HUGE_PAGE = 2 << 20
ARENA_BYTES = 64 << 20  # above glibc's largest mmap threshold (32 MiB): always a fresh, untouched mapping
ALIGN = 64

_MADV_HUGEPAGE: int | None = getattr(mmap, "MADV_HUGEPAGE", None)


def _madvise() -> ctypes._NamedFuncPointer | None:
    try:
        fn = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


class _Arenas:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._arena: torch.Tensor | None = None  # uint8, its first byte 2 MiB-aligned
        self._used = 0
        self._madvise = _madvise() if _MADV_HUGEPAGE is not None else None

    def _new(self, nbytes: int) -> torch.Tensor:
        size = (nbytes + HUGE_PAGE - 1) // HUGE_PAGE * HUGE_PAGE
        raw = torch.empty(size + HUGE_PAGE, dtype=torch.uint8)
        start = -raw.data_ptr() % HUGE_PAGE
        arena = raw[start : start + size]
        if self._madvise is not None and _MADV_HUGEPAGE is not None:
            self._madvise(arena.data_ptr(), size, _MADV_HUGEPAGE)  # a refusal leaves ordinary pages
        return arena

    def take(self, nbytes: int) -> torch.Tensor:
        """``nbytes`` uint8 bytes at a 64-byte-aligned address inside an arena."""
        with self._lock:
            if nbytes > ARENA_BYTES:
                return self._new(nbytes)[:nbytes]
            if self._arena is None or self._used + nbytes > self._arena.numel():
                self._arena, self._used = self._new(ARENA_BYTES), 0
            view = self._arena[self._used : self._used + nbytes]
            self._used = (self._used + nbytes + ALIGN - 1) // ALIGN * ALIGN
            return view


_ARENAS = _Arenas()


def empty(shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """An uninitialized, contiguous CPU tensor of ``shape`` and ``dtype`` at a 64-byte-aligned address,
    in memory asked to be backed by 2 MiB pages. For weights written once and read every step."""
    numel = 1
    for n in shape:
        numel *= n
    return _ARENAS.take(numel * dtype.itemsize).view(dtype).view(shape)


def copy_of(t: torch.Tensor) -> torch.Tensor:
    """A contiguous copy of ``t`` in huge-page memory (``empty``); on another device than the CPU,
    ``t.contiguous()``."""
    if t.device.type != "cpu":
        return t.contiguous()
    out = empty(tuple(t.shape), t.dtype)
    out.copy_(t)
    return out
