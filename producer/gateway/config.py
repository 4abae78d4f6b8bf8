"""The gateway's options (light: the CLI imports it to build ``--help`` without loading the web stack)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class GatewayConfig:
    """What ``ryzanstein gateway`` takes besides the connection."""

    request_timeout_s: float = 600.0  # server-side deadline of every request (timeout_s), at most
    max_concurrency: int = 256  # requests in flight through this gateway; more get 429
    chat_max_tokens: int = 1024  # ceiling for chat requests that set no max_tokens: they get the rest of the context
    chat_template: str | None = None  # a model directory, tokenizer_config.json or Jinja file
    api_keys: tuple[str, ...] = ()  # with any, /v1 needs "Authorization: Bearer <one of them>"
