"""Admission control: what a request costs, and whether a queue has room for it.

The bounds (``group_max_*``, ``total_max_*`` in broker.settings) are counted in requests and in
tokens; a request's tokens are its prompt (token ids, or UTF-8 bytes before tokenizing, which bound
the token count of byte-level tokenizers) plus ``max_tokens``, at most the model's context.
DISPATCH applies the per-group bounds exactly, in Redis; the balancer checks the same bounds on its
own view first (the last queue reading plus what it sent since), so that a request no group has room
for gets ``overloaded`` at once, without a round trip per group.
"""

from __future__ import annotations

from dataclasses import dataclass

from broker.protocol import GenerationRequest
from broker.settings import Settings


@dataclass(frozen=True, slots=True)
class Limits:
    group_requests: int
    group_tokens: int
    total_requests: int
    total_tokens: int

    @classmethod
    def from_settings(cls, settings: Settings) -> Limits:
        return cls(settings.group_max_requests, settings.group_max_tokens, settings.total_max_requests,
                   settings.total_max_tokens)


def request_cost(request: GenerationRequest, *, max_context: int) -> int:
    """Tokens the request may occupy: prompt + max_tokens, at most ``max_context`` (and at least 1);
    each further completion of a request with several (``best_of``, else ``n``) adds its max_tokens
    (they share the prompt's KV blocks)."""
    if request.prompt_ids is not None:
        prompt = len(request.prompt_ids)
    else:
        prompt = len((request.prompt or "").encode("utf-8", "surrogatepass"))
    max_tokens = request.sampling.max_tokens
    more = (request.sampling.num_sequences - 1) * min(max_tokens, max_context)
    return max(1, min(prompt + max_tokens, max_context)) + more


def has_room(requests: int, tokens: int, cost: int, *, max_requests: int, max_tokens: int) -> bool:
    """Whether a queue holding ``requests`` / ``tokens`` takes one more of ``cost``. An empty queue
    takes any request, so that one larger than the token bound is still served (alone)."""
    if requests <= 0:
        return True
    return requests + 1 <= max_requests and tokens + cost <= max_tokens
