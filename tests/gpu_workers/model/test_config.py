"""load_config: what each architecture's config.json means here, and what is refused."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from broker.errors import ConfigError
from gpu_workers.model.config import RopeScaling, load_config, parse_config
from tests.gpu_workers.model.hf_models import BASE, CONFIGS


def _saved(tmp_path: Path, name: str) -> Path:
    import transformers

    family, overrides = CONFIGS[name]
    getattr(transformers, f"{family}Config")(**{**BASE, **overrides}).save_pretrained(tmp_path)
    return tmp_path


def _raw(**fields: Any) -> dict[str, Any]:
    raw = {"architectures": ["LlamaForCausalLM"], "vocab_size": 300, "hidden_size": 64, "intermediate_size": 96,
           "num_hidden_layers": 2, "num_attention_heads": 4}
    return {**raw, **fields}


def test_transformers_configs_read_as_meant(tmp_path: Path) -> None:
    c = load_config(_saved(tmp_path / "a", "llama-bias-headdim-linear"))
    assert (c.head_dim, c.num_key_value_heads, c.qkv_bias, c.o_bias, c.mlp_bias) == (24, 2, True, True, True)
    assert c.rope_scaling == RopeScaling(type="linear", factor=2.0)
    assert c.max_context == 256 and c.sliding_window is None

    c = load_config(_saved(tmp_path / "b", "llama-mqa-tied"))
    assert (c.num_key_value_heads, c.tie_word_embeddings, c.head_dim, c.qkv_bias) == (1, True, 16, False)

    c = load_config(_saved(tmp_path / "c", "qwen2"))
    assert (c.architecture, c.qkv_bias, c.o_bias, c.mlp_bias, c.sliding_window) == ("Qwen2ForCausalLM", True, False, False, None)

    c = load_config(_saved(tmp_path / "d", "mistral"))
    assert c.sliding_window == 7 and c.max_context == 256  # the window no longer caps the context
    assert [c.layer_window(i) for i in range(2)] == [7, 7]

    c = load_config(_saved(tmp_path / "e", "llama-llama3"))
    assert c.rope_theta == 500000.0
    assert c.rope_scaling == RopeScaling("llama3", 8.0, 1.0, 4.0, 32)

    c = load_config(_saved(tmp_path / "f", "llama-dynamic"))
    assert c.rope_scaling.type == "dynamic" and c.max_context == 96  # stretched by the factor


def test_sliding_windows_by_layer() -> None:
    """Which layers slide, and over how many tokens, as each family's transformers config says."""
    mistral = parse_config(_raw(architectures=["MistralForCausalLM"], max_position_embeddings=32768))
    assert mistral.sliding_window == 4096 and mistral.max_context == 32768  # transformers' default window
    assert mistral.layer_window(0) == mistral.layer_window(1) == 4096
    assert parse_config(_raw(architectures=["MistralForCausalLM"], sliding_window=None)).sliding_window is None
    for arch in ("Qwen2ForCausalLM", "Qwen3ForCausalLM"):
        qwen = {"architectures": [arch], "max_position_embeddings": 32768, "sliding_window": 1024}
        assert parse_config(_raw(**qwen)).sliding_window is None  # use_sliding_window defaults to false
        c = parse_config(_raw(**qwen, use_sliding_window=True, max_window_layers=1))
        assert (c.layer_window(0), c.layer_window(1), c.max_context) == (None, 1024, 32768)
        # every layer below max_window_layers: full attention everywhere
        assert parse_config(_raw(**qwen, use_sliding_window=True, max_window_layers=2)).sliding_window is None
    phi = parse_config(_raw(architectures=["Phi3ForCausalLM"], sliding_window=2047))
    assert phi.layer_window(1) == 2047 and phi.max_context == 4096
    gemma = parse_config(_raw(architectures=["Gemma3ForCausalLM"], num_hidden_layers=7, sliding_window=512))
    assert [gemma.layer_window(i) for i in range(7)] == [512] * 5 + [None, 512]  # every sixth layer global


def test_gemma3_numerics_and_rope_per_layer_type(tmp_path: Path) -> None:
    c = load_config(_saved(tmp_path, "gemma3"))
    assert (c.model_type, c.hidden_act, c.qk_norm, c.tie_word_embeddings) == ("gemma3_text", "gelu_pytorch_tanh", True, True)
    assert c.attention_scale == 24**-0.5 and c.final_logit_softcapping == 3.0
    assert (c.rope_theta, c.rope_scaling) == (10000.0, RopeScaling(type="linear", factor=2.0))
    assert (c.sliding_rope_theta, c.sliding_rope_scaling) == (100.0, RopeScaling())
    # the pre-transformers-5 form of the same fields (the published Gemma 3 270M config.json)
    legacy = parse_config(_raw(architectures=["Gemma3ForCausalLM"], rope_theta=1e6, rope_local_base_freq=1e4,
                               rope_scaling={"rope_type": "linear", "factor": 8.0}, query_pre_attn_scalar=256,
                               head_dim=256, final_logit_softcapping=None))
    assert (legacy.rope_theta, legacy.rope_scaling.factor, legacy.sliding_rope_theta) == (1e6, 8.0, 1e4)
    assert legacy.sliding_rope_scaling == RopeScaling() and legacy.final_logit_softcapping is None


