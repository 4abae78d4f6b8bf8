"""``random:<preset>`` models: seeded random Llama weights, written once as a real HF directory.

A preset is materialized into the cache directory (``$RYZ_CACHE_DIR``, else
``~/.cache/ryzanstein``) with config.json, generation_config.json and safetensors weights, and is
then loaded like any other model directory, so benchmarks and tests exercise the real loader. No
tokenizer.json is written: these models use the byte-level fallback tokenizer (ids 0..255 are in
every preset's vocabulary; the EOS id is the last id, outside the byte range).

Writing goes to a temporary directory renamed into place: a directory that exists is complete, and
two processes racing to write the same preset both end up using the winner's copy.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from broker.errors import ConfigError

FORMAT_VERSION = 1  # bump when the files written change, so stale caches are not reused
DEFAULT_INIT_STD = 0.02


@dataclass(frozen=True, slots=True)
class Preset:
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int
    vocab_size: int = 32000
    max_position_embeddings: int = 4096
    dtype: str = "float32"
    layers_per_file: int | None = None  # None: one model.safetensors; else a sharded checkpoint

    def num_params(self) -> int:
        h, head_dim = self.hidden_size, self.hidden_size // self.num_attention_heads
        attn = 2 * h * h + 2 * h * self.num_key_value_heads * head_dim
        per_layer = attn + 3 * h * self.intermediate_size + 2 * h
        return self.num_hidden_layers * per_layer + 2 * self.vocab_size * h + h


PRESETS: dict[str, Preset] = {
    # ~19M parameters: tests and demos
    "tiny": Preset(hidden_size=256, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4,
                   intermediate_size=704),
    # ~155M parameters: the CPU serving benchmark
    "small": Preset(hidden_size=1024, num_hidden_layers=8, num_attention_heads=16, num_key_value_heads=4,
                    intermediate_size=2816),
    # 7B-class layer shapes, few layers (~1B parameters, bf16): tensor-parallel benchmarks
    "large": Preset(hidden_size=4096, num_hidden_layers=4, num_attention_heads=32, num_key_value_heads=8,
                    intermediate_size=11008, dtype="bfloat16", layers_per_file=1),
}


def default_cache_dir() -> Path:
    return Path(os.environ.get("RYZ_CACHE_DIR") or Path.home() / ".cache" / "ryzanstein")


def materialize(
    preset: str, *, cache_dir: Path | None = None, seed: int = 0, init_std: float = DEFAULT_INIT_STD
) -> Path:
    """The directory of ``random:<preset>`` with this seed and init scale, written if missing."""
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset random:{preset} (valid: {', '.join(f'random:{p}' for p in PRESETS)})")
    spec = PRESETS[preset]
    name = f"random-{preset}-seed{seed}" + (f"-std{init_std:g}" if init_std != DEFAULT_INIT_STD else "")
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    final = root / "models" / f"{name}-v{FORMAT_VERSION}"
    if final.is_dir():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        _write(tmp, spec, label=f"random:{preset}", seed=seed, init_std=init_std)
        try:
            os.rename(tmp, final)
        except OSError:
            if not final.is_dir():  # not a lost race: a real error
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def _write(out: Path, spec: Preset, *, label: str, seed: int, init_std: float) -> None:
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": spec.vocab_size,
        "hidden_size": spec.hidden_size,
        "intermediate_size": spec.intermediate_size,
        "num_hidden_layers": spec.num_hidden_layers,
        "num_attention_heads": spec.num_attention_heads,
        "num_key_value_heads": spec.num_key_value_heads,
        "hidden_act": "silu",
        "max_position_embeddings": spec.max_position_embeddings,
        "rms_norm_eps": 1e-5,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
        "tie_word_embeddings": False,
        "attention_bias": False,
        "mlp_bias": False,
        "bos_token_id": None,
        "eos_token_id": spec.vocab_size - 1,
        "dtype": spec.dtype,
        "initializer_range": init_std,
    }
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / "generation_config.json").write_text(json.dumps({"eos_token_id": spec.vocab_size - 1}, indent=2) + "\n")

    began = time.monotonic()
    total = spec.num_params()
    verbose = total > 50_000_000
    if verbose:
        print(f"writing {label} ({total / 1e6:.0f}M parameters, {spec.dtype}) to {out.parent} ...", file=sys.stderr)
    generator = torch.Generator().manual_seed(seed)
    dtype = getattr(torch, spec.dtype)
    files = _file_groups(spec)
    weight_map: dict[str, str] = {}
    written = 0
    for i, names in enumerate(files):
        tensors = {name: _init(shape, generator, init_std, dtype) for name, shape in names}
        file = "model.safetensors" if len(files) == 1 else f"model-{i + 1:05d}-of-{len(files):05d}.safetensors"
        save_file(tensors, out / file, metadata={"format": "pt"})
        weight_map.update({name: file for name in tensors})
        written += sum(t.numel() for t in tensors.values())
        if verbose and len(files) > 1:
            print(f"  {label}: {written / total:.0%}", file=sys.stderr)
    if len(files) > 1:
        index = {"metadata": {"total_size": written * dtype.itemsize}, "weight_map": weight_map}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    if verbose:
        print(f"wrote {label} in {time.monotonic() - began:.1f}s", file=sys.stderr)


Shape = tuple[int, ...]


def _file_groups(spec: Preset) -> list[list[tuple[str, Shape]]]:
    """Checkpoint tensors (HF names, shapes) grouped by the file they go to, in a fixed order."""
    h, i, v = spec.hidden_size, spec.intermediate_size, spec.vocab_size
    head_dim = h // spec.num_attention_heads
    kv = spec.num_key_value_heads * head_dim

    def layer(n: int) -> list[tuple[str, Shape]]:
        p = f"model.layers.{n}."
        return [
            (p + "input_layernorm.weight", (h,)),
            (p + "self_attn.q_proj.weight", (h, h)),
            (p + "self_attn.k_proj.weight", (kv, h)),
            (p + "self_attn.v_proj.weight", (kv, h)),
            (p + "self_attn.o_proj.weight", (h, h)),
            (p + "post_attention_layernorm.weight", (h,)),
            (p + "mlp.gate_proj.weight", (i, h)),
            (p + "mlp.up_proj.weight", (i, h)),
            (p + "mlp.down_proj.weight", (h, i)),
        ]

    first: list[tuple[str, Shape]] = [("model.embed_tokens.weight", (v, h))]
    last: list[tuple[str, Shape]] = [("model.norm.weight", (h,)), ("lm_head.weight", (v, h))]
    layers = [layer(n) for n in range(spec.num_hidden_layers)]
    if spec.layers_per_file is None:
        return [first + [t for group in layers for t in group] + last]
    step = spec.layers_per_file
    chunks = [[t for group in layers[j : j + step] for t in group] for j in range(0, len(layers), step)]
    return [first, *chunks, last]


def _init(shape: Shape, generator: torch.Generator, std: float, dtype: torch.dtype) -> torch.Tensor:
    if len(shape) == 1:  # norm weights
        return torch.ones(shape, dtype=dtype)
    return torch.randn(shape, generator=generator).mul_(std).to(dtype)
