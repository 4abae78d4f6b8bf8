"""Which decoder class computes each supported architecture (``ModelConfig.model_type``)."""

from __future__ import annotations

from gpu_workers.model.config import ModelConfig
from gpu_workers.model.gemma3 import Gemma3ForCausalLM
from gpu_workers.model.llama import LlamaForCausalLM

# Llama, Mistral, Qwen2, Qwen3 and Phi-3 share LlamaForCausalLM.
MODEL_CLASSES: dict[str, type[LlamaForCausalLM]] = {"gemma3_text": Gemma3ForCausalLM}


def model_class(config: ModelConfig) -> type[LlamaForCausalLM]:
    """The ``nn.Module`` class that computes ``config``'s architecture."""
    return MODEL_CLASSES.get(config.model_type, LlamaForCausalLM)
