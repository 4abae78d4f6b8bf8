"""GGUF files (llama.cpp's format, as Ollama and llama.cpp users have them) as model checkpoints.

``materialize_gguf(path)`` turns the file's metadata into a small model directory in the cache
(config.json, generation_config.json, tokenizer.json, tokenizer_config.json, and a ``model.gguf``
link back to the file), so that the config parser, the tokenizer loader and the chat endpoint read
it like any Hugging Face directory. The weights stay in the GGUF file: ``gguf_tensors`` maps each
parameter name of ours (Hugging Face names) to a ``GGUFTensor`` that reads and dequantizes, with
the ``gguf`` package's ``dequantize``, only the rows (and, when block-aligned, the columns) of a
tensor-parallel rank's shard.

Layouts follow llama.cpp's ``convert_hf_to_gguf.py`` (undone here as transformers'
``modeling_gguf_pytorch_utils`` undoes them): for the ``llama`` architecture the q/k projection
rows are permuted within each head (rotary pairs interleaved), and ``gemma3`` stores its RMSNorm
weights as ``1 + w``. Tensor names come from the ``gguf`` package's ``TensorNameMap``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from broker.errors import ConfigError
from gpu_workers.model.quantization import block_parts

LINK_NAME = "model.gguf"  # in a materialized directory: the GGUF file the weights are read from
FORMAT_VERSION = 3  # bump when the files written change, so stale caches are not rewritten in place

# GGUF general.architecture -> (our config's architectures entry, transformers model_type)
ARCHITECTURES = {
    "llama": ("LlamaForCausalLM", "llama"),
    "gemma3": ("Gemma3ForCausalLM", "gemma3_text"),
}
# {arch}.<key> -> config.json key (transformers' GGUF_CONFIG_MAPPING, for these architectures)
_CONFIG_KEYS = {
    "context_length": "max_position_embeddings",
    "block_count": "num_hidden_layers",
    "feed_forward_length": "intermediate_size",
    "embedding_length": "hidden_size",
    "attention.head_count": "num_attention_heads",
    "attention.head_count_kv": "num_key_value_heads",
    "attention.key_length": "head_dim",
    "attention.layer_norm_rms_epsilon": "rms_norm_eps",
    "attention.sliding_window": "sliding_window",
    "rope.freq_base": "rope_theta",
}


def is_gguf(spec: str | Path) -> bool:
    """Whether ``spec`` names a GGUF file (by its magic bytes, whatever the suffix)."""
    path = Path(spec).expanduser()
    try:
        with path.open("rb") as f:
            return path.is_file() and f.read(4) == b"GGUF"
    except OSError:
        return False


def open_reader(path: Path) -> Any:
    """A ``gguf.GGUFReader`` on ``path``; ConfigError if the file is not a readable GGUF."""
    try:
        import gguf
    except ImportError:
        raise ConfigError(f"{path}: reading GGUF files needs the 'gguf' package (pip install gguf)") from None
    try:
        return gguf.GGUFReader(path)
    except (OSError, ValueError, KeyError) as e:
        raise ConfigError(f"{path}: not a readable GGUF file: {e}") from None


def metadata(reader: Any) -> dict[str, Any]:
    """The file's key/value metadata as Python values (strings, numbers, lists)."""
    return {key: field.contents() for key, field in reader.fields.items() if not key.startswith("GGUF.")}


def gguf_config(meta: dict[str, Any], tensor_names: set[str]) -> dict[str, Any]:
    """The config.json contents (transformers' field names) that the metadata describes.

    Raises ConfigError naming the architecture when it is not one of ``ARCHITECTURES``, and for a
    Llama 3 file whose RoPE scaling is stored as a ``rope_freqs`` tensor (not supported here).
    """
    arch = meta.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise ConfigError(f"GGUF architecture {arch!r} is not supported (supported: {', '.join(ARCHITECTURES)})")
    if "rope_freqs.weight" in tensor_names:
        raise ConfigError("GGUF files with a rope_freqs tensor (Llama 3.1-style RoPE scaling) are not supported")
    architecture, model_type = ARCHITECTURES[arch]
    config: dict[str, Any] = {"architectures": [architecture], "model_type": model_type}
    for key, name in _CONFIG_KEYS.items():
        if f"{arch}.{key}" in meta:
            config[name] = meta[f"{arch}.{key}"]
    if arch == "llama" and "head_dim" not in config and f"{arch}.rope.dimension_count" in meta:
        config["head_dim"] = meta[f"{arch}.rope.dimension_count"]
    tokens = meta.get("tokenizer.ggml.tokens")
    config["vocab_size"] = meta.get(f"{arch}.vocab_size", len(tokens) if tokens is not None else None)
    config["tie_word_embeddings"] = "output.weight" not in tensor_names
    if arch == "llama":  # llama.cpp uses the biases a file has; the metadata does not say
        config["attention_bias"] = "blk.0.attn_q.bias" in tensor_names
        config["mlp_bias"] = "blk.0.ffn_up.bias" in tensor_names
    scaling = meta.get(f"{arch}.rope.scaling.type")
    if scaling not in (None, "none"):
        factor = meta.get(f"{arch}.rope.scaling.factor")
        config["rope_scaling"] = {"rope_type": scaling, "factor": factor}
    config["torch_dtype"] = "float32"  # dequantized weights are fp32; the engine casts to its own dtype
    return config


