"""How a linear layer's fp32 matmul runs on CPUs: our panel kernel, or oneDNN, on weights packed once.

Large fp32 CPU linears are packed once loaded (``PackedWeight.pack``), in the layout of
``panel_matmul`` (panels of 16 output features), whose kernel reads each panel once for any number of
rows: at one row it streams the weights ~1.3x faster than oneDNN did on its own packed layout, and it
is even or ahead up to prefill sizes (panel_matmul.py has the figures). Where that kernel cannot be
built, or with ``RYZ_CPU_MATMUL=onednn``, they go through oneDNN, packed in its own layout (1.5-2x
faster than MKL's sgemm at decode batch sizes: benchmarks/matmul.py). Other dtypes, small weights and
CUDA use ``F.linear``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from gpu_workers.model import panel_matmul

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


def packs(weight: torch.Tensor) -> bool:
    """Whether ``PackedWeight.pack`` packs ``weight``: fp32 on a CPU, and large enough for the kernel
    that will read it (panel_matmul's per-call cost is a few microseconds, oneDNN's ~13)."""
    if weight.dtype != torch.float32 or weight.device.type != "cpu":
        return False
    return weight.numel() >= panel_matmul.MIN_WEIGHTS if panel_matmul.load() is not None else packable(weight)


def pack_weight(weight: torch.Tensor) -> torch.Tensor:
    """A [out, in] weight in oneDNN's own blocked layout (an opaque mkldnn tensor): its matmuls then
    skip the reordering of the weight on every call, ~15% faster at decode batch sizes."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), None)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           packed: torch.Tensor | None = None, out_features: int | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)``; through oneDNN for large fp32 weights on CPUs, or with the
    ``packed`` copy of ``weight`` where there is one: panels (``panel_matmul``, a strided tensor; then
    ``out_features`` is the weight's row count) or oneDNN's layout."""
    if packed is not None:
        if packed.layout is torch.strided:
            kernels = panel_matmul.load()
            assert kernels is not None and out_features is not None, "panels are packed only where the kernels load"
            return kernels.matmul(x, packed, out_features, bias)
        return onednn_linear(x, packed, bias)
    if packable(weight):
        return onednn_linear(x, weight, bias)
    return F.linear(x, weight, bias)


class PackedWeight:
    """A layer whose ``weight`` can be packed (``pack``): after that the layer computes with
    ``packed`` (panels, else oneDNN's layout), and unless ``keep_dense`` the dense weight is freed
    (the layer can no longer load weights)."""

    weight: nn.Parameter
    packed: torch.Tensor | None = None
    packed_out: int = 0  # the weight's rows (panels pad them to a multiple of 16)

    def pack(self, *, keep_dense: bool = False) -> bool:
        """Pack the weight if it ``packs``; whether it was packed now."""
        if self.packed is not None or not packs(self.weight):
            return False
        kernels = panel_matmul.load()
        self.packed_out = self.weight.shape[0]
        self.packed = pack_weight(self.weight.data) if kernels is None else kernels.pack(self.weight.data)
        if not keep_dense:
            self.weight.data = self.weight.data.new_empty(0)
        return True

    def packed_matmul(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """``x`` [..., in] times the packed weight, plus ``bias``: [..., out]."""
        return linear(x, self.weight, bias, self.packed, self.packed_out)

    def packed_bytes(self) -> int:
        if self.packed is None:
            return 0
        if self.packed.layout is torch.strided:
            return self.packed.numel() * self.packed.element_size()
        return int(torch.ops.mkldnn._nbytes(self.packed))

    def packed_weights(self) -> int:
        """Weights the packed copy holds (without the panels' padding); 0 unpacked."""
        return 0 if self.packed is None else self.packed_out * self.packed.shape[1]  # both layouts: [_, in, ...]
