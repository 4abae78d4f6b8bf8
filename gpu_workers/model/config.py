"""The model's shape and numerics, read from a Hugging Face ``config.json``.

Llama, Mistral, Qwen2, Qwen3 and Phi-3 checkpoints share one decoder (pre-norm, RoPE, GQA, SwiGLU);
they differ in which projections carry a bias, q/k RMSNorm (Qwen3), fused checkpoint tensors (Phi-3),
their default values, and which layers attend through a sliding window. Gemma 3 adds its own numerics
(scaled embeddings, (1 + w) RMSNorm, GeLU-tanh, query_pre_attn_scalar, logit softcapping) and
interleaves sliding-window and global layers, each kind with its own RoPE base. ``load_config`` reads
those differences into one flat, frozen ``ModelConfig`` and refuses, with a ``ConfigError`` naming the
field, anything this engine would silently compute wrong (another activation, an unsupported RoPE
variant, quantized weights, ...). Field semantics follow transformers 5's ``LlamaConfig``,
``MistralConfig``, ``Qwen2Config``, ``Qwen3Config``, ``Phi3Config`` and ``Gemma3TextConfig``.
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
    "Qwen3ForCausalLM": "qwen3",
    "Phi3ForCausalLM": "phi3",
    "Gemma3ForCausalLM": "gemma3_text",
    "Gemma3ForConditionalGeneration": "gemma3_text",  # its text model alone (Gemma 3 4B, 12B, 27B)
}
# Where the text model's tensors lie in a multimodal checkpoint (the vision tower's are not read).
CHECKPOINT_PREFIXES = {"Gemma3ForConditionalGeneration": "language_model."}
# Gemma3TextConfig's defaults for the fields published configs leave out (the 4B's text_config is sparse).
_GEMMA3_TEXT_DEFAULTS = {
    "vocab_size": 262_208, "hidden_size": 2304, "intermediate_size": 9216, "num_hidden_layers": 26,
    "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 256, "rms_norm_eps": 1e-6,
    "query_pre_attn_scalar": 256, "sliding_window": 4096,
}
ROPE_TYPES = ("default", "linear", "dynamic", "llama3")
DTYPES = ("float32", "bfloat16", "float16")

# transformers' per-architecture defaults for the optional fields we read
_MAX_POSITIONS_DEFAULT = {"llama": 2048, "mistral": 4096 * 32, "qwen2": 32768, "qwen3": 32768, "phi3": 4096,
                          "gemma3_text": 131072}
_MISTRAL_SLIDING_WINDOW_DEFAULT = 4096
# the MLP activation each family may use (transformers' ACT2FN names): SwiGLU, Gemma's GeGLU-tanh
ACTIVATIONS = {"gemma3_text": ("gelu_pytorch_tanh",)}
_SWIGLU = ("silu",)
LAYER_TYPES = ("full_attention", "sliding_attention")


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
    # Tokens a sliding-window layer attends to, its own included (None: no layer slides); which
    # layers slide: ``layer_types`` (empty: every layer, when ``sliding_window`` is set).
    sliding_window: int | None = None
    layer_types: tuple[str, ...] = ()  # per layer, one of LAYER_TYPES
    torch_dtype: str | None = None  # the checkpoint's dtype, one of DTYPES, if stated
    model_type: str = "llama"  # transformers' model_type: which decoder (see ARCHITECTURES)
    hidden_act: str = "silu"  # the MLP's gate activation, a transformers ACT2FN name
    qk_norm: bool = False  # RMSNorm of each query and key head before RoPE (Qwen3, Gemma 3)
    # Sliding-window layers' own RoPE (Gemma 3's local base); None: the same as the global layers'.
    sliding_rope_theta: float | None = None
    sliding_rope_scaling: RopeScaling = field(default_factory=RopeScaling)
    query_pre_attn_scalar: float | None = None  # attention scores scaled by its -1/2 power, not head_dim's
    final_logit_softcapping: float | None = None  # logits = cap * tanh(logits / cap)
    checkpoint_prefix: str = ""  # of the text model's tensor names (a multimodal checkpoint's language_model.)
    quantization: str | None = None  # "gguf": a GGUF file's 4-bit weights kept quantized (model.quantization)

    def layer_window(self, layer: int) -> int | None:
        """The sliding window of ``layer`` (tokens it attends to, its own included), or None: all."""
        if self.sliding_window is None:
            return None
        if self.layer_types and self.layer_types[layer] != "sliding_attention":
            return None
        return self.sliding_window

    @property
    def attention_scale(self) -> float:
        """Factor of the query-key dot products (``query_pre_attn_scalar ** -0.5`` on Gemma)."""
        return (self.query_pre_attn_scalar or self.head_dim) ** -0.5

    def heads_per_rank(self, tp_size: int) -> int:
        """Query heads each tensor-parallel rank computes (``check_tp``: they split evenly)."""
        return self.num_attention_heads // tp_size

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
    exists to stretch past it). Sliding-window layers (Mistral, Phi-3 with ``sliding_window``,
    Qwen2/Qwen3 with ``use_sliding_window``, Gemma 3's local layers) attend to their window only.

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
    if arch == "Gemma3ForConditionalGeneration":
        text = raw.get("text_config")
        if not isinstance(text, dict):
            raise ConfigError(f"text_config must be an object, got {text!r}")
        outer = ("dtype", "torch_dtype", "tie_word_embeddings", "quantization_config")
        raw = {**{k: raw[k] for k in outer if k in raw}, **text}
    if model_type == "gemma3_text":
        raw = {**_GEMMA3_TEXT_DEFAULTS, **raw}
    r = _Reader(raw)

    act_field = "hidden_activation" if model_type == "gemma3_text" else "hidden_act"
    allowed = ACTIVATIONS.get(model_type, _SWIGLU)
    if (act := raw.get(act_field, allowed[0])) not in allowed:
        raise ConfigError(f"{act_field} {act!r} is not supported (only {', '.join(map(repr, allowed))})")
    if model_type == "gemma3_text":
        for name in ("attn_logit_softcapping", "use_bidirectional_attention"):
            if raw.get(name):
                raise ConfigError(f"{name} {raw[name]!r} is not supported (only null or false)")
    quantization = None
    if raw.get("quantization_config") is not None:
        method = raw["quantization_config"].get("quant_method", "?")
        if method != "gguf":  # a GGUF file served with --quantization gguf (gguf_file.materialize_gguf)
            raise ConfigError(f"quantized checkpoints (quantization_config: {method!r}) are not supported")
        quantization = method

    hidden = r.integer("hidden_size")
    heads = r.integer("num_attention_heads")
    kv_heads = r.integer("num_key_value_heads", default=heads)
    head_dim = r.integer("head_dim", default=hidden // heads)
    if heads % kv_heads:
        raise ConfigError(f"num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}")
    max_pos = r.integer("max_position_embeddings", default=_MAX_POSITIONS_DEFAULT[model_type])
    num_layers = r.integer("num_hidden_layers")
    window, layer_types = _sliding_window(raw, model_type, num_layers)
    rope_params = _rope_parameters(raw, model_type)
    rope_theta, rope = _rope(raw, rope_params["full_attention"], max_pos)
    sliding_theta, sliding_rope = None, RopeScaling()
    if model_type == "gemma3_text":
        sliding_theta, sliding_rope = _rope(raw, rope_params["sliding_attention"], max_pos)
        if "dynamic" in (rope.type, sliding_rope.type):
            raise ConfigError("dynamic rope_parameters are not supported for Gemma 3")

    if model_type in ("llama", "qwen3", "gemma3_text"):  # attention_bias: q, k, v and o
        qkv_bias = o_bias = r.flag("attention_bias")
        mlp_bias = r.flag("mlp_bias") if model_type == "llama" else False
    elif model_type == "qwen2":  # Qwen2Attention: q/k/v always biased, o never; no MLP bias
        qkv_bias, o_bias, mlp_bias = True, False, False
    else:
        qkv_bias = o_bias = mlp_bias = False

    max_context = int(max_pos * rope.factor) if rope.type == "dynamic" else max_pos
    gemma = model_type == "gemma3_text"

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
        tie_word_embeddings=r.flag("tie_word_embeddings") if "tie_word_embeddings" in raw else gemma,
        qkv_bias=qkv_bias,
        o_bias=o_bias,
        mlp_bias=mlp_bias,
        sliding_window=window,
        layer_types=layer_types,
        torch_dtype=dtype,
        model_type=model_type,
        hidden_act=act,
        qk_norm=model_type in ("qwen3", "gemma3_text"),
        sliding_rope_theta=sliding_theta,
        sliding_rope_scaling=sliding_rope,
        query_pre_attn_scalar=r.number("query_pre_attn_scalar", default=256) if gemma else None,
        # transformers' Gemma3ForConditionalGeneration leaves its text config's cap unapplied
        final_logit_softcapping=(_optional_number(raw, "final_logit_softcapping")
                                 if gemma and arch not in CHECKPOINT_PREFIXES else None),
        checkpoint_prefix=CHECKPOINT_PREFIXES.get(arch, ""),
        quantization=quantization,
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


def _rope_parameters(raw: dict[str, Any], model_type: str) -> dict[str, dict[str, Any]]:
    """Each layer type's RoPE parameters, ``rope_theta`` included: from ``rope_parameters``
    (transformers 5; Gemma 3 keys them by layer type) or the older ``rope_scaling``, ``rope_theta``
    and Gemma 3's ``rope_local_base_freq``."""
    params = raw.get("rope_scaling") or raw.get("rope_parameters") or {}
    if not isinstance(params, dict):
        raise ConfigError(f"rope_parameters must be an object, got {params!r}")
    per_type = any(isinstance(v, dict) for v in params.values())
    if model_type != "gemma3_text":
        if per_type:
            raise ConfigError("per-layer-type rope_parameters are not supported")
        return {"full_attention": {"rope_theta": raw.get("rope_theta", 10000.0), **params}}
    if per_type:
        if set(params) - set(LAYER_TYPES) or not all(isinstance(v, dict) for v in params.values()):
            raise ConfigError(f"rope_parameters: expected an object per layer type ({', '.join(LAYER_TYPES)})")
        full, local = dict(params.get("full_attention", {})), dict(params.get("sliding_attention", {}))
    else:  # Gemma3TextConfig before transformers 5: rope_scaling applies to the global layers only
        full, local = dict(params), {}
    full.setdefault("rope_theta", raw.get("rope_theta", 1_000_000.0))
    local.setdefault("rope_theta", raw.get("rope_local_base_freq", 10_000.0))
    return {"full_attention": full, "sliding_attention": local}


