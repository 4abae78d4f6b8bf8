"""The model's shape and numerics, read from a Hugging Face ``config.json``.

Llama, Mistral and Qwen2 checkpoints share one decoder (pre-norm, RoPE, GQA, SwiGLU); they differ
only in which projections carry a bias, their default values, and sliding windows. ``load_config``
reads those differences into one flat, frozen ``ModelConfig`` and refuses, with a ``ConfigError``
naming the field, anything this engine would silently compute wrong (another activation, an
unsupported RoPE variant, quantized weights, ...). Field semantics follow transformers 5's
``LlamaConfig``, ``MistralConfig`` and ``Qwen2Config``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from broker.errors import ConfigError

# architectures entry -> transformers model_type
ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
}
ROPE_TYPES = ("default", "linear", "dynamic", "llama3")
DTYPES = ("float32", "bfloat16", "float16")

# transformers' per-architecture defaults for the optional fields we read
_MAX_POSITIONS_DEFAULT = {"llama": 2048, "mistral": 4096 * 32, "qwen2": 32768}
_MISTRAL_SLIDING_WINDOW_DEFAULT = 4096


@dataclass(frozen=True, slots=True)
class RopeScaling:
    """How rotary frequencies are derived (transformers' ``rope_parameters``)."""

    type: str = "default"  # one of ROPE_TYPES
    factor: float = 1.0
    # llama3 only
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 0


@dataclass(frozen=True, slots=True)
class ModelConfig:
    architecture: str  # e.g. "LlamaForCausalLM"
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    # The longest prompt + output this engine serves with exact results (see ``load_config``).
    max_context: int
    rope_scaling: RopeScaling = field(default_factory=RopeScaling)
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    sliding_window: int | None = None  # as configured; only used to cap max_context
    torch_dtype: str | None = None  # the checkpoint's dtype, one of DTYPES, if stated

    def kv_heads_per_rank(self, tp_size: int) -> int:
        """KV heads each tensor-parallel rank holds: a slice, or one replicated head when tp_size
        exceeds the number of KV heads."""
        return max(1, self.num_key_value_heads // tp_size)

    def check_tp(self, tp_size: int) -> None:
        """ConfigError unless the heads and KV heads split evenly over ``tp_size`` ranks."""
        heads, kv = self.num_attention_heads, self.num_key_value_heads
        if tp_size < 1 or heads % tp_size:
            raise ConfigError(f"tensor parallel size {tp_size} does not divide {heads} attention heads")
        if (kv % tp_size) if tp_size <= kv else (tp_size % kv):
            raise ConfigError(
                f"tensor parallel size {tp_size} and {kv} KV heads: one must divide the other"
            )


def load_config(model_dir: Path) -> ModelConfig:
    """The ``ModelConfig`` of the checkpoint in ``model_dir``.

    ``max_context`` is ``max_position_embeddings`` (times the factor for dynamic NTK RoPE, which
    exists to stretch past it), capped by the sliding window when one applies (Mistral, or Qwen2
    with ``use_sliding_window``): attention here is always full, and within the window full
    attention and sliding-window attention are the same computation, so capping keeps results
    exact without implementing sliding windows.

    Special tokens (BOS, EOS) are not model configuration here: ``gpu_workers.hf_tokenizer`` reads
    them, with the tokenizer.
    """
    path = Path(model_dir) / "config.json"
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: no config.json: not a Hugging Face model directory") from None
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path}: unreadable config.json: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: config.json is not a JSON object")
    try:
        return parse_config(raw)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


def parse_config(raw: dict[str, Any]) -> ModelConfig:
    """``ModelConfig`` from the parsed config.json contents."""
    arch = _architecture(raw)
    model_type = ARCHITECTURES[arch]
    r = _Reader(raw)

    if (act := raw.get("hidden_act", "silu")) != "silu":
        raise ConfigError(f"hidden_act {act!r} is not supported (only 'silu')")
    if raw.get("quantization_config") is not None:
        method = raw["quantization_config"].get("quant_method", "?")
        raise ConfigError(f"quantized checkpoints (quantization_config: {method!r}) are not supported")

    hidden = r.integer("hidden_size")
    heads = r.integer("num_attention_heads")
    kv_heads = r.integer("num_key_value_heads", default=heads)
    head_dim = r.integer("head_dim", default=hidden // heads)
    if heads % kv_heads:
        raise ConfigError(f"num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}")
    max_pos = r.integer("max_position_embeddings", default=_MAX_POSITIONS_DEFAULT[model_type])
    rope_theta, rope = _rope(raw, max_pos)

    if model_type == "llama":
        qkv_bias = o_bias = r.flag("attention_bias")
        mlp_bias = r.flag("mlp_bias")
    elif model_type == "qwen2":  # Qwen2Attention: q/k/v always biased, o never; no MLP bias
        qkv_bias, o_bias, mlp_bias = True, False, False
    else:
        qkv_bias = o_bias = mlp_bias = False

    window = _sliding_window(raw, model_type, r.integer("num_hidden_layers"))
    max_context = int(max_pos * rope.factor) if rope.type == "dynamic" else max_pos
    if window is not None:
        max_context = min(max_context, window)

    dtype = raw.get("dtype", raw.get("torch_dtype"))
    if dtype is not None and dtype not in DTYPES:
        raise ConfigError(f"dtype {dtype!r} is not supported (one of {', '.join(DTYPES)})")

    return ModelConfig(
        architecture=arch,
        vocab_size=r.integer("vocab_size"),
        hidden_size=hidden,
        intermediate_size=r.integer("intermediate_size"),
        num_hidden_layers=r.integer("num_hidden_layers"),
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        rms_norm_eps=r.number("rms_norm_eps", default=1e-6),
        rope_theta=rope_theta,
        max_position_embeddings=max_pos,
        max_context=max_context,
        rope_scaling=rope,
        tie_word_embeddings=r.flag("tie_word_embeddings"),
        qkv_bias=qkv_bias,
        o_bias=o_bias,
        mlp_bias=mlp_bias,
        sliding_window=window,
        torch_dtype=dtype,
    )


def _architecture(raw: dict[str, Any]) -> str:
    archs = raw.get("architectures")
    if archs is None and raw.get("model_type") in ARCHITECTURES.values():  # a bare config, saved without a model
        return next(arch for arch, kind in ARCHITECTURES.items() if kind == raw["model_type"])
    if not isinstance(archs, list) or len(archs) != 1:
        raise ConfigError(f"architectures must name exactly one model class, got {archs!r}")
    if archs[0] not in ARCHITECTURES:
        raise ConfigError(
            f"architecture {archs[0]!r} is not supported (supported: {', '.join(ARCHITECTURES)})"
        )
    return archs[0]


def _rope(raw: dict[str, Any], max_pos: int) -> tuple[float, RopeScaling]:
    """(rope_theta, scaling) from ``rope_parameters`` (transformers 5) or ``rope_scaling`` (older)."""
    params = raw.get("rope_scaling") or raw.get("rope_parameters") or {}
    if not isinstance(params, dict):
        raise ConfigError(f"rope_parameters must be an object, got {params!r}")
    if any(isinstance(v, dict) for v in params.values()):
        raise ConfigError("per-layer-type rope_parameters are not supported")
    r = _Reader(params, prefix="rope_parameters.")
    theta = params.get("rope_theta", raw.get("rope_theta", 10000.0))
    if not isinstance(theta, (int, float)) or isinstance(theta, bool) or theta <= 0:
        raise ConfigError(f"rope_theta must be a positive number, got {theta!r}")
    kind = params.get("rope_type", params.get("type", "default"))
    if kind not in ROPE_TYPES:
        raise ConfigError(f"rope type {kind!r} is not supported (supported: {', '.join(ROPE_TYPES)})")
    partial = params.get("partial_rotary_factor", raw.get("partial_rotary_factor", 1.0))
    if partial != 1.0:
        raise ConfigError(f"partial_rotary_factor {partial!r} is not supported (only 1.0)")
    if kind == "default":
        return float(theta), RopeScaling()
    factor = r.number("factor")
    if kind != "llama3":
        return float(theta), RopeScaling(type=kind, factor=factor)
    return float(theta), RopeScaling(
        type=kind,
        factor=factor,
        low_freq_factor=r.number("low_freq_factor"),
        high_freq_factor=r.number("high_freq_factor"),
        original_max_position_embeddings=r.integer("original_max_position_embeddings", default=max_pos),
    )


def _sliding_window(raw: dict[str, Any], model_type: str, num_layers: int) -> int | None:
    """The window that some layer would use in transformers, or None (see MistralConfig/Qwen2Config)."""
    if model_type == "mistral":
        window = raw.get("sliding_window", _MISTRAL_SLIDING_WINDOW_DEFAULT)
    elif model_type == "qwen2":
        window = raw.get("sliding_window", 4096) if raw.get("use_sliding_window", False) else None
        layer_types = raw.get("layer_types")
        if layer_types is None:
            first_sliding = raw.get("max_window_layers", 28)
            layer_types = ["sliding_attention" if i >= first_sliding else "full_attention" for i in range(num_layers)]
        if "sliding_attention" not in layer_types:
            window = None
    else:
        window = None
    if window is not None and (not isinstance(window, int) or window <= 0):
        raise ConfigError(f"sliding_window must be a positive integer or null, got {window!r}")
    return window


class _Reader:
    """Typed field access with errors that name the field."""

    _MISSING = object()

    def __init__(self, raw: dict[str, Any], *, prefix: str = "") -> None:
        self._raw = raw
        self._prefix = prefix

    def _get(self, name: str, default: Any) -> Any:
        value = self._raw.get(name)
        if value is None:
            if default is self._MISSING:
                raise ConfigError(f"{self._prefix}{name} is missing")
            return default
        return value

    def integer(self, name: str, *, default: Any = _MISSING) -> int:
        value = self._get(name, default)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ConfigError(f"{self._prefix}{name} must be a positive integer, got {value!r}")
        return value

    def number(self, name: str, *, default: Any = _MISSING) -> float:
        value = self._get(name, default)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
            raise ConfigError(f"{self._prefix}{name} must be a positive number, got {value!r}")
        return float(value)

    def flag(self, name: str) -> bool:
        value = self._get(name, False)
        if not isinstance(value, bool):
            raise ConfigError(f"{self._prefix}{name} must be true or false, got {value!r}")
        return value
