"""Tensor-parallel building blocks: norms, sharded linears, vocab-parallel embedding and LM head.

Sharding follows Megatron: a column-parallel linear splits its output features over ranks (no
communication, the output stays sharded); a row-parallel linear splits its input features and
all-reduces the partial sums. Attention is column-parallel by heads (QKV) then row-parallel (o_proj);
the MLP is column-parallel (gate+up) then row-parallel (down): one all-reduce per block.

Each parameter carries a ``weight_loader(param, loaded, shard_id=None)`` that narrows the full
checkpoint tensor to this rank's shard. ``loaded`` is a torch.Tensor or a lazy checkpoint tensor
(``gpu_workers.model.loader.CheckpointTensor``) that reads only the narrowed part from disk.
Collectives are plain lines in ``forward`` guarded by ``tp.size > 1``.

How the fp32 matmuls run on CPUs (packed weights, our panel kernel or oneDNN): ``cpu_matmul``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from gpu_workers.model import layer_kernels
from gpu_workers.model.cpu_matmul import PackedWeight
from gpu_workers.model.quantization import PARTS, Int4Weight, Int8Weight


@dataclass(frozen=True, slots=True)
class TPContext:
    """This process's place in its tensor-parallel group; ``group`` is a torch.distributed
    ProcessGroup (None: the default group, or no communication at size 1)."""

    rank: int = 0
    size: int = 1
    group: Any = None


class LazyTensor(Protocol):
    """A checkpoint tensor not read yet (a GGUF tensor): narrowed first, then read by ``load()``."""

    @property
    def shape(self) -> Any: ...

    def narrow(self, dim: int, start: int, length: int) -> LazyTensor: ...

    def load(self) -> torch.Tensor: ...


# A checkpoint tensor: torch.Tensor, or a lazy one that reads its part on ``load()``.
Loadable = torch.Tensor | LazyTensor


def _take(loaded: Loadable, dim: int, start: int, length: int) -> torch.Tensor:
    """``loaded`` narrowed along ``dim``, read into memory."""
    part = loaded.narrow(dim, start, length)
    return part if isinstance(part, torch.Tensor) else part.load()


def _read(loaded: Loadable) -> torch.Tensor:
    return loaded if isinstance(loaded, torch.Tensor) else loaded.load()


def _check_shape(loaded: Loadable, expected: tuple[int, ...]) -> None:
    if tuple(loaded.shape) != tuple(expected):
        raise ValueError(f"checkpoint shape {tuple(loaded.shape)}, model expects {tuple(expected)}")


def default_weight_loader(param: nn.Parameter, loaded: Loadable, shard_id: Any = None) -> None:
    """Replicated parameters (norms): the whole tensor on every rank."""
    _check_shape(loaded, param.shape)
    param.data.copy_(_read(loaded))


class RMSNorm(nn.Module):
    def __init__(self, size: int, *, eps: float, dtype: torch.dtype) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(size, dtype=dtype), requires_grad=False)

    offset = False  # the scale is weight (Gemma's: 1 + weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (kernels := layer_kernels.enabled(x, self.weight)) is not None:
            return kernels.rms_norm(x, self.weight, self.eps, offset=self.offset)
        return self.norm(x)

    def norm(self, x: torch.Tensor) -> torch.Tensor:
        """The torch form. transformers' LlamaRMSNorm: statistics in fp32, scale applied in the input dtype."""
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)

    def add_forward(self, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(this norm of ``x + residual``, ``x + residual``), both [T, size]: the residual add of a decoder
        layer and the norm after it, one pass with the layer kernels (vLLM's ``fused_add_rms_norm``)."""
        if (kernels := layer_kernels.enabled(x, residual, self.weight)) is not None:
            return kernels.fused_add_rms_norm(x, residual, self.weight, self.eps, offset=self.offset)
        summed = x + residual
        return self.norm(summed), summed


class GemmaRMSNorm(RMSNorm):
    """Gemma's RMSNorm: the scale is ``1 + weight``, applied in fp32 before the cast back
    (transformers' Gemma3RMSNorm)."""

    offset = True

    def norm(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (x32 * (1.0 + self.weight.float())).to(x.dtype)


class LinearBase(PackedWeight, nn.Module):
    """A linear layer holding this rank's [out_local, in_local] weight slice: dense (packed for
    oneDNN once loaded), or 4- or 8-bit (``quantized``, from ``load_quantized``)."""

    quantized: Int4Weight | Int8Weight | None = None
    # In a compiled model (gpu_workers.model.compilation): the layer's index among the model's
    # linears, by which the graph calls it through the opaque op ``ryzanstein::linear`` (eager
    # calls are unchanged).
    op_index: int | None = None

    def __init__(self, in_local: int, out_local: int, *, bias: bool, tp: TPContext, dtype: torch.dtype) -> None:
        super().__init__()
        self.tp = tp
        self.out_local = out_local
        self.weight = nn.Parameter(torch.empty(out_local, in_local, dtype=dtype), requires_grad=False)
        self.weight.weight_loader = self.weight_loader  # type: ignore[attr-defined]
        if bias:
            self.bias = nn.Parameter(torch.empty(out_local, dtype=dtype), requires_grad=False)
            self.bias.weight_loader = self.weight_loader  # type: ignore[attr-defined]
        else:
            self.register_parameter("bias", None)

    def weight_loader(self, param: nn.Parameter, loaded: Loadable, shard_id: Any = None) -> None:
        raise NotImplementedError

    def load_quantized(self, tensors: list[tuple[Loadable, Any]], *,
                       kind: type[Int4Weight | Int8Weight] = Int4Weight) -> None:
        """Load the weight from GGUF tensors of a 4-bit type (``quantization.int4_types``; or of
        ``int8_types`` for ``kind`` Int8Weight), kept as ``kind``: ``tensors`` are each (checkpoint
        tensor, shard id) of this weight, as for ``weight_loader``, which narrows each part (codes,
        scales, zeros) as it narrows the values. The dense weight is freed. ValueError when the
        shard cuts through quantization blocks."""
        self.quantized = kind(*_load_parts(self.weight, self.weight_loader, tensors))
        self.weight.data = self.weight.data.new_empty(0)

    def packed_bytes(self) -> int:
        """Bytes of the packed or the quantized weight."""
        return super().packed_bytes() + (0 if self.quantized is None else self.quantized.nbytes())

    def matmul(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """``x`` [..., in_local] times this rank's weight, plus ``bias``."""
        if self.quantized is None:
            return self.packed_matmul(x, bias)
        y = self.quantized(x)
        return y if bias is None else y + bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.op_index is not None and torch.compiler.is_compiling():
            return torch.ops.ryzanstein.linear(x, self.op_index, self.out_local)
        return self.forward_eager(x)

    def forward_eager(self, x: torch.Tensor) -> torch.Tensor:
        """The layer's output, computed here and now (never through the compiled graph's op)."""
        return self.matmul(x, self.bias)


def _load_parts(weight: nn.Parameter, weight_loader: Any, tensors: list[tuple[Loadable, Any]]) -> list[torch.Tensor]:
    """The codes, scale and zero [weight's shape] of GGUF ``tensors`` (each (tensor, shard id)),
    narrowed by ``weight_loader`` as it narrows the values."""
    parts = [nn.Parameter(torch.zeros(weight.shape), requires_grad=False) for _ in PARTS]
    for loaded, shard_id in tensors:
        for name, part in zip(PARTS, parts, strict=True):
            weight_loader(part, loaded.part(name), shard_id)  # type: ignore[union-attr]
    return [p.data for p in parts]


def _offsets(sizes: list[int]) -> list[int]:
    """Where each of consecutive parts of ``sizes`` begins."""
    return [sum(sizes[:i]) for i in range(len(sizes))]


def _split(total: int, tp: TPContext, what: str) -> int:
    if total % tp.size:
        raise ValueError(f"{what} {total} does not split over {tp.size} ranks")
    return total // tp.size


class ColumnParallelLinear(LinearBase):
    """Output features split over ranks; the output stays sharded."""

    def __init__(self, in_features: int, out_features: int, *, bias: bool, tp: TPContext, dtype: torch.dtype) -> None:
        self.out_features = out_features
        super().__init__(in_features, _split(out_features, tp, "output size"), bias=bias, tp=tp, dtype=dtype)

    def weight_loader(self, param: nn.Parameter, loaded: Loadable, shard_id: Any = None) -> None:
        size = param.shape[0]
        _check_shape(loaded, (self.out_features, *param.shape[1:]))
        param.data.copy_(_take(loaded, 0, self.tp.rank * size, size))


class MergedColumnParallelLinear(LinearBase):
    """Several column-parallel linears of one input in one matmul (gate and up projections):
    the output is this rank's slice of each, concatenated; ``shard_id`` is the part's index."""

    def __init__(
        self, in_features: int, out_sizes: list[int], *, bias: bool, tp: TPContext, dtype: torch.dtype
    ) -> None:
        self.out_sizes = out_sizes
        self.local_sizes = [_split(s, tp, "output size") for s in out_sizes]
        super().__init__(in_features, sum(self.local_sizes), bias=bias, tp=tp, dtype=dtype)

    def weight_loader(self, param: nn.Parameter, loaded: Loadable, shard_id: Any = None) -> None:
        if shard_id is None:  # the parts fused in one checkpoint tensor (Phi-3's gate_up_proj), in order
            _check_shape(loaded, (sum(self.out_sizes), *param.shape[1:]))
            for part, offset in enumerate(_offsets(self.out_sizes)):
                self.weight_loader(param, loaded.narrow(0, offset, self.out_sizes[part]), part)
            return
        _check_shape(loaded, (self.out_sizes[shard_id], *param.shape[1:]))
        size = self.local_sizes[shard_id]
        offset = sum(self.local_sizes[:shard_id])
        param.data.narrow(0, offset, size).copy_(_take(loaded, 0, self.tp.rank * size, size))


class QKVParallelLinear(LinearBase):
    """q, k and v projections in one matmul, split over ranks by heads.

    Output layout per rank: [q heads | k heads | v heads], each head ``head_dim`` wide. When there
    are more ranks than KV heads, each KV head is replicated on ``tp.size / num_kv_heads`` ranks.
    """

    def __init__(
        self, hidden_size: int, head_dim: int, num_heads: int, num_kv_heads: int, *,
        bias: bool, tp: TPContext, dtype: torch.dtype,
    ) -> None:
        self.head_dim = head_dim
        self.num_heads = _split(num_heads, tp, "attention heads")
        self.num_kv_heads = max(1, num_kv_heads // tp.size)
        self.total_heads = {"q": num_heads, "k": num_kv_heads, "v": num_kv_heads}
        # index of this rank's first KV head (replicas of one head sit on consecutive ranks)
        kv_first = tp.rank * num_kv_heads // tp.size if tp.size > num_kv_heads else tp.rank * self.num_kv_heads
        self._first_head = {"q": tp.rank * self.num_heads, "k": kv_first, "v": kv_first}
        local = {"q": self.num_heads, "k": self.num_kv_heads, "v": self.num_kv_heads}
        self._local_heads = local
        self._offset = {"q": 0, "k": local["q"], "v": local["q"] + local["k"]}
        super().__init__(hidden_size, (local["q"] + 2 * local["k"]) * head_dim, bias=bias, tp=tp, dtype=dtype)

    def weight_loader(self, param: nn.Parameter, loaded: Loadable, shard_id: Any = None) -> None:
        d = self.head_dim
        if shard_id is None:  # q, k and v fused in one checkpoint tensor (Phi-3's qkv_proj), in order
            sizes = [self.total_heads[part] * d for part in "qkv"]
            _check_shape(loaded, (sum(sizes), *param.shape[1:]))
            for name, offset, size in zip("qkv", _offsets(sizes), sizes):
                self.weight_loader(param, loaded.narrow(0, offset, size), name)
            return
        _check_shape(loaded, (self.total_heads[shard_id] * d, *param.shape[1:]))
        size = self._local_heads[shard_id] * d
        part = _take(loaded, 0, self._first_head[shard_id] * d, size)
        param.data.narrow(0, self._offset[shard_id] * d, size).copy_(part)


class RowParallelLinear(LinearBase):
    """Input features split over ranks; partial outputs are summed across ranks. The bias is
    added once, by rank 0, before the sum."""

    def __init__(self, in_features: int, out_features: int, *, bias: bool, tp: TPContext, dtype: torch.dtype) -> None:
        self.in_features = in_features
        super().__init__(_split(in_features, tp, "input size"), out_features, bias=bias, tp=tp, dtype=dtype)

    def weight_loader(self, param: nn.Parameter, loaded: Loadable, shard_id: Any = None) -> None:
        if param.dim() == 1:  # bias: whole, used by rank 0
            default_weight_loader(param, loaded)
            return
        size = param.shape[1]
        _check_shape(loaded, (param.shape[0], self.in_features))
        param.data.copy_(_take(loaded, 1, self.tp.rank * size, size))

    def forward_eager(self, x: torch.Tensor) -> torch.Tensor:
        y = self.matmul(x, self.bias if self.tp.rank == 0 else None)
        if self.tp.size > 1:
            dist.all_reduce(y, group=self.tp.group)
        return y


class VocabParallelEmbedding(nn.Module):
    """Embedding rows split over ranks (vocab padded to a multiple of the ranks); each rank looks
    up the ids it owns, zeros the others, and the all-reduce assembles the rows. ``quantized``
    (``load_quantized``): the rows kept as a GGUF file's 8-bit (or 4-, 5-, 6-bit) blocks, each
    looked-up row dequantized exactly."""

    quantized: Int8Weight | None = None

    def __init__(self, vocab_size: int, hidden_size: int, *, tp: TPContext, dtype: torch.dtype) -> None:
        super().__init__()
        self.tp = tp
        self.vocab_size = vocab_size
        self.rows = -(-vocab_size // tp.size)  # ceil
        self.first = tp.rank * self.rows
        self.weight = nn.Parameter(torch.empty(self.rows, hidden_size, dtype=dtype), requires_grad=False)
        self.weight.weight_loader = self.weight_loader  # type: ignore[attr-defined]

    def weight_loader(self, param: nn.Parameter, loaded: Loadable, shard_id: Any = None) -> None:
        _check_shape(loaded, (self.vocab_size, param.shape[1]))
        real = max(0, min(self.rows, self.vocab_size - self.first))  # the last rank may hold padding
        param.data[real:].zero_()
        param.data[:real].copy_(_take(loaded, 0, self.first, real))

    def load_quantized(self, tensors: list[tuple[Loadable, Any]], *, kind: type[Int8Weight] = Int8Weight) -> None:
        """As ``LinearBase.load_quantized``, of ``int8_types`` tensors, kept as ``Int8Weight``."""
        self.quantized = kind(*_load_parts(self.weight, self.weight_loader, tensors))
        self.weight.data = self.weight.data.new_empty(0)

    def _lookup(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight) if self.quantized is None else self.quantized.rows(ids)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return self._lookup(ids)
        mine = (ids >= self.first) & (ids < self.first + self.rows)
        y = self._lookup((ids - self.first) * mine) * mine[:, None].to(self.weight.dtype)
        dist.all_reduce(y, group=self.tp.group)
        return y


class ParallelLMHead(PackedWeight, VocabParallelEmbedding):
    """Output projection to the vocabulary, rows split like the embedding (and shared with it when
    the checkpoint ties them). Only rank 0 samples, so the logits are gathered there alone: rank 0
    returns [N, vocab], the other ranks their own [N, V / tp] part, which nothing reads.

    Split rather than replicated: on CPUs a replicated head costs rank 0 a [N, hidden] x
    [hidden, V / tp] matmul more per step than the gather does (benchmarks/tensor_parallel.py)."""

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.quantized is None:
            logits = self.packed_matmul(hidden)  # [N, V / tp]
        else:  # the kernel at every row count: dequantizing the head for a call costs 4 bytes a weight
            logits = self.quantized.multiply(hidden)
        if self.tp.size > 1:
            parts = [torch.empty_like(logits) for _ in range(self.tp.size)] if self.tp.rank == 0 else None
            dist.gather(logits, parts, dst=0, group=self.tp.group)  # group rank 0 is global rank 0
            if parts is not None:
                logits = torch.cat(parts, dim=-1)[:, : self.vocab_size]
        return logits
