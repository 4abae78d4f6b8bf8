"""A Llama decoder layer in two C calls around its attention (panel_matmul.c): the CPU's eager fast path.

Eagerly, a layer is ~14 Python-level calls (norms, the four matmuls, RoPE, SiLU, residual adds, the
modules around them); at decode batch sizes each costs more in dispatch than in arithmetic, ~5 ms of
a ~25 ms SmolLM2 step on the 2-CPU VM (measured with the matmuls replaced by no-ops). Here each layer
is ``decoder_attention_in`` (residual add, input norm, QKV matmul, RoPE), the layer's own attention
(``PagedAttention``: the KV cache write and read, any format), then ``decoder_mlp`` (o_proj, residual
add, post-attention norm, gate/up matmul, SiLU-and-multiply, down matmul). The C code does the same
operations in the same order with the same rounding as the one-operation-a-call path, so the hidden
states are the same bits (tests/gpu_workers/model/test_fused_decoder.py).

``prepare(model)`` says whether a model takes this path: a Llama-family layer (RMSNorm, SiLU, no
query/key norms) on one rank (no all-reduce between the halves), every linear packed in panels
(fp32 on a CPU, ``cpu_matmul``), the layer kernels loaded (``RYZ_LAYER_KERNELS=0`` turns both off).
Compiled models (``--compilation-config``) and autograd keep the module path.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from gpu_workers.model import layer_kernels, panel_matmul
from gpu_workers.model.layers import LinearBase, RMSNorm

if TYPE_CHECKING:
    from gpu_workers.model.attention import AttentionBatch
    from gpu_workers.model.kv_cache import KVCache
    from gpu_workers.model.llama import LlamaDecoderLayer, LlamaForCausalLM


def _panels(linear: LinearBase) -> bool:
    return (linear.tp.size == 1 and linear.quantized is None and linear.packed is not None
            and linear.packed.layout is torch.strided)


def _bias(linear: LinearBase) -> torch.Tensor | None:
    return None if linear.bias is None else linear.bias.data


def _packed(linear: LinearBase) -> torch.Tensor:
    assert linear.packed is not None  # prepare() checked
    return linear.packed


class FusedDecoder:
    """The decoder layers of one model on the fused path (``prepare`` checked that they can)."""

    def __init__(self, model: LlamaForCausalLM, layers: list[LlamaDecoderLayer], kernels: panel_matmul.PanelKernels,
                 one_op_kernels: layer_kernels.LayerKernels) -> None:
        self.model = model
        self.layers = layers
        self.kernels = kernels
        self.layer_kernels = one_op_kernels

    def __call__(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, local_cos: torch.Tensor,
                 local_sin: torch.Tensor, batch: AttentionBatch, cache: KVCache) -> torch.Tensor:
        """What ``LlamaForCausalLM.decoder`` returns (final hidden states [T, hidden], after the final
        norm) for input embeddings ``x`` [T, hidden] and RoPE ``cos``, ``sin`` [T or 1, 1, D / 2]."""
        t, hidden = x.shape
        x = x.contiguous()
        angles = {}
        for key, (c, s) in (("global", (cos, sin)), ("local", (local_cos, local_sin))):
            half = c.shape[-1]
            angles[key] = tuple(a.reshape(-1, half).expand(t, half).contiguous() for a in (c, s))
        stream, mlp_stream, out, normed = (torch.empty(t, hidden) for _ in range(4))
        residual: torch.Tensor | None = None  # the stream before this layer's add (None at layer 0)
        h = x
        for i, layer in enumerate(self.layers):
            c, s = angles["local" if i in self.model.sliding_layers else "global"]
            attn = layer.self_attn
            qkv = self._attention_in(layer, h, residual, c, s, stream, normed)  # [T, (H + 2 Hkv) D]
            d, heads, kv_heads = attn.head_dim, attn.num_heads, attn.num_kv_heads
            q = qkv[:, : heads * d].view(t, heads, d)
            k = qkv[:, heads * d : (heads + kv_heads) * d].view(t, kv_heads, d)
            v = qkv[:, (heads + kv_heads) * d :].view(t, kv_heads, d)
            context = attn.attn(q, k, v, batch, cache).contiguous()  # [T, H * D]
            self._mlp(layer, context, h if residual is None else stream, mlp_stream, out)
            h, residual = out, mlp_stream  # the layer's output is out + mlp_stream, added by the next
        assert residual is not None
        final = self.model.model.norm
        return self.layer_kernels.fused_add_rms_norm(h, residual, final.weight, final.eps, offset=final.offset)[0]

    def _attention_in(self, layer: LlamaDecoderLayer, h: torch.Tensor, residual: torch.Tensor | None,
                      cos: torch.Tensor, sin: torch.Tensor, stream: torch.Tensor, normed: torch.Tensor) -> torch.Tensor:
        """``decoder_attention_in``: writes ``h + residual`` to ``stream`` (unless ``residual`` is None);
        returns the rotated QKV projection [T, (H + 2 Hkv) D]."""
        attn, norm = layer.self_attn, layer.input_layernorm
        return self.kernels.decoder_attention_in(
            h, residual, norm.weight.data, norm.eps, norm.offset, _packed(attn.qkv_proj), attn.qkv_proj.packed_out,
            _bias(attn.qkv_proj), cos, sin, attn.num_heads + attn.num_kv_heads, attn.head_dim, stream, normed)

    def _mlp(self, layer: LlamaDecoderLayer, context: torch.Tensor, stream: torch.Tensor, mlp_stream: torch.Tensor,
             out: torch.Tensor) -> None:
        o, mlp, norm = layer.self_attn.o_proj, layer.mlp, layer.post_attention_layernorm
        gate_up, down = mlp.gate_up_proj, mlp.down_proj
        self.kernels.decoder_mlp(context, stream, _packed(o), _bias(o), norm.weight.data, norm.eps, norm.offset,
                                 _packed(gate_up), _bias(gate_up), gate_up.packed_out // 2, _packed(down),
                                 _bias(down), mlp_stream, out)


def prepare(model: LlamaForCausalLM) -> FusedDecoder | None:
    """The fused path for ``model`` (its weights packed), or None where some layer cannot take it."""
    from gpu_workers.model.llama import LlamaDecoderLayer

    kernels, one_op = panel_matmul.load(), layer_kernels.load()
    if kernels is None or one_op is None or model.dtype is not torch.float32:
        return None
    if not isinstance(model.model.norm, RMSNorm):
        return None
    layers: list[LlamaDecoderLayer] = []
    for layer in model.model.layers:
        if type(layer) is not LlamaDecoderLayer:
            return None
        attn, mlp = layer.self_attn, layer.mlp
        if attn.qk_norm or mlp.act is not F.silu:
            return None
        if not all(_panels(m) for m in (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj)):
            return None
        if not (isinstance(layer.input_layernorm, RMSNorm) and isinstance(layer.post_attention_layernorm, RMSNorm)):
            return None
        layers.append(layer)
    return FusedDecoder(model, layers, kernels, one_op)
