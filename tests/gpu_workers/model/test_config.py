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
    assert c.sliding_window == 4096 and c.max_context == 256  # the window is wider than the context

    c = load_config(_saved(tmp_path / "e", "llama-llama3"))
    assert c.rope_theta == 500000.0
    assert c.rope_scaling == RopeScaling("llama3", 8.0, 1.0, 4.0, 32)

    c = load_config(_saved(tmp_path / "f", "llama-dynamic"))
    assert c.rope_scaling.type == "dynamic" and c.max_context == 96  # stretched by the factor


def test_sliding_window_caps_the_context() -> None:
    mistral = parse_config(_raw(architectures=["MistralForCausalLM"], max_position_embeddings=32768))
    assert mistral.sliding_window == 4096 and mistral.max_context == 4096  # transformers' default window
    assert parse_config(_raw(architectures=["MistralForCausalLM"], sliding_window=None)).sliding_window is None
    qwen = {"architectures": ["Qwen2ForCausalLM"], "max_position_embeddings": 32768, "sliding_window": 1024}
    assert parse_config(_raw(**qwen)).max_context == 32768  # use_sliding_window defaults to false
    assert parse_config(_raw(**qwen, use_sliding_window=True, max_window_layers=1)).max_context == 1024
    # every layer below max_window_layers: full attention everywhere
    assert parse_config(_raw(**qwen, use_sliding_window=True, max_window_layers=2)).max_context == 32768


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
