"""How a linear layer's fp32 matmul runs on CPUs: oneDNN, with weights packed in its own layout.

Large fp32 matmuls on CPUs go through oneDNN (``linear``), with weights packed in its own layout
once loaded (``PackedWeight.pack``): on the machines measured here that runs 1.5-2x faster than
MKL's sgemm at decode batch sizes (benchmarks/matmul.py). Other dtypes, small weights and CUDA use
``F.linear``. (A plain AVX2 loop over dense weights streams faster at one row, ~22 against ~17 GB/s
on the 2-core AVX-512 VM, but needs the weights unpacked, and oneDNN on unpacked weights lost more at
8 and 64 rows than the loop gained at 1: 58 against 48 ms and 191 against 155 ms a SmolLM2 decode
step, against 33-36 ms at batch 1.)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# oneDNN's fp32 linear (the kernel torch.compile's CPU backend also calls), when this torch has it.
# Below ~0.5M weights the two libraries are even and oneDNN's per-call setup (~13 us) dominates.
_ONEDNN = (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
           and hasattr(torch.ops.mkldnn, "_reorder_linear_weight"))
ONEDNN_MIN_WEIGHTS = 1 << 19


def onednn_available() -> bool:
    return _ONEDNN


def onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear`` computed by oneDNN (CPU tensors only); ``weight`` dense or packed (``pack_weight``)."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


def packable(weight: torch.Tensor) -> bool:
    """Whether ``weight`` goes through oneDNN: fp32, on a CPU, large."""
    return (_ONEDNN and weight.dtype == torch.float32 and weight.device.type == "cpu"
            and weight.numel() >= ONEDNN_MIN_WEIGHTS)


def pack_weight(weight: torch.Tensor) -> torch.Tensor:
    """A [out, in] weight in oneDNN's own blocked layout (an opaque mkldnn tensor): its matmuls then
    skip the reordering of the weight on every call, ~15% faster at decode batch sizes."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), None)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           packed: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)``; through oneDNN for large fp32 weights on CPUs, with the
    ``packed`` copy of ``weight`` where there is one."""
    if packed is not None:
        return onednn_linear(x, packed, bias)
    if packable(weight):
        return onednn_linear(x, weight, bias)
    return F.linear(x, weight, bias)


class PackedWeight:
    """A layer whose ``weight`` can be handed to oneDNN packed (``pack``): after that the layer
    computes with ``packed``, and unless ``keep_dense`` the dense weight is freed (the layer can
    no longer load weights)."""

    weight: nn.Parameter
    packed: torch.Tensor | None = None

    def pack(self, *, keep_dense: bool = False) -> bool:
        """Pack the weight if ``packable``; whether it was packed now."""
        if self.packed is not None or not packable(self.weight):
            return False
        self.packed = pack_weight(self.weight.data)
        if not keep_dense:
            self.weight.data = self.weight.data.new_empty(0)
        return True

    def packed_bytes(self) -> int:
        return 0 if self.packed is None else int(torch.ops.mkldnn._nbytes(self.packed))
