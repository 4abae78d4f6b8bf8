"""Helpers for tests that drive worker groups and balancers in-process on the real test Redis."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any

from broker.events import FINAL_EVENTS
from broker.keys import QUEUE_GROUP, Keys
from broker.lua import queue_signature
from broker.protocol import GenerationRequest, SamplingParams
from broker.scripts import Scripts, claim_result
from broker.signing import SigningKey

TTL_MS = 60_000


class FakeMonotonic:
    """A monotonic clock that moves only when told to."""

    def __init__(self, start: float = 1000.0) -> None:
        self.t = start

    def __call__(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds


class FakeClock:
    """Stands in for RedisClock: milliseconds on the 'Redis' clock, set by the test."""

    def __init__(self, ms: float) -> None:
        self.ms = ms

    def now_ms(self) -> float:
        return self.ms


def make_request(keys: Keys, rid: str, prompt: str | None = "hello", *,
                 prompt_ids: Sequence[int] | None = None, max_tokens: int = 64, stop: Sequence[str] = (),
                 stream: bool = True, timeout_s: float | None = None, enqueued_ms: int = 0,
                 reply_to: str | None = None, priority: int = 0) -> GenerationRequest:
    return GenerationRequest(
        id=rid,
        prompt=prompt if prompt_ids is None else None,
        prompt_ids=tuple(prompt_ids) if prompt_ids is not None else None,
        sampling=SamplingParams(max_tokens=max_tokens, stop=tuple(stop)),
        stream=stream,
        priority=priority,
        timeout_s=timeout_s,
        reply_to=reply_to or keys.result(rid),
        enqueued_ms=enqueued_ms,
    )


def state_key(keys: Keys, request: GenerationRequest) -> str:
    """The request's state hash (the one place these tests name it)."""
    return keys.state(request.reply_to, request.id)


def dispatch(r: Any, keys: Keys, group: str, request: GenerationRequest, epoch: int, *, cost: int = 0) -> bytes:
    """DISPATCH ``request`` at ``epoch`` (no queue bounds); the entry id."""
    status = Scripts(r).dispatch(
        queue=keys.group_queue(group), marker=keys.dispatch_marker(group, request.id, epoch),
        accepting=keys.group_accepting(group), queue_tokens=keys.group_queue_tokens(group),
        request=request.to_wire(), epoch=epoch, marker_ttl_ms=TTL_MS, cost=cost,
        signing_key=SigningKey(r, keys).get(),
    )
    assert status[0] == b"ok", status
    return bytes(status[1])


def queue_fields(r: Any, keys: Keys, request: GenerationRequest, epoch: int, cost: int = 0) -> dict[str, Any]:
    """The fields of a queue entry as a balancer signs it (for tests that XADD one by hand)."""
    wire = request.to_wire()
    return {"r": wire, "e": str(epoch), "c": str(cost),
            "s": queue_signature(SigningKey(r, keys).get(), wire, epoch, cost)}


def enqueue(r: Any, keys: Keys, group: str, request: GenerationRequest, *, cost: int = 0) -> int:
    """Route ``request`` to ``group`` the way a balancer does (CLAIM_OWNER, then DISPATCH); its epoch."""
    claim = claim_result(Scripts(r).claim_owner(progress=keys.progress(request.reply_to, request.id),
                                                group=group, ttl_ms=TTL_MS))
    assert claim.owner == group and not claim.finished
    dispatch(r, keys, group, request, claim.epoch, cost=cost)
    return claim.epoch


def take_over(
        r: Any, keys: Keys, request: GenerationRequest, *, to: str, frm: str, epoch: int) -> tuple[str, int]:
    """CLAIM_OWNER with takeover: (owner, epoch) afterwards."""
    claim = claim_result(Scripts(r).claim_owner(progress=keys.progress(request.reply_to, request.id),
                                                group=to, ttl_ms=TTL_MS, taken_from=frm, taken_from_epoch=epoch))
    return claim.owner, claim.epoch


def events(r: Any, stream: str) -> list[dict[str, str]]:
    return [{k.decode(): v.decode() for k, v in fields.items()} for _id, fields in r.xrange(stream)]


def finals(evs: list[dict[str, str]]) -> list[dict[str, str]]:
    return [e for e in evs if e["event"] in FINAL_EVENTS]


def tokens(evs: list[dict[str, str]]) -> list[dict[str, str]]:
    return [e for e in evs if e["event"] == "token"]


def assert_one_clean_completion(evs: list[dict[str, str]], *, text: str | None = None,
                                stream: bool = True) -> dict[str, str]:
    """Exactly one final event, last; token indices 0..n-1 once each and in order; joined deltas = text."""
    assert len(finals(evs)) == 1, evs
    final = evs[-1]
    assert final["event"] in FINAL_EVENTS
    toks = tokens(evs)
    assert [int(e["index"]) for e in toks] == list(range(len(toks)))
    if final["event"] == "done":
        ids = json.loads(final["token_ids"])
        assert int(final["completion_tokens"]) == len(ids)
        if stream:
            assert [int(e["token_id"]) for e in toks] == ids
            assert "".join(e["text"] for e in toks) == final["text"]
        else:
            assert toks == []
        if text is not None:
            assert final["text"] == text
    return final


def pending(r: Any, keys: Keys, group: str) -> int:
    return int(r.xpending(keys.group_queue(group), QUEUE_GROUP)["pending"])


def run_until(step: Callable[[], None], done: Callable[[], bool], *, limit: int = 200) -> int:
    """Call ``step`` until ``done()``; how many calls it took."""
    for n in range(limit):
        if done():
            return n
        step()
    raise AssertionError(f"not done after {limit} steps")
