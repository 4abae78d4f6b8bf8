"""Tiny random transformers models saved as checkpoints, and their reference logits."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import torch

VOCAB = 300  # above 256, like every real vocabulary

BASE: dict[str, Any] = {
    "vocab_size": VOCAB, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4,
    "max_position_embeddings": 256, "rms_norm_eps": 1e-5, "attn_implementation": "eager",
}

# name -> (transformers class name, config overrides); together they cover GQA, MQA, tied
# embeddings, Qwen2's q/k/v bias, Llama's attention/MLP bias, head_dim != hidden / heads, the
# supported RoPE scalings, sliding windows (every layer, or some), and the Qwen3, Phi-3 and Gemma 3
# families.
CONFIGS: dict[str, tuple[str, dict[str, Any]]] = {
    "llama-gqa": ("Llama", {"num_key_value_heads": 2}),
    "llama-mqa-tied": ("Llama", {"num_key_value_heads": 1, "tie_word_embeddings": True}),
    "llama-bias-headdim-linear": ("Llama", {
        "num_key_value_heads": 2, "attention_bias": True, "mlp_bias": True, "head_dim": 24,
        "rope_scaling": {"rope_type": "linear", "factor": 2.0},
    }),
    "llama-dynamic": ("Llama", {
        "num_key_value_heads": 4, "max_position_embeddings": 48, "rope_scaling": {"rope_type": "dynamic", "factor": 2.0},
    }),
    "llama-llama3": ("Llama", {"num_key_value_heads": 2, "rope_theta": 500000.0, "rope_scaling": {
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 32,
    }}),
    "mistral": ("Mistral", {"num_key_value_heads": 2, "sliding_window": 7}),
    "qwen2": ("Qwen2", {"num_key_value_heads": 2}),
    # q/k norms and biases; the second layer slides over 6 tokens
    "qwen3-bias-sliding": ("Qwen3", {"num_key_value_heads": 2, "attention_bias": True, "use_sliding_window": True,
                                     "sliding_window": 6, "max_window_layers": 1}),
    # fused qkv_proj and gate_up_proj; every layer slides over 7 tokens
    "phi3-sliding": ("Phi3", {"num_key_value_heads": 2, "sliding_window": 7, "bos_token_id": None,
                              "eos_token_id": None, "pad_token_id": None}),
    # a sliding layer (window 6, its own RoPE base) then a global one (linear RoPE scaling); MQA, tied
    # embeddings, query_pre_attn_scalar != head_dim, soft-capped logits
    "gemma3": ("Gemma3Text", {
        "num_key_value_heads": 1, "head_dim": 16, "query_pre_attn_scalar": 24, "final_logit_softcapping": 3.0,
        "sliding_window": 6, "layer_types": ["sliding_attention", "full_attention"], "rope_parameters": {
            "sliding_attention": {"rope_type": "default", "rope_theta": 100.0},
            "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0},
        },
    }),
}


def build(name: str, *, seed: int = 0, std: float = 0.1) -> torch.nn.Module:
    """A transformers model of ``CONFIGS[name]`` with every parameter random (biases and norm
    weights too, which transformers would initialize to constants)."""
    import transformers

    family, overrides = CONFIGS[name]
    config = getattr(transformers, f"{family}Config")(**{**BASE, **overrides})
    torch.manual_seed(seed)
    model = getattr(transformers, f"{family.removesuffix('Text')}ForCausalLM")(config).eval()
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if "norm" in pname:
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0.0, std)
    return model


def save(model: torch.nn.Module, path: Path, **kwargs: Any) -> Path:
    model.save_pretrained(path, **kwargs)
    return path


def reference_logits(model: torch.nn.Module, tokens: list[int]) -> torch.Tensor:
    """fp32 logits [len(tokens), vocab] of one sequence, computed alone and whole."""
    with torch.no_grad():
        return model(torch.tensor([tokens])).logits[0].float()


def random_tokens(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(VOCAB) for _ in range(n)]


def assert_close(ours: torch.Tensor, ref: torch.Tensor, *, rel: float, what: str) -> float:
    """Max abs difference, asserted within ``rel`` of the logits' scale."""
    diff = (ours - ref).abs().max().item()
    scale = max(1.0, ref.abs().max().item())
    assert diff <= rel * scale, f"{what}: max abs logit diff {diff:.3g} > {rel} x scale {scale:.3g}"
    return diff
