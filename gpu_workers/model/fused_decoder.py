"""A decoder layer in a few C calls around its attention (panel_matmul.c): the CPU's eager fast path.

Eagerly, a layer is ~14 Python-level calls (norms, the four matmuls, RoPE, SiLU, residual adds, the
modules around them); at decode batch sizes each costs more in dispatch than in arithmetic, ~5 ms of
a ~25 ms SmolLM2 step on the 2-CPU VM (measured with the matmuls replaced by no-ops). Here a Llama
layer is ``decoder_attention_in`` (residual add, input norm, QKV matmul, query/key norms where the
model has them (Qwen3), RoPE), the layer's own attention (``PagedAttention``: the KV cache write and
read, any format), then ``decoder_mlp`` (o_proj, residual add, post-attention norm, gate/up matmul,
SiLU-and-multiply, down matmul). A Gemma 3 layer, which norms its attention and MLP outputs before
each residual add, takes ``decoder_attention_in``, its attention, ``gemma_mlp_in``, torch's GeLU
(tanh form) and multiply, and ``gemma_mlp_out``. The C code does the same operations in the same
order with the same rounding as the one-operation-a-call path, so the hidden states are the same
bits (tests/gpu_workers/model/test_fused_decoder.py).

In a decode-only step whose cache has an ``attend_fn`` (``KVCache.attention_kernel``: an fp32 cache,
or the staged ``fp8_e4m3`` one, with their kernels built), a layer's attention is one C call too: the
K/V write and the decode attention the module path would run (fp8_kernels.c ``attend_fp32``,
kv_staged_kernels.c ``attend_staged``), on the step's tables, lengths and writes gathered once per
step (``attention_step``). Llama-family models without sliding windows then run the whole step in
one call, ``decoder_layers`` (panel_matmul.c), calling each layer's ``attend_fn`` by address. Gemma 3
and sliding-window layers (where the window holds every sequence's context) call it per layer;
prefill steps, several decode groups and the other KV formats keep ``PagedAttention``.

``prepare(model)`` says whether a model takes this path: Llama-family layers (RMSNorm, SiLU) or Gemma
3's, on one rank (no all-reduce between the calls), every linear either packed in panels (fp32 on a
CPU, ``cpu_matmul``) or kept quantized for the C kernels of ``quant_kernels`` (``--quantization
gguf``: the C code calls the same kernel the module path calls), the layer kernels loaded
(``RYZ_LAYER_KERNELS=0`` turns both off). Compiled models (``--compilation-config``) and autograd
keep the module path, and so do steps of ``max_rows`` tokens or more where a quantized linear would
dequantize its weight for the call (``dense_from``: a prefill).
"""

from __future__ import annotations

import ctypes
from typing import TYPE_CHECKING, TypeAlias, cast

import torch
import torch.nn.functional as F

from gpu_workers.model import fp8_kernels, layer_kernels, panel_matmul
from gpu_workers.model.layers import LinearBase, RMSNorm
from gpu_workers.model.quantization import GROUP_SIZE, Int4Weight, Int8Weight

if TYPE_CHECKING:
    from gpu_workers.model.attention import AttentionBatch, PagedAttention
    from gpu_workers.model.gemma3 import Gemma3DecoderLayer
    from gpu_workers.model.kv_cache import KVCache
    from gpu_workers.model.llama import LlamaDecoderLayer, LlamaForCausalLM

    DecoderLayer: TypeAlias = LlamaDecoderLayer | Gemma3DecoderLayer


def _linear(linear: LinearBase) -> tuple[panel_matmul.Linear, int] | None:
    """``linear`` as the C halves take it, and the rows from which its module path leaves the
    kernel (a quantized weight's ``dense_from``); None where it cannot take the fused path."""
    if linear.tp.size != 1:
        return None
    bias = None if linear.bias is None else linear.bias.data
    q = linear.quantized
    if q is None:
        if linear.packed is None or linear.packed.layout is not torch.strided:
            return None
        return panel_matmul.panels_linear(linear.packed, linear.packed.shape[1], linear.packed_out, bias), _NO_LIMIT
    if isinstance(q, Int4Weight) and q._kernels is not None:
        fn = q._kernels.address("int4_linear")
        return (panel_matmul.kernel_linear(fn, q.packed, q.scale, q.zero, GROUP_SIZE, q.in_features, q.out_features,
                                           bias), q.dense_from)
    if isinstance(q, Int8Weight):
        fn = q._kernels.address("int8_matmul")
        return (panel_matmul.kernel_linear(fn, q.codes, q.scale, q.zero, q.group, q.in_features, q.out_features,
                                           bias), q.dense_from)
    return None


