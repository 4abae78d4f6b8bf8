"""The requests a worker group holds: which wait (by priority), which run, which time out next.

Plain Python, one owner (the group loop), no Redis and no engine: unit-tested with time passed in.
A request is *queued* until the loop starts it in the engine, then *running* until it ends; priority
orders the queued ones (lower first, then arrival), and a heap of deadlines finds the expired ones
without scanning everything held. Heaps are cleaned lazily: an entry whose request has gone (or came
again with a newer epoch, a new ``seq``) is skipped when it surfaces.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from broker.protocol import GenerationRequest
from gpu_workers.output import OutputState

Event = tuple[str, int, dict[str, str]]  # (kind 't'/'f', token index, fields) for PUBLISH


@dataclass(slots=True)
class Held:
    """A request this group has read from its queue and not yet finished."""

    entry_id: bytes
    request: GenerationRequest
    epoch: int
    cost: int = 0  # prompt + max_tokens, as the balancer counted it in the queue's token counter
    seq: int = 0  # arrival order here (set by Holding.add): ties in priority go first come, first served
    prompt_ids: list[int] = field(default_factory=list)
    output: OutputState | None = None  # None only when the prompt could not even be tokenized
    # A request with several completions (n > 1 or best_of): one output state each, ``output`` the
    # first; empty for a request with one.
    choices: list[OutputState] = field(default_factory=list)
    # Rendered prompt logprobs (broker.protocol.token_logprobs per prompt token), once computed.
    prompt_logprobs: list[dict[str, Any] | None] | None = None
    events: list[Event] = field(default_factory=list)  # produced, not yet published
    final: bool = False
    running: bool = False  # in the engine now
    # Redis-clock milliseconds: first started in the engine here, first token generated here.
    started_ms: float | None = None
    first_token_ms: float | None = None

    def served(self, *, model: str, group: str, now_ms: float) -> dict[str, str]:
        """The done event's ``served`` fields (broker.events.done_event)."""
        out = {"model": model, "group": group}
        enqueued = self.request.enqueued_ms
        for name, at in (("queue_s", self.started_ms), ("ttft_s", self.first_token_ms), ("total_s", now_ms)):
            if at is not None and enqueued:
                out[name] = f"{max(0.0, at - enqueued) / 1000:.6f}"
        return out

    @property
    def tokens(self) -> int:
        """Tokens in the engine's KV cache while it runs: prompt + generated (by every completion)."""
        if self.choices:
            return len(self.prompt_ids) + sum(len(o.token_ids) for o in self.choices)
        return len(self.prompt_ids) + (len(self.output.token_ids) if self.output is not None else 0)

    def engine_ids(self, *, unfinished: bool = False) -> list[str]:
        """The ids this request has in the engine: its own, or one per completion (``engine_id``);
        ``unfinished``: only those of completions still generating."""
        if not self.choices:
            return [self.request.id]
        return [engine_id(self.request.id, c) for c, o in enumerate(self.choices)
                if not (unfinished and o.finished)]


CHOICE_SEPARATOR = "#"  # never in a request id (broker.protocol.ID_RE)


def engine_id(request_id: str, choice: int) -> str:
    """The engine's id for completion ``choice`` of a request with several."""
    return f"{request_id}{CHOICE_SEPARATOR}{choice}"


def split_engine_id(engine_request_id: str) -> tuple[str, int | None]:
    """(request id, completion) of an engine id; None for a request with one completion."""
    request_id, sep, choice = engine_request_id.rpartition(CHOICE_SEPARATOR)
    return (request_id, int(choice)) if sep else (engine_request_id, None)


class Holding:
    def __init__(self) -> None:
        self.held: dict[str, Held] = {}
        self.running: set[str] = set()
        self._queued: list[tuple[int, int, int, str]] = []  # heap: (priority, enqueued_ms, seq, id)
        self._deadlines: list[tuple[float, int, str]] = []  # heap: (deadline ms, seq, id)
        self._seq = 0

    def __len__(self) -> int:
        return len(self.held)

    def __contains__(self, request_id: str) -> bool:
        return request_id in self.held

    def get(self, request_id: str) -> Held | None:
        return self.held.get(request_id)

    def values(self) -> list[Held]:
        return list(self.held.values())

    def add(self, held: Held) -> None:
        """Hold a new request (not queued yet: see ``queue``)."""
        self._seq += 1
        held.seq = self._seq
        self.held[held.request.id] = held

    def queue(self, held: Held) -> None:
        """Wait for the engine; also from the engine back to waiting."""
        request = held.request
        heapq.heappush(self._queued, (request.priority, request.enqueued_ms, held.seq, request.id))
        if request.deadline_ms is not None:
            heapq.heappush(self._deadlines, (request.deadline_ms, held.seq, request.id))

    def next_queued(self) -> Held | None:
        """The queued request to start next, taken off the queue."""
        while self._queued:
            _priority, _enqueued, seq, rid = heapq.heappop(self._queued)
            held = self.held.get(rid)
            if held is not None and held.seq == seq and not held.final and not held.running:
                return held
        return None

    def expired(self, now_ms: float) -> Iterator[Held]:
        """Unfinished requests whose deadline is ``now_ms`` or earlier."""
        while self._deadlines and self._deadlines[0][0] <= now_ms:
            _deadline, seq, rid = heapq.heappop(self._deadlines)
            held = self.held.get(rid)
            if held is not None and held.seq == seq and not held.final:
                yield held

    def started(self, held: Held) -> None:
        held.running = True
        self.running.add(held.request.id)

    def stopped(self, held: Held) -> None:
        held.running = False
        self.running.discard(held.request.id)

    def forget(self, held: Held) -> None:
        if self.held.get(held.request.id) is held:
            del self.held[held.request.id]
        self.running.discard(held.request.id)

    def clear(self) -> None:
        self.held.clear()
        self.running.clear()
        self._queued.clear()
        self._deadlines.clear()

    def waiting(self) -> list[Held]:
        """Held, not running and not finished: queued for the engine (or parked while isolating)."""
        return [h for h in self.held.values() if not h.running and not h.final]

    def tokens(self) -> tuple[int, int]:
        """(queued tokens: their cost, running tokens: prompt + generated)."""
        queued = running = 0
        for held in self.held.values():
            if held.running:
                running += held.tokens
            elif not held.final:
                queued += held.cost
        return queued, running
