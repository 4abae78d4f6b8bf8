"""Admission: what a request costs and whether a queue takes it."""

from __future__ import annotations

import pytest

from balancer.admission import Limits, has_room, request_cost
from broker.protocol import GenerationRequest, SamplingParams
from broker.settings import Settings


def req(prompt: str | None = None, prompt_ids: tuple[int, ...] | None = None, max_tokens: int = 16) -> GenerationRequest:
    return GenerationRequest(id="r", prompt=prompt, prompt_ids=prompt_ids, reply_to="x",
                             sampling=SamplingParams(max_tokens=max_tokens))


def test_cost_is_prompt_plus_max_tokens_capped_by_the_context() -> None:
    assert request_cost(req("héllo", max_tokens=10), max_context=4096) == 6 + 10  # UTF-8 bytes
    assert request_cost(req(prompt_ids=(1, 2, 3), max_tokens=5), max_context=4096) == 8
    assert request_cost(req("x", max_tokens=1 << 30), max_context=2048) == 2048


@pytest.mark.parametrize(("requests", "tokens", "cost", "room"), [
    (0, 0, 10**9, True),  # an empty queue takes anything
    (9, 900, 100, True),
    (10, 0, 1, False),  # at the request bound
    (5, 950, 51, False),  # past the token bound
    (5, 950, 50, True),
])
def test_has_room(requests: int, tokens: int, cost: int, room: bool) -> None:
    assert has_room(requests, tokens, cost, max_requests=10, max_tokens=1000) is room


def test_limits_from_settings() -> None:
    settings = Settings(group_max_requests=7, group_max_tokens=70, total_max_requests=21, total_max_tokens=210)
    assert Limits.from_settings(settings) == Limits(7, 70, 21, 210)
