"""Router: the balancer's view of the groups (heartbeats, queue readings, its own sends) and picks on it."""

from __future__ import annotations

import itertools
from collections import Counter

from balancer.admission import Limits
from balancer.routing import AffinityTable, Router, RoutingPolicy
from broker.registry import GroupStatus, QueueLoad


def group(name: str, *, queue: int = 0, running: int = 0, waiting: int = 0, alive: bool = True,
          state: str = "ready", heartbeat_ms: int = 1, queued_tokens: int = 0, running_tokens: int = 0,
          kv: float = 0.0, latency_ms: float = 0.0) -> GroupStatus:
    return GroupStatus(name=name, tp=1, model="m", kv_dtype="none", kv_capacity_tokens=0, kv_used_tokens=0,
                       running=running, waiting=waiting, queue_depth=queue, leader_pid=1, host="h",
                       max_context=4096, vocab_size=256, state=state, heartbeat_ms=heartbeat_ms, alive=alive,
                       queued_tokens=queued_tokens, running_tokens=running_tokens, kv_utilization=kv,
                       latency_ewma_ms=latency_ms)


def router(*groups: GroupStatus, loads: dict[str, QueueLoad] | None = None, **kwargs: object) -> Router:
    r = Router(**kwargs)  # type: ignore[arg-type]
    r.update(list(groups), loads)
    return r


def test_picks_the_group_with_least_outstanding_work() -> None:
    r = router(group("a", queue=30), group("b", running=10, waiting=10), group("c", running=40))
    assert r.outstanding(r.find("b")) == 20  # type: ignore[arg-type]
    assert {r.pick().name for _ in range(5)} == {"b"}  # type: ignore[union-attr]


def test_queue_running_and_waiting_all_count() -> None:
    assert router(group("a", queue=20), group("b", running=10)).pick().name == "b"  # type: ignore[union-attr]
    assert router(group("a", waiting=20), group("b", queue=10)).pick().name == "b"  # type: ignore[union-attr]
    assert router(group("a", running=20), group("b", waiting=10)).pick().name == "b"  # type: ignore[union-attr]


def test_queue_readings_replace_the_heartbeat_counts() -> None:
    r = router(group("a", queue=50), group("b"), loads={"a": QueueLoad(1, 10), "b": QueueLoad(30, 10)})
    assert r.pick().name == "a"  # type: ignore[union-attr]


def test_ties_and_near_ties_take_turns() -> None:
    # One request apart is within the hysteresis margin: they share instead of herding on stale numbers.
    r = router(group("a"), group("b", running=1), group("c"), group("busy", running=90))
    picks = [r.pick().name for _ in range(9)]  # type: ignore[union-attr]
    assert Counter(picks) == {"a": 3, "b": 3, "c": 3}
    assert all(x != y for x, y in itertools.pairwise(picks))


def test_sent_requests_count_until_the_next_reading() -> None:
    r = router(group("a"), group("b", running=20))
    picks = []
    for _ in range(40):
        chosen = r.pick()
        assert chosen is not None
        r.sent(chosen.name, 10)
        picks.append(chosen.name)
    # a catches up with b's reported load first, then they share
    assert picks[:18] == ["a"] * 18 and Counter(picks[18:]) == {"a": 11, "b": 11}
    assert [r.queue_load(g) for g in r.groups] == [QueueLoad(29, 290), QueueLoad(31, 110)]
    r.update(r.groups, {"a": QueueLoad(5, 50), "b": QueueLoad(5, 50)})
    assert r.sent_since == {}


def test_new_heartbeat_resets_only_that_groups_local_count() -> None:
    r = router(group("a", heartbeat_ms=10), group("b", heartbeat_ms=10))
    r.sent("a")
    r.sent("a")
    r.sent("b")
    r.update([group("a", heartbeat_ms=10), group("b", heartbeat_ms=20, queue=1)])
    assert r.sent_since == {"a": [2, 2]}
    assert r.outstanding(r.find("a")) == 2 and r.outstanding(r.find("b")) == 1  # type: ignore[arg-type]


def test_excludes_dead_draining_starting_and_excluded_groups() -> None:
    r = router(group("dead", alive=False), group("draining", state="draining"), group("new", state="starting"),
               group("x", running=50), group("y", running=70))
    assert {r.pick().name for _ in range(4)} == {"x"}  # type: ignore[union-attr]
    assert r.pick(exclude=frozenset({"x"})).name == "y"  # type: ignore[union-attr]
    assert r.pick(exclude=frozenset({"x", "y"})) is None


def test_a_group_joins_at_its_first_heartbeat_and_leaves_when_it_drains() -> None:
    r = router(group("a", running=5))
    assert {r.pick().name for _ in range(3)} == {"a"}  # type: ignore[union-attr]
    r.update([group("a", running=5), group("b")])
    assert r.pick().name == "b"  # type: ignore[union-attr]
    r.update([group("a", running=5), group("b", state="draining")])
    assert {r.pick().name for _ in range(3)} == {"a"}  # type: ignore[union-attr]


def test_bounded_picks_only_groups_with_room() -> None:
    limits = Limits(group_requests=10, group_tokens=1000, total_requests=100, total_tokens=10_000)
    r = router(group("a"), group("b"), loads={"a": QueueLoad(10, 100), "b": QueueLoad(3, 990)}, limits=limits)
    assert r.pick(cost=20) is None  # a: 10 requests is its bound; b: 990 + 20 tokens is past its bound
    assert r.pick(cost=10).name == "b"  # type: ignore[union-attr]
    assert r.pick(cost=50, bounded=False) is not None  # a request moved from a failed group: admitted anyway
    r.update(r.groups, {"a": QueueLoad(0, 0), "b": QueueLoad(3, 990)})
    assert r.pick(cost=5000).name == "a"  # type: ignore[union-attr]  # an empty queue takes anything
    assert r.totals() == QueueLoad(3, 990)


def test_prefix_affinity_and_round_robin_baseline() -> None:
    adaptive = router(group("a"), group("b"), group("c"), affinity=AffinityTable(ttl_s=60))
    first = adaptive.pick(prefix="p1", now=0.0)
    assert first is not None
    for n in range(5):
        adaptive.sent(first.name)
        assert adaptive.pick(prefix="p1", now=float(n)).name == first.name  # type: ignore[union-attr]
    assert adaptive.affinity_hits == 5
    baseline = router(group("a"), group("b"), group("c"), adaptive=False)
    assert [baseline.pick(prefix="p1").name for _ in range(4)] == ["b", "c", "a", "b"]  # type: ignore[union-attr]


def test_a_group_that_leaves_loses_its_prefixes() -> None:
    r = router(group("a"), group("b"), affinity=AffinityTable(ttl_s=60), policy=RoutingPolicy())
    home = r.pick(prefix="p", now=0.0)
    assert home is not None
    r.update([g for g in r.groups if g.name != home.name] + [group(home.name, alive=False)])
    assert r.affinity.homes("p", 1.0) == {}


def test_no_groups_no_pick() -> None:
    assert Router().pick() is None
    assert router(group("dead", alive=False)).pick() is None


def test_find_by_name() -> None:
    r = router(group("a"), group("b"))
    assert r.find("b").name == "b"  # type: ignore[union-attr]
    assert r.find("zzz") is None
