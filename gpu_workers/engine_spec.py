"""Engines from a ``--model SPEC``: ``echo``, ``random:<preset>`` or a Hugging Face model directory
(or hub id, fetched when the machine is online)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from broker.errors import ConfigError
from gpu_workers.engine import Engine
from gpu_workers.model.kv_format import KV_DTYPES, KVFormat, kv_format

if TYPE_CHECKING:
    from gpu_workers.llm_engine import LlamaEngineOptions
    from gpu_workers.parallel.launch import TensorParallelGroup

__all__ = ["KV_DTYPES", "EngineOptions", "build_engine", "model_dir"]


@dataclass(frozen=True, slots=True)
class EngineOptions:
    tp: int = 1
    kv_dtype: KVFormat | str = "fp8_e4m3"  # --kv-dtype: parsed into its KVFormat here, once
    kv_memory: str | None = None  # per rank
    device: str = "cpu"
    echo_token_delay_ms: float = 0.0  # the echo engine's time per step (see Settings)
    max_num_seqs: int = 128  # a model engine's batch limits (see Settings); echo has none
    max_num_batched_tokens: int = 512
    quantization: str | None = None  # --quantization: "gguf" keeps a GGUF file's 4-bit weights 4-bit
    compilation_level: int = 0  # --compilation-config / --enforce-eager (gpu_workers.model.compilation)

    def __post_init__(self) -> None:
        """ConfigError for an unknown KV format or limits the scheduler cannot work with (before any
        model loads)."""
        object.__setattr__(self, "kv_dtype", kv_format(self.kv_dtype))
        if self.max_num_seqs < 1:
            raise ConfigError(f"--max-num-seqs (RYZ_MAX_NUM_SEQS) must be at least 1, got {self.max_num_seqs}")
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise ConfigError(
                f"--max-num-batched-tokens (RYZ_MAX_NUM_BATCHED_TOKENS) is {self.max_num_batched_tokens}: it must "
                f"be at least --max-num-seqs ({self.max_num_seqs}), so prefills progress beside a full batch of "
                "decodes")

    def llama(self) -> LlamaEngineOptions:
        from gpu_workers.llm_engine import LlamaEngineOptions

        return LlamaEngineOptions(kv_dtype=self.kv_dtype, kv_memory=self.kv_memory, device=self.device,
                                  max_num_seqs=self.max_num_seqs, max_num_batched_tokens=self.max_num_batched_tokens,
                                  compilation_level=self.compilation_level)


def model_dir(spec: str, *, quantization: str | None = None) -> Path:
    """The directory of a model ``spec`` (not ``echo``): written first for ``random:<preset>``;
    ``quantization`` as in ``loader.resolve_model``."""
    from gpu_workers.model.loader import resolve_model
    from gpu_workers.model.presets import materialize

    if spec.startswith("random:") and quantization is None:
        return materialize(spec.removeprefix("random:"))
    return resolve_model(spec, quantization=quantization)


def build_engine(spec: str, options: EngineOptions, *, group: TensorParallelGroup | None = None) -> Engine:
    """The engine named by ``spec``; ConfigError with the reason when it cannot be built.

    With ``options.tp`` > 1, ``group`` is the started tensor-parallel group this process leads.
    """
    if spec == "echo":
        if options.tp != 1 or options.quantization is not None:
            raise ConfigError("--model echo runs on one process without weights: --tp must be 1, no --quantization")
        from gpu_workers.echo import EchoEngine

        return EchoEngine(token_delay_s=options.echo_token_delay_ms / 1000.0)
    if options.tp != (group.size if group is not None else 1):
        raise ConfigError(f"--tp {options.tp} needs a started group of {options.tp} ranks (see gpu_workers.parallel)")
    from gpu_workers.llm_engine import LlamaEngine

    return LlamaEngine(model_dir(spec, quantization=options.quantization), name=spec, options=options.llama(), tp=group)
