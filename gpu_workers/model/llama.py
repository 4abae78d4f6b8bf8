"""The Llama-family decoder (Llama, Mistral, Qwen2, Qwen3, Phi-3) over a paged KV cache.

Parameter names follow transformers' so that checkpoint names map onto them through
``STACKED_PARAMS`` alone: q/k/v projections load into shards of ``qkv_proj``, gate/up into shards
of ``gate_up_proj``; every other tensor has the same name here and in the checkpoint. Phi-3
checkpoints hold ``qkv_proj`` and ``gate_up_proj`` already fused: each loads whole, and the layers'
``weight_loader`` splits it into its parts (and each part into this rank's shard).

Qwen3 normalizes each query and key head (``q_norm``, ``k_norm``) before RoPE. Layers with a
sliding window (``ModelConfig.layer_window``) attend only to it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from gpu_workers.model import fused_decoder, greedy_head, layer_kernels
from gpu_workers.model.attention import AttentionBatch, PagedAttention
from gpu_workers.model.compilation import ForwardContext, compile_decoder, forward_context
from gpu_workers.model.config import ModelConfig
from gpu_workers.model.kv_cache import KVCache
from gpu_workers.model.layers import (
    LinearBase,
    MergedColumnParallelLinear,
    PackedWeight,
    ParallelLMHead,
    QKVParallelLinear,
    RMSNorm,
    RowParallelLinear,
    TPContext,
    VocabParallelEmbedding,
)
from gpu_workers.model.quantization import Int8Weight
from gpu_workers.model.rope import RotaryEmbedding, apply_rotary

if TYPE_CHECKING:
    from gpu_workers.kv_cache_groups import KVCacheGroups
    from gpu_workers.model.fused_decoder import FusedDecoder
    from gpu_workers.model.greedy_head import GreedyHead

# (checkpoint name part, our parameter name part, shard id)
STACKED_PARAMS: tuple[tuple[str, str, Any], ...] = (
    (".q_proj.", ".qkv_proj.", "q"),
    (".k_proj.", ".qkv_proj.", "k"),
    (".v_proj.", ".qkv_proj.", "v"),
    (".gate_proj.", ".gate_up_proj.", 0),
    (".up_proj.", ".gate_up_proj.", 1),
)
# Checkpoints whose tensors are already fused like ours (loaded whole, shard id None).
FUSED_CHECKPOINTS = ("phi3",)
# The MLP's gate activation by transformers' ACT2FN name.
ACTIVATIONS = {"silu": F.silu, "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh")}


class LlamaAttention(nn.Module):
    norm_class: type[RMSNorm] = RMSNorm  # of the q/k norms

    def __init__(self, config: ModelConfig, layer: int, tp: TPContext, dtype: torch.dtype) -> None:
        super().__init__()
        d = config.head_dim
        self.qkv_proj = QKVParallelLinear(
            config.hidden_size, d, config.num_attention_heads, config.num_key_value_heads,
            bias=config.qkv_bias, tp=tp, dtype=dtype,
        )
        self.num_heads = self.qkv_proj.num_heads  # on this rank
        self.num_kv_heads = self.qkv_proj.num_kv_heads
        self.head_dim = d
        self.o_proj = RowParallelLinear(
            config.num_attention_heads * d, config.hidden_size, bias=config.o_bias, tp=tp, dtype=dtype
        )
        if config.qk_norm:  # over each head's D features: replicated on every rank
            self.q_norm = self.norm_class(d, eps=config.rms_norm_eps, dtype=dtype)
            self.k_norm = self.norm_class(d, eps=config.rms_norm_eps, dtype=dtype)
        self.qk_norm = config.qk_norm
        self.attn = PagedAttention(layer, num_heads=self.num_heads, num_kv_heads=self.num_kv_heads, head_dim=d,
                                   scale=config.attention_scale, sliding_window=config.layer_window(layer))

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, batch: AttentionBatch | None,
        cache: KVCache | None,
    ) -> torch.Tensor:
        t, h, hkv, d = x.shape[0], self.num_heads, self.num_kv_heads, self.head_dim
        qkv = self.qkv_proj(x)  # [T, (H + 2 Hkv) * D]
        qk = qkv[:, : (h + hkv) * d].view(t, h + hkv, d)
        if self.qk_norm:
            qk = torch.cat((self.q_norm(qk[:, :h]), self.k_norm(qk[:, h:])), dim=1)
        qk = apply_rotary(qk, cos, sin)  # q and k rotate together
        q, k = qk.split([h, hkv], dim=1)  # [T, H, D], [T, Hkv, D]
        v = qkv[:, (h + hkv) * d :].view(t, hkv, d)
        return self.o_proj(self.attn(q, k, v, batch, cache))


class LlamaMLP(nn.Module):
    def __init__(self, config: ModelConfig, tp: TPContext, dtype: torch.dtype) -> None:
        super().__init__()
        size = config.intermediate_size
        self.gate_up_proj = MergedColumnParallelLinear(
            config.hidden_size, [size, size], bias=config.mlp_bias, tp=tp, dtype=dtype
        )
        self.down_proj = RowParallelLinear(size, config.hidden_size, bias=config.mlp_bias, tp=tp, dtype=dtype)
        self.act = ACTIVATIONS[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up_proj(x)  # [T, 2 I / tp]: gate, then up
        if self.act is F.silu and (kernels := layer_kernels.enabled(gate_up)) is not None:
            return self.down_proj(kernels.silu_and_mul(gate_up))
        gate, up = gate_up.chunk(2, dim=-1)  # [T, I / tp] each
        return self.down_proj(self.act(gate).mul_(up))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer: int, tp: TPContext, dtype: torch.dtype) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps, dtype=dtype)
        self.self_attn = LlamaAttention(config, layer, tp, dtype)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps, dtype=dtype)
        self.mlp = LlamaMLP(config, tp, dtype)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, batch: AttentionBatch | None,
        cache: KVCache | None,
    ) -> torch.Tensor:
        normed, x = self.post_attention_layernorm.add_forward(
            self.self_attn(self.input_layernorm(x), cos, sin, batch, cache), x)
        return x + self.mlp(normed)


class LlamaModel(nn.Module):
    def __init__(self, config: ModelConfig, tp: TPContext, dtype: torch.dtype, *,
                 layer_class: type[nn.Module] = LlamaDecoderLayer, norm_class: type[RMSNorm] = RMSNorm) -> None:
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size, tp=tp, dtype=dtype)
        self.layers = nn.ModuleList(layer_class(config, i, tp, dtype) for i in range(config.num_hidden_layers))
        self.norm = norm_class(config.hidden_size, eps=config.rms_norm_eps, dtype=dtype)


class LlamaForCausalLM(nn.Module):
    layer_class: type[nn.Module] = LlamaDecoderLayer
    norm_class: type[RMSNorm] = RMSNorm

    def __init__(self, config: ModelConfig, tp: TPContext | None = None, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        tp = tp or TPContext()
        config.check_tp(tp.size)
        self.config = config
        self.dtype = dtype
        self.model = LlamaModel(config, tp, dtype, layer_class=self.layer_class, norm_class=self.norm_class)
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size, tp=tp, dtype=dtype)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.rotary = RotaryEmbedding(config)
        # sliding-window layers with a RoPE of their own (Gemma 3's local base)
        self.sliding_rotary = None
        if config.sliding_rope_theta is not None:
            self.sliding_rotary = RotaryEmbedding(config, theta=config.sliding_rope_theta,
                                                  scaling=config.sliding_rope_scaling)
        self.sliding_layers = {i for i in range(config.num_hidden_layers) if config.layer_window(i) is not None}
        self._compiled: Callable[..., torch.Tensor] | None = None
        self._context: ForwardContext | None = None
        self._fused: FusedDecoder | None = None  # the eager CPU fast path, once the weights are packed
        self._greedy: GreedyHead | None = None  # the head's bf16 screen for greedy steps, once packed

    def place_kv_cache(self, groups: KVCacheGroups) -> None:
        """Each layer's attention reads and writes its KV cache group's blocks, at its index in the group."""
        for module in self.modules():
            if isinstance(module, PagedAttention):
                module.place(*groups.locate(module.layer))

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Input embeddings [T, hidden] of ``input_ids`` [T]."""
        return self.model.embed_tokens(input_ids)

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, batch: AttentionBatch, kv_cache: KVCache
    ) -> torch.Tensor:
        """Final hidden states [T, hidden] of tokens ``input_ids`` [T] at ``positions`` [T]."""
        cos, sin = self.rotary(positions, self.dtype, batch.rope_seq_lens)  # [T, 1, D / 2] each
        local_cos, local_sin = (cos, sin) if self.sliding_rotary is None else self.sliding_rotary(positions, self.dtype)
        x = self.embed(input_ids)  # [T, hidden]
        if self._compiled is None:
            return self.decoder(x, cos, sin, local_cos, local_sin, batch, kv_cache)
        assert self._context is not None
        with forward_context(self._context, batch, kv_cache):
            return self._compiled(x, cos, sin, local_cos, local_sin)

    def decoder(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, local_cos: torch.Tensor, local_sin: torch.Tensor,
        batch: AttentionBatch | None = None, kv_cache: KVCache | None = None,
    ) -> torch.Tensor:
        """The decoder layers and final norm: hidden states [T, hidden] of input embeddings ``x``
        [T, hidden], rotated by ``cos``, ``sin`` (sliding-window layers: ``local_cos``, ``local_sin``),
        each [T, 1, D / 2]. ``batch`` and ``kv_cache`` None: compiled, attention reads the forward context."""
        if (self._fused is not None and batch is not None and kv_cache is not None and not x.requires_grad
                and not torch.compiler.is_compiling() and 2 * cos.shape[-1] == self.config.head_dim
                and x.shape[0] < self._fused.max_rows):
            return self._fused(x, cos, sin, local_cos, local_sin, batch, kv_cache)
        for i, layer in enumerate(self.model.layers):
            local = i in self.sliding_layers
            x = layer(x, local_cos if local else cos, local_sin if local else sin, batch, kv_cache)
        return self.model.norm(x)

    def compile(self, options: dict[str, Any] | None = None) -> None:
        """From now on ``forward`` runs the decoder layers as one inductor graph
        (gpu_workers.model.compilation), compiled at the first step of each shape kind."""
        linears = [m for m in self.modules() if isinstance(m, LinearBase)]
        attentions = [m for m in self.modules() if isinstance(m, PagedAttention)]
        for i, linear in enumerate(linears):
            linear.op_index = i
        for i, attention in enumerate(attentions):
            attention.op_index = i
        self._context = ForwardContext(linears, attentions)
        self._compiled = compile_decoder(self.decoder, options)

    def pack_weights(self) -> None:
        """Once the weights are loaded: large fp32 CPU linears switch to a packed layout
        (``cpu_matmul.PackedWeight``); a tied LM head keeps the dense weight the embedding reads."""
        for module in self.modules():
            if isinstance(module, PackedWeight) and module is not self.lm_head:
                module.pack()
        tied = self.lm_head.weight is self.model.embed_tokens.weight
        if tied and self.model.embed_tokens.quantized is not None:  # kept 8-bit: the head reads the same blocks
            self.lm_head.quantized = self.model.embed_tokens.quantized
        dense = self.lm_head.weight.data  # (an untied head's is freed by pack: the screen is made from it first)
        self.lm_head.pack(keep_dense=tied)
        self._greedy = (greedy_head.build(dense, self.lm_head.packed)
                        if self.lm_head.quantized is None and self.lm_head.tp.size == 1 else None)
        self._fused = fused_decoder.prepare(self)

    def _quantized_embeddings(self) -> list[Int8Weight]:
        """The embedding's and the LM head's quantized weights, a tied one once."""
        found = {id(m.quantized): m.quantized for m in self.modules()
                 if isinstance(m, VocabParallelEmbedding) and m.quantized is not None}
        return list(found.values())

    def packed_bytes(self) -> int:
        """Bytes of packed and quantized weights (not counted among the parameters)."""
        return (sum(m.packed_bytes() for m in self.modules() if isinstance(m, PackedWeight))
                + sum(q.nbytes() for q in self._quantized_embeddings())
                + (self._greedy.nbytes() if self._greedy is not None else 0))

    def num_weights(self) -> int:
        """Weights this rank holds, dense, packed or 4-bit, each counted once."""
        packed = sum(m.packed_weights() for m in self.modules()
                     if isinstance(m, PackedWeight) and m.weight.numel() == 0)
        quantized = sum(m.quantized.out_features * m.quantized.in_features for m in self.modules()
                        if isinstance(m, LinearBase) and m.quantized is not None)
        quantized += sum(q.out_features * q.in_features for q in self._quantized_embeddings())
        return sum(p.numel() for p in self.parameters()) + packed + quantized

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """fp32 logits [N, vocab] for final hidden states [N, hidden]. (``greedy_tokens`` gives their
        argmax without computing them all: a model that changes them here must say so there.)"""
        return self.lm_head(hidden).float()

    def greedy_tokens(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """The argmax of ``compute_logits(hidden)`` per row, token ids [N] (int64), read through a bf16
        screen of the head (gpu_workers.model.greedy_head); None where there is none or it cannot tell."""
        if self._greedy is None or self.config.final_logit_softcapping is not None:
            return None
        return self._greedy.tokens(hidden)

    def checkpoint_map(self) -> dict[str, tuple[str, Any]]:
        """Every checkpoint tensor name this model needs -> (parameter name, shard id or None)."""
        out: dict[str, tuple[str, Any]] = {}
        stacked = () if self.config.model_type in FUSED_CHECKPOINTS else STACKED_PARAMS
        for name, _ in self.named_parameters():  # a tied lm_head is listed once, as the embedding
            for ckpt_part, ours, shard in stacked:
                if ours in name:
                    out[name.replace(ours, ckpt_part)] = (name, shard)
            if not any(ours in name for _, ours, _ in stacked):
                out[name] = (name, None)
        prefix = self.config.checkpoint_prefix
        return {prefix + ckpt: target for ckpt, target in out.items()} if prefix else out

    def ignored_checkpoint_tensors(self, name: str) -> bool:
        """Whether the checkpoint tensor ``name`` is not this model's to read (a multimodal
        checkpoint's vision tower and projector, beside its text model)."""
        prefix = self.config.checkpoint_prefix
        return bool(prefix) and not name.startswith(prefix)
