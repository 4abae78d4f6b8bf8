"""Finding a model (``resolve_model``) and loading its weights (``load_weights``): safetensors, or
a GGUF file (``gguf_file``).

Weights are read lazily: each parameter's ``weight_loader`` narrows a ``CheckpointTensor`` (or a
``GGUFTensor``) to its tensor-parallel shard, and only that part is read from the memory-mapped file.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

from broker.errors import ConfigError
from gpu_workers.model.layers import LinearBase, VocabParallelEmbedding, default_weight_loader
from gpu_workers.model.quantization import Int4Weight, Int8Weight
from gpu_workers.startup import track

log = logging.getLogger(__name__)

SINGLE_FILE = "model.safetensors"
GGUF_LINK = "model.gguf"  # gguf_file.LINK_NAME: a directory materialized from a GGUF file
INDEX_FILE = "model.safetensors.index.json"
# Buffers some checkpoints carry that the model recomputes.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


# What a hub download fetches: config.json, generation_config.json, tokenizer.json,
# tokenizer_config.json, special_tokens_map.json (*.json); the weights; the chat template as
# transformers 5 saves it (chat_template.jinja, or several in additional_chat_templates/); and the
# files of tokenizers without a tokenizer.json (SentencePiece's tokenizer.model, BPE's vocab/merges).
HUB_FILES = ("*.json", "*.safetensors", "*.jinja", "additional_chat_templates/*", "tokenizer.model",
             "*.tiktoken", "merges.txt", "vocab.txt")


def resolve_model(spec: str, *, quantization: str | None = None) -> Path:
    """The local directory of the model named by ``spec``.

    A directory is used as it is; a GGUF file gets a directory of its metadata in the cache (see
    ``gguf_file.materialize_gguf``), whose weights are read from the file itself; ``random:<preset>``
    is written once into the cache (see ``presets``); ``owner/name`` is fetched from the Hugging Face
    hub (``HUB_FILES``: config, generation config, weights, and every file the tokenizer and chat
    template need), which needs ``huggingface_hub`` and network or a warm HF cache.

    ``quantization`` (``--quantization``): "gguf" keeps a GGUF file's 4-bit weights quantized
    (``gguf_file.materialize_gguf``); ConfigError for another value or a model that is no GGUF file.
    """
    from gpu_workers.model.quantization import METHODS

    path = Path(spec).expanduser()
    if quantization is not None:
        if quantization not in METHODS:
            raise ConfigError(f"--quantization {quantization!r}: one of {', '.join(METHODS)}")
        if path.is_dir() and (path / GGUF_LINK).exists():  # a directory materialized from a GGUF file
            path = (path / GGUF_LINK).resolve()
        if not path.is_file():
            raise ConfigError(f"--quantization {quantization} needs a .gguf model file, not {spec!r}")
    if path.is_dir():
        return path
    if path.is_file():
        from gpu_workers.model.gguf_file import is_gguf, materialize_gguf
        from gpu_workers.model.presets import default_cache_dir

        if not is_gguf(path):
            raise ConfigError(f"model {spec!r}: a file, but not a GGUF file (pass a model directory or a .gguf file)")
        return materialize_gguf(path, cache_dir=default_cache_dir(), quantization=quantization)
    if spec.startswith("random:"):
        from gpu_workers.model.presets import materialize

        return materialize(spec.removeprefix("random:"))
    if not _HUB_ID.match(spec):
        raise ConfigError(f"model {spec!r}: no such directory, and not random:<preset> or a hub id (owner/name)")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise ConfigError(
            f"model {spec!r}: no such directory, and huggingface_hub is not installed to fetch it "
            "from the hub; download it and pass its directory"
        ) from None
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    try:
        return Path(snapshot_download(spec, allow_patterns=list(HUB_FILES)))
    except Exception as e:  # noqa: BLE001 - hub errors have many types; all mean "not available"
        why = "offline (HF_HUB_OFFLINE is set) and not in the local Hugging Face cache" if offline else str(e)
        raise ConfigError(
            f"model {spec!r}: no such directory, and fetching it from the Hugging Face hub failed: {why}"
        ) from None


class CheckpointTensor:
    """A tensor in an open safetensors file; ``narrow`` is free, ``load`` reads just that part."""

    def __init__(self, file_slice: Any, shape: tuple[int, ...], ranges: tuple[slice, ...] | None = None) -> None:
        self._slice = file_slice
        self._shape = shape
        self._ranges = ranges or tuple(slice(0, n) for n in shape)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(r.stop - r.start for r in self._ranges)

    def narrow(self, dim: int, start: int, length: int) -> CheckpointTensor:
        r = self._ranges[dim]
        if start < 0 or r.start + start + length > r.stop:
            raise ValueError(f"narrow({dim}, {start}, {length}) outside shape {self.shape}")
        ranges = list(self._ranges)
        ranges[dim] = slice(r.start + start, r.start + start + length)
        return CheckpointTensor(self._slice, self._shape, tuple(ranges))

    def load(self) -> torch.Tensor:
        if not self._shape:
            return self._slice[...]
        return self._slice[self._ranges]


def checkpoint_files(model_dir: Path) -> dict[str, Path]:
    """Tensor name -> file holding it, from the index of a sharded checkpoint or the single file."""
    model_dir = Path(model_dir)
    index = model_dir / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ConfigError(f"{index}: unreadable index: {e}") from None
        files = {name: model_dir / file for name, file in weight_map.items()}
        for file in set(files.values()):
            if not file.is_file():
                raise ConfigError(f"{index} names {file.name}, which is missing")
        return files
    single = model_dir / SINGLE_FILE
    if single.is_file():
        with safe_open(single, framework="pt") as f:
            return {name: single for name in f.keys()}  # noqa: SIM118 - a safetensors handle, not a dict
    raise ConfigError(f"{model_dir}: no {SINGLE_FILE} or {INDEX_FILE} (only safetensors checkpoints are supported)")


def load_weights(model: nn.Module, model_dir: Path) -> None:
    """Fill ``model``'s parameters from the checkpoint in ``model_dir``, each rank its own shards.

    The model says which checkpoint tensors it needs (``checkpoint_map``); the checkpoint must hold
    exactly those, apart from recomputed buffers, an ``lm_head.weight`` the config ties to the
    embedding, and what the model says is not its own (``ignored_checkpoint_tensors``: a multimodal
    checkpoint's vision tower). Both kinds of mismatch are reported by name before anything is read.
    """
    began = time.perf_counter()
    if (Path(model_dir) / GGUF_LINK).exists():
        _load_gguf_weights(model, Path(model_dir))
        log.info("loaded %s in %.1fs", (Path(model_dir) / GGUF_LINK).resolve(), time.perf_counter() - began)
        return
    files = checkpoint_files(model_dir)
    wanted: dict[str, tuple[str, Any]] = model.checkpoint_map()  # type: ignore[operator]
    tied = getattr(getattr(model, "config", None), "tie_word_embeddings", False)
    ignored = getattr(model, "ignored_checkpoint_tensors", lambda name: False)
    present = {n for n in files if not n.endswith(IGNORED_SUFFIXES) and not (tied and n.endswith("lm_head.weight"))
               and not ignored(n)}
    missing = sorted(set(wanted) - present)
    unexpected = sorted(present - set(wanted))
    if missing or unexpected:
        problems = []
        if missing:
            problems.append(f"missing tensors: {_names(missing)}")
        if unexpected:
            problems.append(f"unexpected tensors: {_names(unexpected)}")
        raise ConfigError(f"{model_dir}: checkpoint does not match the model: {'; '.join(problems)}")

    params = dict(model.named_parameters())
    with ExitStack() as stack:
        handles = {
            file: stack.enter_context(safe_open(file, framework="pt", device="cpu"))
            for file in sorted({files[n] for n in wanted})
        }
        for name, (param_name, shard_id) in track(wanted.items(), total=len(wanted), what="loading weights"):
            file_slice = handles[files[name]].get_slice(name)
            tensor = CheckpointTensor(file_slice, tuple(file_slice.get_shape()))
            param = params[param_name]
            loader = getattr(param, "weight_loader", default_weight_loader)
            try:
                loader(param, tensor, shard_id)
            except (ValueError, RuntimeError) as e:
                raise ConfigError(f"{model_dir}: tensor {name}: {e}") from None
    size = sum(p.numel() * p.element_size() for p in params.values())
    log.info(
        "loaded %d tensors (%.2f GB as %s) from %s in %.1fs",
        len(wanted), size / 1e9, next(iter(params.values())).dtype, model_dir, time.perf_counter() - began,
    )


def _load_gguf_weights(model: nn.Module, model_dir: Path) -> None:
    """``load_weights`` for a directory materialized from a GGUF file: each rank dequantizes only
    the rows (and block-aligned columns) of its shards. With ``quantization_config`` "gguf", the
    linear layers whose tensors are all of a 4-bit type stay 4-bit, those of 5- to 8-bit types (or
    4-bit parts fused with them), the embedding and an untied LM head 8-bit (``load_quantized``,
    ``_quantized_weights``); the others, and norms, are dequantized."""
    from gpu_workers.model.gguf_file import gguf_tensors, open_reader

    source = (model_dir / GGUF_LINK).resolve()
    config = json.loads((model_dir / "config.json").read_text())
    reader = open_reader(source)
    wanted: dict[str, tuple[str, Any]] = model.checkpoint_map()  # type: ignore[operator]
    tensors = gguf_tensors(reader, config, list(wanted), source=source)
    params = dict(model.named_parameters())
    quantized = _quantized_weights(model, tensors, wanted) if "quantization_config" in config else {}
    for name, (param_name, shard_id) in wanted.items():
        if param_name in quantized:
            continue
        param = params[param_name]
        loader = getattr(param, "weight_loader", default_weight_loader)
        try:
            loader(param, tensors[name], shard_id)
        except (ValueError, RuntimeError) as e:
            raise ConfigError(f"{source}: tensor {name}: {e}") from None
    for param_name, (kind, parts) in quantized.items():
        module = model.get_submodule(param_name.rpartition(".")[0])
        try:
            if isinstance(module, LinearBase):
                module.load_quantized(parts, kind=kind)
            else:
                assert isinstance(module, VocabParallelEmbedding) and kind is Int8Weight
                module.load_quantized(parts, kind=kind)
        except (ValueError, RuntimeError) as e:
            raise ConfigError(f"{source}: {param_name} kept quantized (--quantization gguf): {e}") from None
    if quantized:
        log.info("--quantization gguf: of %d linear and embedding weights, %d kept 4-bit and %d 8-bit",
                 sum(1 for m in model.modules() if isinstance(m, LinearBase | VocabParallelEmbedding)),
                 sum(kind is Int4Weight for kind, _ in quantized.values()),
                 sum(kind is Int8Weight for kind, _ in quantized.values()))


def _quantized_weights(model: nn.Module, tensors: dict[str, Any], wanted: dict[str, tuple[str, Any]]
                       ) -> dict[str, tuple[type[Int4Weight | Int8Weight], list[tuple[Any, Any]]]]:
    """Parameter name -> (how it is kept, its (GGUF tensor, shard id) parts), for each linear,
    embedding or LM head weight whose shard's columns are whole 32-weight blocks and whose parts are
    all of a 4-bit type (``quantization.int4_types``: Int4Weight, for linear layers; where
    ``quant_kernels`` does not build, of whole row blocks of torch's int4 kernel), or else all of
    ``int8_types`` (Int8Weight, where ``quant_kernels`` builds). ConfigError
    off the CPU: the kernels are CPU ones."""
    from gpu_workers.model import quant_kernels
    from gpu_workers.model.quantization import GROUP_SIZE, int4_types, int8_types, torch_int4_row_block

    parts: dict[str, list[tuple[Any, Any]]] = {}
    for name, (param_name, shard_id) in wanted.items():
        parts.setdefault(param_name, []).append((tensors[name], shard_id))
    kept: dict[str, tuple[type[Int4Weight | Int8Weight], list[tuple[Any, Any]]]] = {}
    for param_name, items in parts.items():
        module = model.get_submodule(param_name.rpartition(".")[0])
        if not (isinstance(module, LinearBase | VocabParallelEmbedding) and param_name.endswith(".weight")
                and module.weight.shape[1] % GROUP_SIZE == 0):
            continue
        types = {t.tensor_type for t, _ in items}
        # embeddings and LM heads: Int8Weight (row lookups); torch's int4 kernel (Int4Weight's
        # fallback without a C compiler) packs 32 or 64 rows together
        int4 = isinstance(module, LinearBase) and (quant_kernels.load() is not None
                                                   or module.weight.shape[0] % torch_int4_row_block() == 0)
        kind = Int4Weight if int4 and types <= int4_types() else Int8Weight if types <= int8_types() else None
        if kind is None or (kind is Int8Weight and quant_kernels.load() is None):
            continue
        if module.weight.device.type != "cpu":
            raise ConfigError("--quantization gguf runs on CPUs only (the int4 and int8 kernels are CPU ones)")
        kept[param_name] = (kind, items)
    return kept


def _names(names: list[str], limit: int = 8) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")
