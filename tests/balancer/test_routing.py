"""The routing decision as a pure function: load score, prefix affinity, hysteresis; time passed in."""

from __future__ import annotations

from collections import Counter

import pytest

from balancer.routing import (
    AffinityTable,
    Candidate,
    Decision,
    RoutingPolicy,
    choose,
    prefix_key,
    round_robin,
    score,
)
from broker.protocol import GenerationRequest

POLICY = RoutingPolicy()


def c(name: str, *, requests: int = 0, tokens: int = 0, kv: float = 0.0, latency_ms: float = 0.0) -> Candidate:
    return Candidate(name, requests=requests, tokens=tokens, kv_utilization=kv, latency_ewma_ms=latency_ms)


def pick(*candidates: Candidate, homes: dict[str, float] | None = None, turn: int = 0) -> Decision | None:
    return choose(list(candidates), homes=homes or {}, turn=turn, policy=POLICY)


def test_score_grows_with_every_load_signal() -> None:
    idle = score(c("a"), POLICY)
    assert idle == 0.0
    for busier in (c("a", requests=16), c("a", tokens=4096), c("a", kv=0.5), c("a", latency_ms=200)):
        assert score(busier, POLICY) == pytest.approx(1.0)


@pytest.mark.parametrize("busy", [
    c("a", requests=40), c("a", tokens=20_000), c("a", kv=0.9), c("a", latency_ms=500),
])
def test_the_less_loaded_group_wins_on_each_signal(busy: Candidate) -> None:
    assert pick(busy, c("b")) == Decision("b", affinity=False)


def test_no_candidates_no_decision() -> None:
    assert pick() is None
    assert round_robin([], turn=3) is None


def test_near_equal_groups_take_turns_instead_of_ping_ponging() -> None:
    # Heartbeats alternate which of two near-equal groups looks a hair better: the picks do not follow.
    views = [(c("a", requests=1), c("b")), (c("a"), c("b", requests=1))]
    picks = [pick(*views[turn % 2], turn=turn).name for turn in range(8)]  # type: ignore[union-attr]
    assert Counter(picks) == {"a": 4, "b": 4}
    # a clear difference (more than the margin) is followed
    assert {pick(c("a", requests=8), c("b"), turn=t).name for t in range(4)} == {"b"}  # type: ignore[union-attr]


def test_a_prefix_goes_to_a_group_that_served_it() -> None:
    # b is somewhat busier, but holds the prefix: it is cheaper to serve there than to prefill again
    assert pick(c("a"), c("b", requests=8), homes={"b": 10.0}) == Decision("b", affinity=True)


def test_an_overloaded_home_loses_the_prefix() -> None:
    assert pick(c("a"), c("b", requests=40), homes={"b": 10.0}) == Decision("a", affinity=False)
    assert pick(c("a"), c("b", tokens=8000), homes={"b": 10.0}) == Decision("a", affinity=False)


def test_a_home_with_a_full_kv_cache_gets_no_affinity() -> None:
    assert pick(c("a"), c("b", kv=0.99), homes={"b": 10.0}) == Decision("a", affinity=False)


def test_among_homes_the_latest_keeps_the_prefix_unless_clearly_worse() -> None:
    homes = {"a": 5.0, "b": 9.0}
    assert pick(c("a"), c("b", requests=1), homes=homes) == Decision("b", affinity=True)  # near-equal: stays
    assert pick(c("a"), c("b", requests=10), homes=homes) == Decision("a", affinity=True)  # clearly worse


def test_homes_that_are_not_candidates_are_ignored() -> None:
    # a group that died or drains is not a candidate, whatever it cached
    assert pick(c("a"), c("b"), homes={"gone": 1.0}, turn=1).affinity is False


def test_round_robin_ignores_load_and_prefixes() -> None:
    candidates = [c("b", requests=100), c("a"), c("c")]
    assert [round_robin(candidates, turn=t).name for t in range(4)] == ["a", "b", "c", "a"]  # type: ignore[union-attr]


# --- prefix keys and the affinity table ---------------------------------------------------------------


def request(prompt: str | None = None, prompt_ids: tuple[int, ...] | None = None) -> GenerationRequest:
    return GenerationRequest(id="r", prompt=prompt, prompt_ids=prompt_ids, reply_to="x")


def test_prefix_key_covers_only_the_first_characters_or_ids() -> None:
    system = "You are a helpful assistant. " * 6
    a = prefix_key(request(system + "question one"), chars=128, tokens=32)
    b = prefix_key(request(system + "another question"), chars=128, tokens=32)
    assert a is not None and a == b
    assert prefix_key(request("x" + system), chars=128, tokens=32) != a
    assert prefix_key(request("short prompt"), chars=128, tokens=32) is None
    ids = tuple(range(40))
    assert prefix_key(request(prompt_ids=ids), chars=128, tokens=32) == prefix_key(
        request(prompt_ids=ids[:32] + (99,)), chars=128, tokens=32)
    assert prefix_key(request(prompt_ids=ids[:10]), chars=128, tokens=32) is None


def test_affinity_table_expires_entries_by_time_passed_in() -> None:
    table = AffinityTable(ttl_s=60.0)
    table.record("p", "a", now=100.0)
    table.record("p", "b", now=130.0)
    assert table.homes("p", now=150.0) == {"a": 100.0, "b": 130.0}
    assert table.homes("p", now=170.0) == {"b": 130.0}
    assert table.homes("p", now=200.0) == {}
    assert len(table) == 0
    assert table.homes(None, now=0.0) == {}
    table.record(None, "a", now=0.0)
    assert len(table) == 0


def test_affinity_table_is_bounded_least_recently_used_first() -> None:
    table = AffinityTable(ttl_s=60.0, capacity=2)
    table.record("p1", "a", now=0.0)
    table.record("p2", "a", now=1.0)
    table.record("p1", "b", now=2.0)  # p1 used again: p2 is now the oldest
    table.record("p3", "a", now=3.0)
    assert table.homes("p2", now=4.0) == {} and table.homes("p1", now=4.0) == {"a": 0.0, "b": 2.0}


def test_forgetting_a_group() -> None:
    table = AffinityTable(ttl_s=60.0)
    table.record("p1", "a", now=0.0)
    table.record("p1", "b", now=0.0)
    table.record("p2", "a", now=0.0)
    table.forget_group("a")
    assert table.homes("p1", now=1.0) == {"b": 0.0} and table.homes("p2", now=1.0) == {}