@dataclass(frozen=True, slots=True)
class _Layout:
    """How a GGUF tensor's rows map to ours, and what to do to its values."""

    permute_heads: int | None = None  # llama.cpp's q/k row permutation over this many heads
    add: float = 0.0  # added after dequantizing (gemma3 norms: -1)


class GGUFTensor:
    """A tensor in an open GGUF file, in our (Hugging Face) layout; ``narrow`` is free, ``load``
    reads and dequantizes only that part (whole quantization blocks along the last dim).

    ``shape`` is the torch shape ([out, in] for a weight); GGUF stores the same bytes row-major with
    its dims listed in the other order.
    """

    def __init__(self, tensor: Any, layout: _Layout = _Layout(), ranges: tuple[slice, ...] | None = None,
                 part: str | None = None) -> None:
        self._tensor = tensor
        self._layout = layout
        self._part = part
        self._full = tuple(int(n) for n in reversed(tensor.shape.tolist()))
        self._ranges = ranges or tuple(slice(0, n) for n in self._full)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(r.stop - r.start for r in self._ranges)

    def narrow(self, dim: int, start: int, length: int) -> GGUFTensor:
        r = self._ranges[dim]
        if start < 0 or r.start + start + length > r.stop:
            raise ValueError(f"narrow({dim}, {start}, {length}) outside shape {self.shape}")
        ranges = list(self._ranges)
        ranges[dim] = slice(r.start + start, r.start + start + length)
        return GGUFTensor(self._tensor, self._layout, tuple(ranges), self._part)

    @property
    def tensor_type(self) -> Any:
        """The stored quantization type (a ``gguf.GGMLQuantizationType``)."""
        return self._tensor.tensor_type

    def part(self, name: str) -> GGUFTensor:
        """The same tensor whose ``load`` gives one of ``quantization.PARTS`` of each weight (its
        4-bit code, or its block's scale or zero) instead of its value; the type must be one of
        ``quantization.int4_types``."""
        return GGUFTensor(self._tensor, self._layout, self._ranges, name)

    def load(self) -> torch.Tensor:
        import gguf

        kind = self._tensor.tensor_type
        data = self._tensor.data
        if len(self._full) == 1:  # norms and biases: small, dequantized whole
            values = gguf.quants.dequantize(np.asarray(data), kind).reshape(-1)[self._row_index()]
        else:
            rows = self._row_index()
            data = np.asarray(data).reshape(self._full[0], -1)[rows]  # [rows, bytes or elements per row]
            data, cols = self._columns(data, kind)
            if self._part is None:
                values = gguf.quants.dequantize(data, kind)[:, cols]
            else:
                values = block_parts(data, kind)[self._part][:, cols]
        out = torch.from_numpy(np.array(values, dtype=np.float32))  # a copy: the file's pages are read-only
        return out + self._layout.add if self._layout.add and self._part is None else out

    def _row_index(self) -> np.ndarray:
        """GGUF row of each of our rows in range: llama.cpp's ``permute`` undone (per head, the rows
        [0, 1, ..., d/2 - 1 | d/2, ..., d - 1] were stored as [0, d/2, 1, d/2 + 1, ...])."""
        ours = np.arange(self._ranges[0].start, self._ranges[0].stop)
        heads = self._layout.permute_heads
        if heads is None:
            return ours
        d = self._full[0] // heads
        within = ours % d
        return ours - within + 2 * (within % (d // 2)) + within // (d // 2)

    def _columns(self, data: np.ndarray, kind: Any) -> tuple[np.ndarray, slice]:
        """The stored columns to dequantize, and the slice of the result to keep."""
        import gguf

        cols = self._ranges[1]
        if cols == slice(0, self._full[1]):
            return data, slice(None)
        block, size = gguf.GGML_QUANT_SIZES[kind]
        if data.dtype != np.uint8:  # F32 / F16: stored as elements
            return data[:, cols], slice(None)
        first, last = cols.start // block, -(-cols.stop // block)
        return data[:, first * size:last * size], slice(cols.start - first * block, cols.stop - first * block)


def gguf_tensors(reader: Any, config: dict[str, Any], wanted: list[str], *, source: Path) -> dict[str, GGUFTensor]:
    """Our parameter name -> its tensor in the file, for each of ``wanted`` (checkpoint names).

    ConfigError naming the tensors when the file lacks some of ``wanted`` or holds others, and
    naming the quantization type when the ``gguf`` package cannot dequantize one.
    """
    import gguf

    arch = next(a for a, (_, model_type) in ARCHITECTURES.items() if model_type == config["model_type"])
    names = gguf.get_tensor_name_map(_model_arch(arch), config["num_hidden_layers"])
    by_name = {t.name: t for t in reader.tensors}
    out: dict[str, GGUFTensor] = {}
    missing = []
    for hf_name in wanted:
        stored = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if stored is None or stored not in by_name:
            missing.append(f"{hf_name} ({stored or 'no GGUF name'})")
            continue
        tensor = by_name.pop(stored)
        _check_quant_type(tensor, source)
        out[hf_name] = GGUFTensor(tensor, _layout(arch, stored, config))
    unexpected = sorted(by_name)
    if missing or unexpected:
        problems = [f"missing tensors: {', '.join(missing[:8])}"] if missing else []
        problems += [f"unexpected tensors: {', '.join(unexpected[:8])}"] if unexpected else []
        raise ConfigError(f"{source}: GGUF file does not match the model: {'; '.join(problems)}")
    return out


def _layout(arch: str, stored: str, config: dict[str, Any]) -> _Layout:
    if arch == "llama" and stored.endswith((".attn_q.weight", ".attn_q.bias")):
        return _Layout(permute_heads=config["num_attention_heads"])
    if arch == "llama" and stored.endswith((".attn_k.weight", ".attn_k.bias")):
        return _Layout(permute_heads=config.get("num_key_value_heads", config["num_attention_heads"]))
    if arch == "gemma3" and stored.endswith("norm.weight"):
        return _Layout(add=-1.0)
    return _Layout()


def _model_arch(arch: str) -> Any:
    import gguf

    return next(key for key, name in gguf.MODEL_ARCH_NAMES.items() if name == arch)


def _check_quant_type(tensor: Any, source: Path) -> None:
    """ConfigError naming the type when the gguf package cannot dequantize ``tensor``'s."""
    import gguf

    kind = tensor.tensor_type
    block, size = gguf.GGML_QUANT_SIZES.get(kind, (0, 0))
    try:
        if not block:
            raise NotImplementedError
        gguf.quants.dequantize(np.zeros((1, size), dtype=np.uint8), kind)
    except (NotImplementedError, ValueError, TypeError):
        raise ConfigError(
            f"{source}: tensor {tensor.name}: quantization {kind.name} is not supported (the gguf package "
            "cannot dequantize it)"
        ) from None


def materialize_gguf(path: Path, *, cache_dir: Path, quantization: str | None = None) -> Path:
    """The model directory describing GGUF file ``path`` (written once into ``cache_dir/gguf``).

    ``quantization="gguf"``: its config.json says ``"quantization_config": {"quant_method": "gguf"}``,
    and the loader keeps the file's 4-bit weights quantized (``gpu_workers.model.quantization``);
    None: the weights are dequantized to the model's dtype.

    The directory's name hashes the file's absolute path, size and modification time, so a
    replaced file gets a new directory. Written to a temporary directory renamed into place.
    ConfigError for an unreadable file, an unsupported architecture or tokenizer.
    """
    from gpu_workers.model.gguf_tokenizer import tokenizer_files

    path = Path(path).expanduser().resolve()
    stat = path.stat()
    key = hashlib.sha256(f"{FORMAT_VERSION}:{path}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    final = Path(cache_dir) / "gguf" / f"{path.stem}-{key}{'-' + quantization if quantization else ''}"
    if (final / "config.json").is_file():
        return final
    reader = open_reader(path)
    meta = metadata(reader)
    config = gguf_config(meta, {t.name for t in reader.tensors})
    if quantization is not None:
        config["quantization_config"] = {"quant_method": quantization}
    files = tokenizer_files(meta, path)
    generation = {k: v for k, v in files.pop("generation_config.json").items() if v is not None}
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=final.name + ".", dir=final.parent))
    try:
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2))
        for name, content in files.items():
            (tmp / name).write_text(content if isinstance(content, str) else json.dumps(content, ensure_ascii=False))
        os.symlink(path, tmp / LINK_NAME)
        try:
            os.rename(tmp, final)
        except OSError:  # another process won the race: its copy is complete
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final
