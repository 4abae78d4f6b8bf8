"""Router: least outstanding work among routable groups, ties in turn, local sends until a heartbeat."""

from __future__ import annotations

from collections import Counter

from balancer.router import Router
from broker.registry import GroupStatus


def group(name: str, *, queue: int = 0, running: int = 0, waiting: int = 0, alive: bool = True,
          state: str = "ready", heartbeat_ms: int = 1) -> GroupStatus:
    return GroupStatus(name=name, tp=1, model="m", kv_dtype="none", kv_capacity_tokens=0, kv_used_tokens=0,
                       running=running, waiting=waiting, queue_depth=queue, leader_pid=1, host="h",
                       max_context=4096, vocab_size=256, state=state, heartbeat_ms=heartbeat_ms, alive=alive)


def router(*groups: GroupStatus) -> Router:
    r = Router()
    r.update(list(groups))
    return r


def test_picks_the_group_with_least_outstanding_work() -> None:
    r = router(group("a", queue=3), group("b", running=1, waiting=1), group("c", running=4))
    assert r.outstanding(r.find("b")) == 2  # type: ignore[arg-type]
    assert {r.pick().name for _ in range(5)} == {"b"}  # type: ignore[union-attr]


def test_queue_running_and_waiting_all_count() -> None:
    assert router(group("a", queue=2), group("b", running=1)).pick().name == "b"  # type: ignore[union-attr]
    assert router(group("a", waiting=2), group("b", queue=1)).pick().name == "b"  # type: ignore[union-attr]
    assert router(group("a", running=2), group("b", waiting=1)).pick().name == "b"  # type: ignore[union-attr]


def test_ties_take_turns() -> None:
    r = router(group("a"), group("b"), group("c"), group("busy", running=9))
    picks = [r.pick().name for _ in range(9)]  # type: ignore[union-attr]
    assert Counter(picks) == {"a": 3, "b": 3, "c": 3}
    assert all(x != y for x, y in zip(picks, picks[1:]))


def test_sent_requests_count_until_the_next_heartbeat() -> None:
    r = router(group("a"), group("b", running=2))
    picks = []
    for _ in range(4):
        chosen = r.pick()
        assert chosen is not None
        r.sent(chosen.name)
        picks.append(chosen.name)
    # a catches up with b's reported load first, then they share: 4 sends level them at 3 each
    assert picks[:2] == ["a", "a"] and sorted(picks[2:]) == ["a", "b"]
    assert [r.outstanding(g) for g in r.groups] == [3, 3]


def test_new_heartbeat_resets_only_that_groups_local_count() -> None:
    r = router(group("a", heartbeat_ms=10), group("b", heartbeat_ms=10))
    r.sent("a")
    r.sent("a")
    r.sent("b")
    r.update([group("a", heartbeat_ms=10), group("b", heartbeat_ms=20, queue=1)])
    assert r.sent_since_heartbeat == {"a": 2}
    assert r.outstanding(r.find("a")) == 2 and r.outstanding(r.find("b")) == 1  # type: ignore[arg-type]
    assert r.pick().name == "b"  # type: ignore[union-attr]


def test_excludes_dead_draining_and_excluded_groups() -> None:
    r = router(group("dead", alive=False), group("draining", state="draining"), group("x", running=5),
               group("y", running=7))
    assert {r.pick().name for _ in range(4)} == {"x"}  # type: ignore[union-attr]
    assert r.pick(exclude=frozenset({"x"})).name == "y"  # type: ignore[union-attr]
    assert r.pick(exclude=frozenset({"x", "y"})) is None


def test_no_groups_no_pick() -> None:
    assert Router().pick() is None
    assert router(group("dead", alive=False)).pick() is None


def test_find_by_name() -> None:
    r = router(group("a"), group("b"))
    assert r.find("b").name == "b"  # type: ignore[union-attr]
    assert r.find("zzz") is None
