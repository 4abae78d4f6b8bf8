"""The Gemma 3 text decoder over a paged KV cache (transformers' ``Gemma3ForCausalLM``).

Gemma 3 is the Llama decoder with these differences, each a line or a class here:

- input embeddings are multiplied by ``sqrt(hidden_size)`` (rounded to the weight dtype first, as
  transformers' ``Gemma3TextScaledWordEmbedding`` does); the LM head is tied to the unscaled ones;
- every RMSNorm scales by ``1 + weight`` in fp32 (``GemmaRMSNorm``), and each block normalizes its
  attention and MLP outputs too (``post_attention_layernorm``, ``post_feedforward_layernorm``), the
  MLP's input by ``pre_feedforward_layernorm``;
- the MLP gate is GeLU with the tanh approximation; queries and keys are RMS-normalized per head;
- attention scores are scaled by ``query_pre_attn_scalar ** -0.5``;
- sliding-window layers (five of every six by default) attend to their window and rotate with
  their own RoPE base (``rope_local_base_freq``), the global layers with ``rope_theta`` and its scaling;
- logits are soft-capped, ``cap * tanh(logits / cap)``, when ``final_logit_softcapping`` is set.

Parameter names are transformers'; checkpoints load through ``LlamaForCausalLM.checkpoint_map``.
A ``Gemma3ForConditionalGeneration`` checkpoint (4B and up) serves its text model: its tensors under
``language_model.``, the vision tower unread, and no logit softcapping (transformers' multimodal
class does not apply it either).
"""

from __future__ import annotations

import torch
from torch import nn

from gpu_workers.model.attention import AttentionBatch
from gpu_workers.model.config import ModelConfig
from gpu_workers.model.kv_cache import KVCache
from gpu_workers.model.layers import GemmaRMSNorm, TPContext
from gpu_workers.model.llama import LlamaAttention, LlamaForCausalLM, LlamaMLP


class Gemma3Attention(LlamaAttention):
    norm_class = GemmaRMSNorm


class Gemma3DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer: int, tp: TPContext, dtype: torch.dtype) -> None:
        super().__init__()
        size, eps = config.hidden_size, config.rms_norm_eps
        self.input_layernorm = GemmaRMSNorm(size, eps=eps, dtype=dtype)
        self.self_attn = Gemma3Attention(config, layer, tp, dtype)
        self.post_attention_layernorm = GemmaRMSNorm(size, eps=eps, dtype=dtype)
        self.pre_feedforward_layernorm = GemmaRMSNorm(size, eps=eps, dtype=dtype)
        self.mlp = LlamaMLP(config, tp, dtype)
        self.post_feedforward_layernorm = GemmaRMSNorm(size, eps=eps, dtype=dtype)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, batch: AttentionBatch | None,
        cache: KVCache | None,
    ) -> torch.Tensor:
        normed, x = self.pre_feedforward_layernorm.add_forward(
            self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), cos, sin, batch, cache)), x)
        return x + self.post_feedforward_layernorm(self.mlp(normed))


class Gemma3ForCausalLM(LlamaForCausalLM):
    layer_class = Gemma3DecoderLayer
    norm_class = GemmaRMSNorm

    def __init__(self, config: ModelConfig, tp: TPContext | None = None, dtype: torch.dtype = torch.float32) -> None:
        super().__init__(config, tp, dtype)
        self.embed_scale = torch.tensor(config.hidden_size**0.5).to(dtype).item()

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_tokens(input_ids) * self.embed_scale

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = super().compute_logits(hidden)
        cap = self.config.final_logit_softcapping
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        return logits
