"""Small GGUF files written here with ``gguf.GGUFWriter``, laid out as llama.cpp's
``convert_hf_to_gguf.py`` writes them (q/k rows permuted for llama, ``1 + w`` norms for gemma3).

Weights come from a random transformers model; each 2-D tensor is stored in the quantization type
asked for. The ``gguf`` package cannot quantize the K-quants (Q4_K, Q6_K), so those tensors are
random blocks whose fp16 scales are set to small finite values: a valid file, whose reference is
what transformers dequantizes from it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tests.gpu_workers import tokenizer_fixtures

# K-quant block layouts (ggml-common.h): where each block's fp16 scale(s) sit
_K_SCALES = {"Q4_K": (0, 2), "Q6_K": (208,)}


def llama_model(*, vocab: int, hidden: int = 256, heads: int = 4, kv_heads: int = 2, layers: int = 2,
                tied: bool = False, bias: bool = False, seed: int = 0) -> torch.nn.Module:
    """A random transformers Llama whose dims fit 256-wide quantization blocks."""
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=256,
        rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=tied, attention_bias=bias, mlp_bias=bias,
        bos_token_id=None, eos_token_id=None, pad_token_id=None,
    )
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.uniform_(0.5, 1.5) if "norm" in name else p.normal_(0.0, 0.05)
    return model


def gemma3_model(*, vocab: int, seed: int = 0) -> torch.nn.Module:
    import transformers

    config = transformers.Gemma3TextConfig(
        vocab_size=vocab, hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=1, head_dim=64, max_position_embeddings=256, sliding_window=32,
        bos_token_id=None, eos_token_id=None, pad_token_id=None,
    )
    torch.manual_seed(seed)
    model = transformers.Gemma3ForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.uniform_(-0.5, 0.5) if "norm" in name else p.normal_(0.0, 0.05)
    return model


def _permute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's ``LlamaModel.permute``: rotary halves interleaved within each head."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _stored(array: np.ndarray, kind: str, rng: np.random.Generator) -> tuple[np.ndarray, Any]:
    import gguf

    qtype = gguf.GGMLQuantizationType[kind]
    if kind == "F32":
        return array.astype(np.float32), None
    if kind == "F16":
        return array.astype(np.float16), None
    if kind in _K_SCALES:
        block, size = gguf.GGML_QUANT_SIZES[qtype]
        raw = rng.integers(0, 256, size=(array.shape[0], array.shape[1] // block, size), dtype=np.uint8)
        for offset in _K_SCALES[kind]:
            raw[..., offset:offset + 2] = np.frombuffer(np.float16(1e-3).tobytes(), dtype=np.uint8)
        return raw.reshape(array.shape[0], -1), qtype
    return gguf.quants.quantize(array.astype(np.float32), qtype), qtype


def write_gguf(path: Path, model: torch.nn.Module, *, arch: str = "llama", quant: str | dict[str, str] = "F32",
               tokenizer: str = "byte_level", chat_template: str | None = None,
               extra_tensors: dict[str, np.ndarray] | None = None, seed: int = 0) -> Path:
    """``model`` written as a GGUF file of architecture ``arch``; 2-D tensors stored as ``quant`` (one
    type, or GGUF tensor name -> type with "*" for the rest), norms as F32, as llama.cpp does."""
    import gguf

    config = model.config
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    rope = config.rope_parameters
    writer.add_rope_freq_base(rope.get("rope_theta") or rope["full_attention"]["rope_theta"])  # gemma3: per layer type
    writer.add_vocab_size(config.vocab_size)
    if arch == "llama":
        writer.add_rope_dimension_count(config.hidden_size // config.num_attention_heads)
    else:
        writer.add_key_length(config.head_dim)
        writer.add_value_length(config.head_dim)
        writer.add_sliding_window(config.sliding_window)
    _write_tokenizer(writer, tokenizer, config.vocab_size)
    if chat_template is not None:
        writer.add_chat_template(chat_template)

    names = gguf.get_tensor_name_map(next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch),
                                     config.num_hidden_layers)
    rng = np.random.default_rng(seed)
    for hf_name, tensor in model.state_dict().items():
        if hf_name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        array = tensor.float().numpy()
        if arch == "llama" and name.endswith(("attn_q.weight", "attn_q.bias")):
            array = _permute(array, config.num_attention_heads)
        elif arch == "llama" and name.endswith(("attn_k.weight", "attn_k.bias")):
            array = _permute(array, config.num_key_value_heads)
        if arch == "gemma3" and name.endswith("norm.weight"):
            array = array + 1.0
        kind = "F32" if array.ndim == 1 else quant if isinstance(quant, str) else quant.get(name, quant["*"])
        data, raw = _stored(array, kind, rng)
        writer.add_tensor(name, data, raw_dtype=raw)
    for name, array in (extra_tensors or {}).items():
        writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _write_tokenizer(writer: Any, kind: str, vocab_size: int) -> None:
    """The fixture tokenizer's vocabulary as llama.cpp's ``tokenizer.ggml.*`` metadata."""
    import gguf

    source = (tokenizer_fixtures.byte_level_json() if kind == "byte_level"
              else tokenizer_fixtures.sentencepiece_json())
    model = json.loads(source)["model"]
    tokens = [t for t, _ in sorted(model["vocab"].items(), key=lambda item: item[1])]
    specials = {t["content"] for t in json.loads(source)["added_tokens"]}
    tokens += [f"<unused{i}>" for i in range(vocab_size - len(tokens))]
    types = [gguf.TokenType.CONTROL if t in specials else gguf.TokenType.NORMAL for t in tokens]
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    if kind == "byte_level":
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre("default")
        writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in model["merges"]])
        writer.add_bos_token_id(tokens.index("<|begin_of_text|>"))
        writer.add_eos_token_id(tokens.index("<|im_end|>"))
        writer.add_add_bos_token(False)
    else:
        writer.add_tokenizer_model("llama")
        writer.add_tokenizer_pre("default")
        writer.add_token_scores([-float(i) for i in range(len(tokens))])
        writer.add_bos_token_id(1)
        writer.add_eos_token_id(2)
        writer.add_unk_token_id(0)
        writer.add_add_bos_token(True)


def vocab_size(tokenizer: str = "byte_level") -> int:
    source = tokenizer_fixtures.byte_level_json() if tokenizer == "byte_level" else tokenizer_fixtures.sentencepiece_json()
    return len(json.loads(source)["model"]["vocab"])
