"""The engine interface a worker group drives, whatever generates the tokens.

The group loop (gpu_workers.group) owns Redis, detokenization, stop strings and limits; an engine
owns only token generation: requests join (``add``), every ``step`` advances each running request by
at most one token, and requests leave when the engine finishes them or the loop ``abort``s them.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Protocol

from gpu_workers.sampling_params import SamplingParams

# A worker process whose engine raised ``broker.errors.EngineFailed`` (a tensor-parallel rank died
# or hangs) exits with this code, having published nothing more and left its work to failover.
EXIT_ENGINE_FAILED = 4


@dataclass(frozen=True, slots=True)
class EngineInfo:
    model: str  # what `status` shows
    vocab_size: int  # token ids must be below this
    max_context: int  # prompt + generated tokens, at most
    eos_token_ids: frozenset[int] = frozenset()
    tp: int = 1
    kv_dtype: str = "none"
    # What each rank of the group holds, in rank order (empty for engines without a model).
    rank_weight_bytes: tuple[int, ...] = ()
    rank_kv_bytes: tuple[int, ...] = ()
    rank_hosts: tuple[str, ...] = ()  # the host name of each rank
    # What clients need to render chat for this model (published in the registry): the template's
    # Jinja source (None: the model has none) and the special tokens' texts it may write.
    chat_template: str | None = None
    bos_token: str = ""
    eos_token: str = ""


@dataclass(slots=True)
class EngineRequest:
    request_id: str
    prompt_ids: list[int]
    sampling: SamplingParams
    priority: int = 0
    # When the request times out, in seconds on the service's clock (Redis TIME), or None: among equal
    # priorities the earlier deadline starts first. Only ever compared with other requests' deadlines.
    deadline: float | None = None
    # Tokens already generated (and published) elsewhere: generation continues after them.
    output_ids: list[int] = field(default_factory=list)
    # Another request of this engine with the same prompt (a completion of the same n > 1 request):
    # this one starts only once that one has computed the prompt (produced a token) or has gone, so
    # that the prompt's full KV blocks come from the prefix cache instead of a second prefill.
    shares_prefix_with: str | None = None


@dataclass(frozen=True, slots=True)
class TokenLogprobs:
    """A generated token's log-probability (natural log) and the likeliest alternatives, from the
    distribution it was drawn from (gpu_workers.sampler.sample_with_logprobs)."""

    logprob: float
    top: tuple[tuple[int, float], ...] = ()  # (token id, logprob), likeliest first


@dataclass(frozen=True, slots=True)
class StepOutput:
    request_id: str
    token_id: int
    # Set when the engine itself ends the request with this token ("stop" for EOS-like ends).
    finish_reason: str | None = None
    # Set for requests that asked for logprobs.
    logprobs: TokenLogprobs | None = None
    # With the first token of a request that asked for prompt logprobs: one entry per prompt token,
    # None for the first (nothing predicts it), from the raw logits (no sampling controls).
    prompt_logprobs: tuple[TokenLogprobs | None, ...] | None = None


class RejectionReason(enum.Enum):
    """Why the engine dropped a request without finishing it (the service maps each to the error
    code its client sees: gpu_workers.engine_mapping)."""

    UNSERVABLE = "unservable"  # it can never run as asked (EngineRequestError: its grammar does not compile)
    FAILED = "failed"  # the engine failed on it alone (a grammar compile crashed, a token broke its grammar)


@dataclass(frozen=True, slots=True)
class Rejection:
    """A request the engine dropped without finishing it: it ends with an ``error`` event."""

    request_id: str
    reason: RejectionReason
    message: str  # for a person: names the field and the problem


@dataclass(frozen=True, slots=True)
class EngineStats:
    running: int
    waiting: int
    kv_capacity_tokens: int = 0
    kv_used_tokens: int = 0
    # Fraction of prompt tokens served from the prefix cache lately; None for engines without one.
    prefix_cache_hit_rate: float | None = None
    # Totals since the engine started: preemptions, and prompt tokens looked up in / found in the
    # prefix cache (vLLM's num_preemptions, prefix_cache_queries, prefix_cache_hits).
    num_preemptions: int = 0
    prefix_cache_queries: int = 0
    prefix_cache_hits: int = 0


class Tokenizer(Protocol):
    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        """``add_special_tokens``: what the tokenizer's post-processor adds (a BOS), as transformers'."""

    def decode(self, ids: list[int]) -> str: ...


class Engine(Protocol):
    info: EngineInfo

    @property
    def tokenizer(self) -> Tokenizer:
        """How the engine's model reads and writes text (read only: an engine's own kind may be narrower)."""

    def add(self, request: EngineRequest) -> None:
        """Admit a request; it starts generating at a later step."""

    def abort(self, request_id: str) -> None:
        """Drop a request now and free what it holds; unknown ids are ignored."""

    def step(self) -> list[StepOutput]:
        """Advance every running request by at most one token; EngineFailed when it never can again."""

    def rejected(self) -> list[Rejection]:
        """The requests dropped since the last call (each once): they end with their error. An
        engine drops a request it cannot run (its structured-output grammar does not compile for
        this model) instead of raising in ``add``, which must not wait for a compile."""

    def has_work(self) -> bool: ...

    def not_started(self) -> list[str]:
        """Ids of the requests added that no step has computed a token of yet (vLLM's never-scheduled
        waiting requests): they hold nothing here, so a draining group hands them back at once."""

    def stats(self) -> EngineStats:
        """The current load; EngineFailed once the engine has failed (so no heartbeat goes out)."""

    def close(self) -> None: ...