_NO_LIMIT = 1 << 62


class FusedDecoder:
    """The decoder layers of one model on the fused path (``prepare`` checked that they can)."""

    def __init__(self, model: LlamaForCausalLM, layers: list[DecoderLayer], linears: list[tuple[panel_matmul.Linear, ...]],
                 qk_norms: list[tuple[torch.Tensor, torch.Tensor, float] | None], max_rows: int,
                 kernels: panel_matmul.PanelKernels, one_op_kernels: layer_kernels.LayerKernels) -> None:
        self.model = model
        self.layers = layers
        from gpu_workers.model.gemma3 import Gemma3DecoderLayer  # (gemma3 imports llama, which imports this)

        self.gemma = bool(layers) and isinstance(layers[0], Gemma3DecoderLayer)  # all of one class (prepare)
        self.linears = linears  # per layer: qkv, o, gate_up, down
        self.qk_norms = qk_norms  # per layer: q and k norm weights and eps, or None
        self.max_rows = max_rows  # steps of fewer tokens take this path (llama.py's decoder)
        self.kernels = kernels
        self.layer_kernels = one_op_kernels
        # the C attention of the cache last seen (built once per cache: its layers' pools do not move)
        self._cache: KVCache | None = None
        self._kernels: list[tuple[int, fp8_kernels.AttentionLayer]] | None = None
        self._whole: panel_matmul.DecoderLayers | None = None  # Llama-family layers, for decoder_layers

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
        final = self.model.model.norm
        attention = self._attention(batch, cache, t)
        if attention is not None and attention.whole is not None:
            c, s = angles["global"]
            last, last_residual = self.kernels.decoder_layers(attention.whole, x, c, s, attention.steps)
            return self.layer_kernels.fused_add_rms_norm(last, last_residual, final.weight, final.eps,
                                                         offset=final.offset)[0]
        stream, mlp_stream, out, normed = (torch.empty(t, hidden) for _ in range(4))
        residual: torch.Tensor | None = None  # the stream before this layer's add (None at layer 0)
        h = x
        for i, layer in enumerate(self.layers):
            c, s = angles["local" if i in self.model.sliding_layers else "global"]
            attn = layer.self_attn
            qkv_proj, o_proj, gate_up, down = self.linears[i]
            norm = layer.input_layernorm
            d, heads, kv_heads = attn.head_dim, attn.num_heads, attn.num_kv_heads
            qkv = self.kernels.decoder_attention_in(  # [T, (H + 2 Hkv) D]; stream <- h + residual
                h, residual, norm.weight.data, norm.eps, norm.offset, qkv_proj, c, s, heads, kv_heads, d, stream,
                normed, self.qk_norms[i])
            kernel = attention.layer(i, attn.attn) if attention is not None else None
            if kernel is not None:  # the cache's C function: the K/V write and decode attention in one call
                context = torch.empty(t, heads * d)
                panel_matmul.attend(*kernel, qkv, context)
            else:
                q = qkv[:, : heads * d].view(t, heads, d)
                k = qkv[:, heads * d : (heads + kv_heads) * d].view(t, kv_heads, d)
                v = qkv[:, (heads + kv_heads) * d :].view(t, kv_heads, d)
                context = attn.attn(q, k, v, batch, cache).contiguous()  # [T, H * D]
            if self.gemma:
                gemma = cast("Gemma3DecoderLayer", layer)
                post_attn, pre_ff = gemma.post_attention_layernorm, gemma.pre_feedforward_layernorm
                gu = self.kernels.gemma_mlp_in(context, h, o_proj, post_attn.weight.data, pre_ff.weight.data,
                                               post_attn.eps, gate_up, mlp_stream)
                gate, up = gu.chunk(2, dim=-1)  # the activation as LlamaMLP runs it (GeLU: torch's)
                self.kernels.gemma_mlp_out(gemma.mlp.act(gate).mul_(up), mlp_stream, down,
                                           gemma.post_feedforward_layernorm.weight.data, post_attn.eps, out)
                h = out  # the layer's output, whole
                out, stream = stream, out  # the next layer writes its output elsewhere than its input
                continue
            post = layer.post_attention_layernorm
            self.kernels.decoder_mlp(context, h if residual is None else stream, o_proj, post.weight.data, post.eps,
                                     post.offset, gate_up, down, mlp_stream, out)
            h, residual = out, mlp_stream  # the layer's output is out + mlp_stream, added by the next
        if residual is None:  # Gemma's: each layer adds its own residual
            return self.layer_kernels.rms_norm(h, final.weight, final.eps, offset=final.offset)
        return self.layer_kernels.fused_add_rms_norm(h, residual, final.weight, final.eps, offset=final.offset)[0]

    def _attention(self, batch: AttentionBatch, cache: KVCache, tokens: int) -> _StepAttention | None:
        """This step's C attention (its cache's ``attend_fn`` per layer), or None where the step or the cache
        has none (a prefill chunk in the step, a cache format without the function)."""
        if self._cache is not cache:
            self._cache, self._kernels, self._whole = cache, self._attention_kernels(cache), None
            if (self._kernels is not None and not self.gemma and not self.model.sliding_layers
                    and len({self._shape(i) for i in range(len(self.layers))}) == 1):  # decoder_layers' buffers
                self._whole = self._decoder_layers(self._kernels)
        if self._kernels is None:
            return None
        views = batch.groups or [batch]
        steps = [attention_step(view, tokens) for view in views]
        if any(step is None for step in steps):
            return None
        whole = self._whole if self._whole is not None and len(steps) == self._whole.groups else None
        return _StepAttention(self._kernels, cast("list[fp8_kernels.AttentionStep]", steps), views, whole)

    def _shape(self, i: int) -> tuple[int, ...]:
        """Layer ``i``'s sizes: hidden, heads, KV heads, head size, and its linears' (in, out)."""
        attn = self.layers[i].self_attn
        return (self.layers[i].input_layernorm.weight.shape[0], attn.num_heads, attn.num_kv_heads, attn.head_dim,
                *(size for linear in self.linears[i] for size in (linear.k, linear.n)))

    def _attention_kernels(self, cache: KVCache) -> list[tuple[int, fp8_kernels.AttentionLayer]] | None:
        kernels = []
        for layer in self.layers:
            attn = layer.self_attn.attn
            kernel = cache.attention_kernel(attn.cache_layer, heads=attn.num_heads, scale=attn.scale)
            if kernel is None:
                return None
            kernels.append(kernel)
        return kernels

    def _decoder_layers(self, kernels: list[tuple[int, fp8_kernels.AttentionLayer]]) -> panel_matmul.DecoderLayers:
        """The Llama-family layers as ``decoder_layers`` takes them (all of one shape: ``prepare``)."""
        structs: list[panel_matmul.DecoderLayer] = []
        keep: list[object] = []
        for i, layer in enumerate(self.layers):
            attn, post = layer.self_attn, layer.post_attention_layernorm
            norm = layer.input_layernorm
            q_norm, k_norm, qk_eps = self.qk_norms[i] or (None, None, 0.0)
            address, attention = kernels[i]
            linears = [ctypes.pointer(lin) for lin in self.linears[i]]
            structs.append(panel_matmul.DecoderLayer(
                norm.weight.data.data_ptr(), post.weight.data.data_ptr(), panel_matmul._ptr(q_norm),
                panel_matmul._ptr(k_norm), norm.eps, post.eps, qk_eps, int(norm.offset), attn.num_heads,
                attn.num_kv_heads, attn.head_dim, attn.attn.kv_group, *linears, address, ctypes.addressof(attention)))
            keep += [norm.weight.data, post.weight.data, q_norm, k_norm, attention, *linears, *self.linears[i]]
        first = self.layers[0]
        return panel_matmul.DecoderLayers(
            structs, keep, hidden=first.input_layernorm.weight.shape[0], heads=first.self_attn.num_heads,
            kv_heads=first.self_attn.num_kv_heads, head_dim=first.self_attn.head_dim,
            intermediate=self.linears[0][2].n // 2, groups=1 + max(layer.self_attn.attn.kv_group for layer in self.layers))


class _StepAttention:
    """One step's C attention: each layer's ``attend_fn`` and the step of its KV cache group."""

    def __init__(self, kernels: list[tuple[int, fp8_kernels.AttentionLayer]], steps: list[fp8_kernels.AttentionStep],
                 views: list[AttentionBatch], whole: panel_matmul.DecoderLayers | None) -> None:
        self.kernels, self.steps, self.views, self.whole = kernels, steps, views, whole

    def layer(self, i: int, attn: PagedAttention) -> tuple[int, fp8_kernels.AttentionLayer, fp8_kernels.AttentionStep] | None:
        """Layer ``i``'s function, cache operand and step; None for a sliding-window layer whose window
        does not hold every sequence's context (its own view of the step: the module path reads it)."""
        view = self.views[attn.kv_group]
        if attn.sliding_window is not None and view.windowed[attn.sliding_window] is not view:
            return None
        address, layer = self.kernels[i]
        return address, layer, self.steps[attn.kv_group]


def attention_step(batch: AttentionBatch, tokens: int) -> fp8_kernels.AttentionStep | None:
    """``batch`` (one KV cache group's view of a step of ``tokens`` tokens) as an ``attend_fn`` reads it,
    or None where it is not a decode-only step read by the fused kernels (a prefill chunk, several decode
    groups, a gathered read)."""
    from gpu_workers.model.decode_backends import FusedMetadata, StagedMetadata

    if batch.prefills or batch.num_decode != tokens or len(batch.decode_groups) != 1:
        return None
    meta = batch.decode_groups[0]
    if not isinstance(meta, (FusedMetadata, StagedMetadata)) or meta.lens is None:
        return None
    tables, lens, slots = (t.to(torch.int64).contiguous() for t in (meta.block_tables, meta.lens, batch.slot_mapping))
    if (tables.device.type != "cpu" or tables.dim() != 2 or tables.shape[0] != tokens or tuple(lens.shape) != (tokens,)
            or tuple(slots.shape) != (tokens,)):
        return None
    keep = [tables, lens, slots]
    step = fp8_kernels.AttentionStep(tables.data_ptr(), lens.data_ptr(), slots.data_ptr(), tokens, tables.shape[1])
    plan = batch.staged
    if plan is not None:
        if plan.late_rows.numel():
            return None
        index = [t.to(torch.int64).contiguous() for t in (plan.complete_blocks, plan.complete_src, plan.staged_slots,
                                                           plan.dense_rows, plan.dense_slots)]
        block_size = batch.decode_backend.cache.block_size  # the C code reads these many entries of each
        if index[1].numel() != index[0].numel() * block_size or index[4].numel() != index[3].numel():
            return None
        step.complete, step.complete_src, step.staged_slots, step.dense_rows, step.dense_slots = (
            t.data_ptr() for t in index)
        step.nc, step.ns, step.nd = index[0].numel(), index[2].numel(), index[3].numel()
        keep += index
    step._tensors = tuple(keep)
    return step


def prepare(model: LlamaForCausalLM) -> FusedDecoder | None:
    """The fused path for ``model`` (its weights packed), or None where some layer cannot take it."""
    from gpu_workers.model.gemma3 import Gemma3DecoderLayer
    from gpu_workers.model.llama import LlamaDecoderLayer

    kernels, one_op = panel_matmul.load(), layer_kernels.load()
    if kernels is None or one_op is None or model.dtype is not torch.float32:
        return None
    if not isinstance(model.model.norm, RMSNorm):
        return None
    layers: list[DecoderLayer] = []
    linears: list[tuple[panel_matmul.Linear, ...]] = []
    qk_norms: list[tuple[torch.Tensor, torch.Tensor, float] | None] = []
    max_rows = _NO_LIMIT
    for module in model.model.layers:
        if type(module) not in (LlamaDecoderLayer, Gemma3DecoderLayer) or type(module) is not type(model.model.layers[0]):
            return None
        layer = cast("DecoderLayer", module)
        attn, mlp = layer.self_attn, layer.mlp
        norms = [layer.input_layernorm, layer.post_attention_layernorm]
        if isinstance(layer, Gemma3DecoderLayer):
            norms += [layer.pre_feedforward_layernorm, layer.post_feedforward_layernorm]
            if len({n.eps for n in norms[1:]}) != 1:  # the C calls after attention take one eps
                return None
        elif mlp.act is not F.silu:  # Gemma's activation stays torch's; Llama's C half computes SiLU
            return None
        if not all(isinstance(n, RMSNorm) and n.offset == norms[0].offset for n in norms):
            return None
        if attn.qk_norm:
            if attn.q_norm.offset != layer.input_layernorm.offset or attn.q_norm.eps != attn.k_norm.eps:
                return None
            qk_norms.append((attn.q_norm.weight.data, attn.k_norm.weight.data, attn.q_norm.eps))
        else:
            qk_norms.append(None)
        found = [_linear(m) for m in (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj)]
        if any(f is None for f in found):
            return None
        linears.append(tuple(f[0] for f in found if f is not None))
        max_rows = min([max_rows] + [f[1] for f in found if f is not None])
        layers.append(layer)
    return FusedDecoder(model, layers, linears, qk_norms, max_rows, kernels, one_op)
