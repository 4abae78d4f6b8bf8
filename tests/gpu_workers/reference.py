"""Reference models for engine tests: random checkpoints saved by transformers, and its greedy output.

A random model's greedy path can pass near-ties where float rounding alone could flip the argmax;
``hf_greedy`` measures the margin between the top two logits at every step so that a test asserts
its reference is clear before comparing tokens with it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM"),
    "mistral": ("MistralConfig", "MistralForCausalLM"),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM"),
    "phi3": ("Phi3Config", "Phi3ForCausalLM"),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM"),
}
# Smallest top-1 minus top-2 logit gap, relative to the logits' standard deviation, that the
# references must keep: fp32 rounding differences between two correct implementations are ~1e-6.
MIN_MARGIN = 1e-3


def save_hf_model(path: Path, *, family: str = "llama", seed: int = 0, **overrides: object) -> Path:
    """A small random checkpoint of ``family`` saved with safetensors; returns its directory."""
    import transformers

    config_cls, model_cls = (getattr(transformers, name) for name in FAMILIES[family])
    fields: dict[str, object] = {
        "vocab_size": 320, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 1024,
        "eos_token_id": None, "bos_token_id": None, "pad_token_id": None, "tie_word_embeddings": False,
    }
    fields.update(overrides)
    torch.manual_seed(seed)
    model = model_cls(config_cls(**fields)).eval()
    model.save_pretrained(path, safe_serialization=True)
    return path


@dataclass(frozen=True)
class Reference:
    tokens: list[list[int]]  # greedy continuation of each prompt
    min_margin: float  # smallest relative top-1/top-2 gap over all steps of all prompts


def hf_greedy(model_dir: Path, prompts: list[list[int]], max_new_tokens: int) -> Reference:
    """transformers' greedy ``generate`` of each prompt alone (no padding), with its margins."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tokens, margins = [], []
    with torch.inference_mode():
        for prompt in prompts:
            ids = torch.tensor([prompt])
            # an explicit mask: otherwise generate masks every prompt token that equals pad_token_id
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                 min_new_tokens=max_new_tokens,
                                 do_sample=False, output_scores=True, return_dict_in_generate=True,
                                 pad_token_id=0)
            tokens.append(out.sequences[0, len(prompt):].tolist())
            for scores in out.scores:
                top = scores[0].topk(2).values
                finite = scores[0][scores[0].isfinite()]  # a generation config may mask tokens with -inf
                margins.append(float((top[0] - top[1]) / finite.std()))
    return Reference(tokens, min(margins))
