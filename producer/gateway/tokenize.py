"""The gateway's ``/tokenize`` and ``/detokenize`` (vLLM's endpoints and shapes), with the tokenizer
the worker groups of the model publish in the registry (broker.tokenizers): the ids they give.

- ``POST /tokenize`` ``{"model", "prompt"}`` or ``{"model", "messages"}`` (rendered with the chat
  template, as ``/v1/chat/completions`` renders them) -> ``{"tokens", "count", "max_model_len"}``.
  ``add_special_tokens`` (default true) adds what the tokenizer's post-processor adds (a BOS), never
  twice: what a worker group does with a prompt.
- ``POST /detokenize`` ``{"model", "tokens"}`` -> ``{"prompt"}`` (special tokens skipped, as the
  worker groups' text).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, ValidationError
from redis.asyncio import Redis as AsyncRedis

from broker.errors import RyzansteinError
from broker.keys import Keys
from broker.registry import GroupStatus
from broker.tokenizers import tokenizer_text
from producer.gateway.errors import ApiError

if TYPE_CHECKING:
    from gpu_workers.engine import Tokenizer


class TokenizeBody(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str
    prompt: str | None = None
    messages: list[Any] | None = None
    add_special_tokens: bool = True


class DetokenizeBody(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str
    tokens: list[int]


def parse_body(model: type[BaseModel], raw: dict[str, Any]) -> Any:
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        err = exc.errors()[0]
        param = str(err["loc"][0]) if err["loc"] else None
        raise ApiError("invalid_request", f"field '{param or 'body'}': {err['msg']}", param) from None


class TokenizerCache:
    """The tokenizers read from the registry, by digest (a tokenizer is loaded once)."""

    def __init__(self) -> None:
        self._by_digest: dict[str, Tokenizer] = {}

    async def for_group(self, redis: AsyncRedis, keys: Keys, group: GroupStatus) -> Tokenizer:
        """The tokenizer ``group`` publishes; ApiError when it publishes none or Redis lacks it."""
        digest = group.tokenizer
        if not digest:
            raise ApiError("invalid_request", f"the worker groups of model {group.model!r} publish no tokenizer "
                                              "(an older version of ryzanstein)")
        if (cached := self._by_digest.get(digest)) is not None:
            return cached
        spec = tokenizer_text(await redis.get(keys.tokenizer(digest)), digest)
        if spec is None:
            raise ApiError("unavailable", f"the tokenizer of model {group.model!r} ({digest[:12]}) is not in Redis")
        # the worker groups' own tokenizer classes (tokenizers' Rust, no torch), only once one is needed
        from gpu_workers.hf_tokenizer import tokenizer_from_spec

        try:
            tokenizer = tokenizer_from_spec(spec)
        except RyzansteinError as exc:
            raise ApiError("internal", str(exc)) from None
        self._by_digest[digest] = tokenizer
        return tokenizer
