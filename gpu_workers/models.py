"""Engines from a ``--model SPEC``: ``echo`` here; model directories and ``random:<preset>`` plug in
through the same function when the model engine lands."""

from __future__ import annotations

from dataclasses import dataclass

from broker.errors import ConfigError
from gpu_workers.engine import Engine

KV_DTYPES = ("fp8_e4m3", "fp8_e5m2", "bf16", "fp16", "fp32")


@dataclass(frozen=True, slots=True)
class EngineOptions:
    tp: int = 1
    kv_dtype: str = "fp8_e4m3"
    kv_memory: str | None = None
    device: str = "cpu"
    echo_token_delay_ms: float = 0.0  # the echo engine's time per step (see Settings)


def build_engine(spec: str, options: EngineOptions) -> Engine:
    """The engine named by ``spec``; ConfigError with the reason when it cannot be built."""
    if spec == "echo":
        if options.tp != 1:
            raise ConfigError("--model echo runs on one process: --tp must be 1")
        from gpu_workers.echo import EchoEngine

        return EchoEngine(token_delay_s=options.echo_token_delay_ms / 1000.0)
    raise ConfigError(
        f"model {spec!r}: this build serves only the diagnostic 'echo' engine; the Llama-family "
        "engine (model directories and random:<preset>) is not part of it yet"
    )