def _rope(raw: dict[str, Any], params: dict[str, Any], max_pos: int) -> tuple[float, RopeScaling]:
    """(rope_theta, scaling) of one layer type's RoPE parameters (see ``_rope_parameters``)."""
    r = _Reader(params, prefix="rope_parameters.")
    theta = params["rope_theta"]
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


def _sliding_window(raw: dict[str, Any], model_type: str, num_layers: int) -> tuple[int | None, tuple[str, ...]]:
    """(window, layer types) as transformers' attention uses them: the window of the sliding layers
    (None when no layer slides) and each layer's type (empty: all alike). See MistralConfig,
    Qwen2Config/Qwen3Config, Phi3Config and Gemma3TextConfig."""
    layer_types = raw.get("layer_types")
    if model_type == "mistral":
        window = raw.get("sliding_window", _MISTRAL_SLIDING_WINDOW_DEFAULT)
        layer_types = None
    elif model_type in ("qwen2", "qwen3"):
        window = raw.get("sliding_window", 4096) if raw.get("use_sliding_window", False) else None
        if layer_types is None or window is None:
            first_sliding = raw.get("max_window_layers", 28)
            layer_types = [
                "sliding_attention" if window is not None and i >= first_sliding else "full_attention"
                for i in range(num_layers)
            ]
    elif model_type == "phi3":
        window, layer_types = raw.get("sliding_window"), None
    elif model_type == "gemma3_text":
        window = raw.get("sliding_window", 4096)
        if layer_types is None:  # Gemma3TextConfig's default: every sixth layer global
            pattern = raw.get("sliding_window_pattern", raw.get("_sliding_window_pattern", 6))
            layer_types = ["full_attention" if (i + 1) % pattern == 0 else "sliding_attention"
                           for i in range(num_layers)]
    else:
        window, layer_types = None, None
    if window is not None and (not isinstance(window, int) or isinstance(window, bool) or window <= 0):
        raise ConfigError(f"sliding_window must be a positive integer or null, got {window!r}")
    if layer_types is not None:
        if (not isinstance(layer_types, list) or len(layer_types) != num_layers
                or any(t not in LAYER_TYPES for t in layer_types)):
            raise ConfigError(f"layer_types must list one of {', '.join(LAYER_TYPES)} for each of the "
                              f"{num_layers} layers, got {layer_types!r}")
        if window is None or "sliding_attention" not in layer_types:
            return None, ()
        if "full_attention" not in layer_types:
            layer_types = None
    return window, tuple(layer_types or ())


def _optional_number(raw: dict[str, Any], name: str) -> float | None:
    value = raw.get(name)
    if value is None:
        return None
    return _Reader(raw).number(name)


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