def test_gemma3_multimodal_config_reads_its_sparse_text_config() -> None:
    """Gemma 3 4B's published config.json: the text model's fields under text_config, most left to
    Gemma3TextConfig's defaults; dtype and tied embeddings at the top."""
    c = parse_config({"architectures": ["Gemma3ForConditionalGeneration"], "torch_dtype": "bfloat16", "text_config": {
        "hidden_size": 2560, "intermediate_size": 10240, "model_type": "gemma3_text", "num_attention_heads": 8,
        "num_hidden_layers": 34, "num_key_value_heads": 4, "rope_scaling": {"factor": 8.0, "rope_type": "linear"},
        "sliding_window": 1024}, "vision_config": {"model_type": "siglip_vision_model"}})
    assert (c.vocab_size, c.head_dim, c.attention_scale, c.torch_dtype) == (262208, 256, 256**-0.5, "bfloat16")
    assert (c.rope_theta, c.rope_scaling, c.sliding_rope_theta) == (1e6, RopeScaling("linear", 8.0), 1e4)
    assert c.tie_word_embeddings and c.checkpoint_prefix == "language_model." and c.max_context == 131072
    assert [c.layer_window(i) for i in range(6)] == [1024] * 5 + [None]
    with pytest.raises(ConfigError, match="text_config must be an object"):
        parse_config({"architectures": ["Gemma3ForConditionalGeneration"]})


def test_qwen3_and_phi3(tmp_path: Path) -> None:
    q = load_config(_saved(tmp_path / "q", "qwen3-bias-sliding"))
    assert (q.qk_norm, q.qkv_bias, q.o_bias, q.mlp_bias, q.layer_window(1)) == (True, True, True, False, 6)
    p = load_config(_saved(tmp_path / "p", "phi3-sliding"))
    assert (p.model_type, p.qk_norm, p.qkv_bias, p.layer_window(0)) == ("phi3", False, False, 7)


def test_legacy_rope_scaling(tmp_path: Path) -> None:
    raw = _raw(rope_scaling={"type": "linear", "factor": 4}, rope_theta=1000.0, torch_dtype="bfloat16")
    (tmp_path / "config.json").write_text(json.dumps(raw))
    c = load_config(tmp_path)
    assert c.rope_scaling == RopeScaling(type="linear", factor=4.0) and c.rope_theta == 1000.0
    assert c.torch_dtype == "bfloat16"
    assert c.num_key_value_heads == 4 and c.head_dim == 16


@pytest.mark.parametrize("fields,named", [
    ({"architectures": ["GPT2LMHeadModel"]}, "'GPT2LMHeadModel'"),
    ({"architectures": ["LlamaForCausalLM", "MistralForCausalLM"]}, "exactly one"),
    ({"hidden_act": "gelu"}, "hidden_act 'gelu'"),
    ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0}}, "rope type 'yarn'"),
    ({"rope_scaling": {"type": "longrope"}}, "rope type 'longrope'"),
    ({"rope_scaling": {"rope_type": "linear"}}, "rope_parameters.factor is missing"),
    ({"partial_rotary_factor": 0.5}, "partial_rotary_factor 0.5"),
    ({"quantization_config": {"quant_method": "gptq"}}, "'gptq'"),
    ({"num_key_value_heads": 3}, "num_key_value_heads 3"),
    ({"hidden_size": None}, "hidden_size is missing"),
    ({"vocab_size": "big"}, "vocab_size must be a positive integer, got 'big'"),
    ({"attention_bias": "yes"}, "attention_bias must be true or false"),
    ({"dtype": "int8"}, "dtype 'int8'"),
    ({"architectures": ["PaliGemmaForConditionalGeneration"]}, "'PaliGemmaForConditionalGeneration'"),
    ({"architectures": ["Gemma3ForCausalLM"], "attn_logit_softcapping": 50.0}, "attn_logit_softcapping 50.0"),
    ({"architectures": ["Gemma3ForCausalLM"], "use_bidirectional_attention": True}, "use_bidirectional_attention"),
    ({"architectures": ["Gemma3ForCausalLM"], "hidden_activation": "silu"}, "hidden_activation 'silu'"),
    ({"architectures": ["Gemma3ForCausalLM"], "layer_types": ["full_attention"]}, "for each of the 2 layers"),
    ({"architectures": ["Phi3ForCausalLM"], "rope_scaling": {"rope_type": "longrope"}}, "rope type 'longrope'"),
    ({"architectures": ["Phi3ForCausalLM"], "partial_rotary_factor": 0.75}, "partial_rotary_factor 0.75"),
    ({"architectures": ["MistralForCausalLM"], "sliding_window": 0}, "sliding_window must be a positive"),
])
def test_refusals_name_the_offender(fields: dict[str, Any], named: str) -> None:
    with pytest.raises(ConfigError) as e:
        parse_config(_raw(**fields))
    assert named in str(e.value)


def test_missing_or_broken_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no config.json"):
        load_config(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="unreadable config.json"):
        load_config(tmp_path)


def test_tensor_parallel_head_checks() -> None:
    c = parse_config(_raw(num_attention_heads=8, hidden_size=64, num_key_value_heads=2))
    c.check_tp(2)
    c.check_tp(4)  # KV heads replicated on two ranks each
    assert c.kv_heads_per_rank(4) == 1 and c.kv_heads_per_rank(2) == 1 and c.kv_heads_per_rank(1) == 2
    with pytest.raises(ConfigError, match="does not divide 8 attention heads"):
        c.check_tp(3)
    c6 = parse_config(_raw(num_attention_heads=12, hidden_size=96, num_key_value_heads=4))
    with pytest.raises(ConfigError, match="6 and 4 KV heads"):
        c6.check_tp(6)
