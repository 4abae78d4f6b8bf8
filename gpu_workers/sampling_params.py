"""The engine's own request types: how to pick a request's tokens (``SamplingParams``), what its
output must match (``StructuredSpec``), and the error for a request the engine can never run
(``EngineRequestError``).

These hold exactly what the engine, the sampler, the logits processors and structured output read;
the service's wire types (``broker.protocol.SamplingParams``, ``broker.structured.StructuredOutput``)
carry more (stop strings, ``n``/``best_of``, ``fit_max_tokens``, which the group loop handles) and
are mapped to these at the boundary (gpu_workers.engine_mapping). Nothing here validates: the
service has validated every bound before a request reaches an engine (docs/PROTOCOL.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

# What a StructuredSpec's ``spec`` is: a JSON schema, any JSON object, a regex, a JSON array of
# choices, or an EBNF/Lark grammar (gpu_workers.structured_output.grammar_of).
StructuredKind = Literal["json", "json_object", "regex", "choice", "grammar"]


class EngineRequestError(ValueError):
    """A request the engine can never run as asked (it could never fit in the KV cache, its grammar
    does not compile for this model). The message names the field or limit and the problem; the
    service answers it as ``invalid_request``."""


@dataclass(frozen=True, slots=True)
class StructuredSpec:
    """What a completion must match: ``kind`` and its ``spec`` (as ``StructuredKind`` says);
    ``field``: the request field it came from, named in error messages."""

    kind: StructuredKind
    spec: str = ""
    field: str = "guided_json"


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """How the engine picks one sequence's tokens, with vLLM's meanings (docs/PROTOCOL.md,
    "Sampling controls", "Logprobs", "Structured output")."""

    max_tokens: int = 16  # generated tokens, at most (tokens generated elsewhere included)
    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    seed: int | None = None  # None: the engine draws one at admission
    stop_token_ids: tuple[int, ...] = ()  # end on any of them (as EOS does)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    min_p: float = 0.0
    min_tokens: int = 0  # EOS and stop_token_ids are masked before this many tokens
    ignore_eos: bool = False
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias)
    bad_words: tuple[str, ...] = ()  # texts never generated (tokenized by the engine)
    logprobs: bool = False  # report each generated token's logprob
    top_logprobs: int = 0  # and this many likeliest alternatives
    prompt_logprobs: int | None = None  # the prompt tokens' logprobs with this many alternatives (None: not asked)
    structured: StructuredSpec | None = None  # what the output must match (None: anything)
