"""What a balancer holds between reading an ingress entry and acknowledging it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from broker.events import choice_entry, done_event
from broker.protocol import GenerationRequest
from broker.scripts import Claim, claim_result


@dataclass(slots=True)
class Waiting:
    """An ingress entry read but not yet dispatched (no group yet, or re-routing)."""

    entry_id: bytes
    request: GenerationRequest
    since_ms: float  # when it started waiting (Redis clock)
    takeover_from: str | None = None
    takeover_epoch: int = 0
    # Moved from a failed or draining group: accepted before, so admitted past the queue bounds.
    moved: bool = False
    prefix: str | None = None  # affinity key of the prompt's prefix
    cost: int = 1  # tokens it may occupy (admission.request_cost), once a group is in view
    claimed: bool = False  # a claim was tried: the next dispatch waits for the claim's answer
    model_resolved: bool = False  # request.model names a model some group serves (balancer.models)
    held: bool = False  # its id is held (balancer.request_ids), or it needs no hold (moved)


@dataclass(slots=True)
class Final:
    """A final event the balancer itself writes (invalid, cancelled, timed out, overloaded, no group)."""

    entry_id: bytes
    request_id: str
    reply_to: str
    fields: dict[str, str]
    takeover_from: str | None = None
    takeover_epoch: int = 0
    hold: bool = False  # the entry's id is held with its claim (a new request's: balancer.request_ids)
    invalid: bool = False  # the entry failed validation (a duplicate of it goes to {p}:dead)

    def with_progress(self, claim: Claim) -> dict[str, str]:
        """A cancellation of a request that moved mid-stream reports what its stream carried."""
        if self.fields.get("finish_reason") != "cancelled" or not (claim.output_ids or claim.choice_ids):
            return self.fields
        prompt_tokens = int(self.fields.get("prompt_tokens", "0"))
        if claim.choice_ids:  # several completions: each as far as its stream went
            choices = [choice_entry(c, text=text, token_ids=list(ids), finish_reason="cancelled")
                       for c, (ids, text) in enumerate(zip(claim.choice_ids, claim.choice_texts))]
            return done_event(self.request_id, text=choices[0]["text"], token_ids=choices[0]["token_ids"],
                              finish_reason="cancelled", prompt_tokens=prompt_tokens, choices=choices)
        return done_event(self.request_id, text=claim.output_text, token_ids=list(claim.output_ids),
                          finish_reason="cancelled", prompt_tokens=prompt_tokens)


def claim_reply(raw: Any) -> Claim | Exception:
    """A CLAIM_OWNER reply, or the problem with it (an error reply, or a reply of another shape)."""
    if isinstance(raw, Exception):
        return raw
    try:
        return claim_result(raw)
    except Exception as exc:  # noqa: BLE001 - an unexpected reply ends that request, never the loop
        return TypeError(f"CLAIM_OWNER replied {raw!r:.80} ({type(exc).__name__})")
