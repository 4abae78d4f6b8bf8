"""A compiled forward pass: the decoder layers as one ``torch.compile`` graph (inductor, CPU C++).

vLLM's design (vllm/compilation/, ``unified_attention`` in vllm/attention/layer.py), on a CPU:

- The whole stack of decoder layers is traced once into one graph with a dynamic token count, so a
  step of any size (decode batches, prefill chunks, both mixed) runs the same compiled code; dynamo
  specializes a single token, so a worker compiles twice (T = 1, T >= 2), once, at start-up.
- What cannot be traced stays opaque, as custom ops the graph calls: paged attention
  (``ryzanstein::attention``; it reads the step's ``AttentionBatch`` and ``KVCache`` from the forward
  context, as vLLM's does) and the linear layers (``ryzanstein::linear``: our oneDNN-packed, 4-bit or
  tensor-parallel matmuls, exactly the kernels eager runs). Inductor fuses everything between them:
  RMSNorm with its residual add, RoPE, the gate activation times up, into a few C++ loops per layer,
  and the per-layer Python of ``nn.Module`` calls is gone.

``CompilationLevel`` follows vLLM's ``--compilation-config`` levels: 0 runs eager (``--enforce-eager``),
3 compiles. Compiled fp32 steps are not bit-identical to eager (fused reductions round differently);
greedy tokens are the same (tests/gpu_workers/test_compilation.py).
"""

from __future__ import annotations

import contextlib
import enum
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from gpu_workers.model.attention import AttentionBatch, PagedAttention
    from gpu_workers.model.kv_cache import KVCache
    from gpu_workers.model.layers import LinearBase


# Inductor's C++ kernels here are the loops between matmuls, a few thousand floats per token: one
# thread runs them faster than waking OpenMP's sleeping threads for each (OMP_WAIT_POLICY=PASSIVE,
# gpu_workers/cpu_threads.py), and never waits on a thread the host has descheduled.
INDUCTOR_OPTIONS: dict[str, Any] = {"cpp.threads": 1}


class CompilationLevel(enum.IntEnum):
    """vLLM's ``CompilationConfig.level`` values that mean something here."""

    NO_COMPILATION = 0  # eager (``--enforce-eager``)
    PIECEWISE = 3  # the decoder layers as one inductor graph, attention and matmuls opaque


@dataclass(slots=True)
class ForwardContext:
    """What the opaque ops of a compiled step read: the model's layers by index, the step's view."""

    linears: list[LinearBase]
    attentions: list[PagedAttention]
    batch: AttentionBatch | None = None
    cache: KVCache | None = None


_context: list[ForwardContext] = []  # the step running now (a stack: one entry outside tests)


@contextlib.contextmanager
def forward_context(ctx: ForwardContext, batch: AttentionBatch, cache: KVCache) -> Iterator[None]:
    """Within it, ``ryzanstein::attention`` reads ``batch`` and ``cache``."""
    ctx.batch, ctx.cache = batch, cache
    _context.append(ctx)
    try:
        yield
    finally:
        _context.pop()
        ctx.batch = ctx.cache = None


@torch.library.custom_op("ryzanstein::linear", mutates_args=())
def linear_op(x: torch.Tensor, index: int, out_features: int) -> torch.Tensor:
    """Linear layer ``index`` of the running model applied to ``x`` [T, in] -> [T, out_features]."""
    return _context[-1].linears[index].forward_eager(x)


@linear_op.register_fake
def _(x: torch.Tensor, index: int, out_features: int) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], out_features)


@torch.library.custom_op("ryzanstein::attention", mutates_args=())
def attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, index: int) -> torch.Tensor:
    """Paged attention of layer ``index`` [T, H * D] for ``q`` [T, H, D], new ``k``, ``v`` [T, Hkv, D];
    writes ``k``, ``v`` into the step's KV cache first (the cache is no argument: nothing reorders
    one layer's write past its own read)."""
    ctx = _context[-1]
    assert ctx.batch is not None and ctx.cache is not None
    return ctx.attentions[index].forward(q, k, v, ctx.batch, ctx.cache)


@attention_op.register_fake
def _(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, index: int) -> torch.Tensor:
    return q.new_empty(q.shape[0], q.shape[1] * q.shape[2])


def compile_decoder(fn: Callable[..., torch.Tensor], options: dict[str, Any] | None = None) -> Callable[..., torch.Tensor]:
    """``fn`` compiled by inductor for CPUs, its arguments' dim 0 (tokens) dynamic; ``options``:
    inductor's (``torch._inductor.list_options()``)."""
    compiled = torch.compile(fn, backend="inductor", dynamic=None, fullgraph=True, options=options)

    def call(x: torch.Tensor, *args: Any) -> torch.Tensor:
        if x.shape[0] > 1:
            torch._dynamo.maybe_mark_dynamic(x, 0)
            for a in args:
                torch._dynamo.maybe_mark_dynamic(a, 0)
        return compiled(x, *args)

    return call
