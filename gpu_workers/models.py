"""Engines from a ``--model SPEC``: ``echo``, ``random:<preset>`` or a Hugging Face model directory
(or hub id, fetched when the machine is online)."""

from __future__ import annotations

from dataclasses import dataclass

from broker.errors import ConfigError
from gpu_workers.engine import Engine

# fp8 formats keep one scale per block per KV head; fp8_e4m3_per_tensor one static scale per layer
# (vLLM's uncalibrated default), offered for comparison (gpu_workers/model/kv_cache.py)
KV_DTYPES = ("fp8_e4m3", "fp8_e5m2", "fp8_e4m3_per_tensor", "bf16", "fp16", "fp32")


@dataclass(frozen=True, slots=True)
class EngineOptions:
    tp: int = 1
    kv_dtype: str = "fp8_e4m3"
    kv_memory: str | None = None
    device: str = "cpu"


def build_engine(spec: str, options: EngineOptions) -> Engine:
    """The engine named by ``spec``; ConfigError with the reason when it cannot be built."""
    if spec == "echo":
        if options.tp != 1:
            raise ConfigError("--model echo runs on one process: --tp must be 1")
        from gpu_workers.echo import EchoEngine

        return EchoEngine()
    if options.tp != 1:
        raise ConfigError(f"--tp {options.tp}: tensor-parallel groups are not part of this build yet; use --tp 1")
    from gpu_workers.llm_engine import LlamaEngine, LlamaEngineOptions
    from gpu_workers.model.loader import resolve_model
    from gpu_workers.model.presets import materialize

    if spec.startswith("random:"):
        model_dir = materialize(spec.removeprefix("random:"))
    else:
        model_dir = resolve_model(spec)
    return LlamaEngine(model_dir, name=spec, options=LlamaEngineOptions(
        kv_dtype=options.kv_dtype, kv_memory=options.kv_memory, device=options.device,
    ))
