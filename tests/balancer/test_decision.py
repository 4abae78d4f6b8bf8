"""balancer.decision: admission and routing as a pure function, with both clocks passed in."""

from __future__ import annotations

from balancer.admission import Limits
from balancer.decision import Rules, decide
from balancer.pending import Waiting
from broker.protocol import GenerationRequest
from tests.balancer.test_router import group, router

LIMITS = Limits(group_requests=10, group_tokens=10_000, total_requests=2, total_tokens=10_000)
RULES = Rules(LIMITS, no_group_wait_s=30.0)


def waiting(rid: str, *, priority: int = 0, since_ms: float = 0.0, moved: bool = False,
            timeout_s: float | None = None, tenant: str | None = None, enqueued_ms: int = 1) -> Waiting:
    request = GenerationRequest(id=rid, reply_to=f"r:{rid}", prompt="hi", priority=priority, enqueued_ms=enqueued_ms,
                                timeout_s=timeout_s, tenant=tenant)
    return Waiting(rid.encode(), request, since_ms, moved=moved)


def never(_rid: str, _token: str | None, _tenant: str | None = None) -> bool:
    return False


def run(ws: list[Waiting], *groups: object, now_ms: float = 1000.0, cancelled=never, **kw: object):  # type: ignore[no-untyped-def]
    r = router(*groups, limits=LIMITS)  # type: ignore[arg-type]
    return decide(ws, router=r, rules=RULES, now_ms=now_ms, now=0.0, closed=frozenset(), full=frozenset(),
                  cancelled=cancelled, ready=lambda _e: True, **kw)  # type: ignore[arg-type]


def test_requests_go_by_priority_until_the_total_bound_then_end_overloaded() -> None:
    ws = [waiting("low", priority=5), waiting("high", priority=-1), waiting("mid")]
    d = run(ws, group("a"))
    assert [w.request.id for w, _g in d.assignments] == ["high", "mid"]
    [(w, final)] = d.finals
    assert w.request.id == "low" and final["code"] == "overloaded"


def test_no_tenant_outranks_another_with_its_priorities_or_its_numbers() -> None:
    """alice's flood, each at priority -100 and sent first, takes the room of one request in turn
    with bob's and the shared stream's; priority orders each source's own requests only."""
    ws = [waiting(f"a{n}", priority=-100, tenant="alice", enqueued_ms=n) for n in range(6)]
    ws += [waiting("b-late", priority=3, tenant="bob", enqueued_ms=90), waiting("b", tenant="bob", enqueued_ms=99),
           waiting("s", priority=7, enqueued_ms=50)]
    r = router(group("a"), limits=LIMITS)  # type: ignore[arg-type]
    rules = Rules(Limits(group_requests=10, group_tokens=10_000, total_requests=6, total_tokens=10_000), 30.0)
    d = decide(ws, router=r, rules=rules, now_ms=1000.0, now=0.0, closed=frozenset(), full=frozenset(),
               cancelled=never, ready=lambda _e: True)
    assert [w.request.id for w, _g in d.assignments] == ["a0", "b", "s", "a1", "b-late", "a2"]
    assert sorted(w.request.id for w, f in d.finals if f["code"] == "overloaded") == ["a3", "a4", "a5"]


def test_cancelled_and_timed_out_requests_end_before_routing() -> None:
    ws = [waiting("c"), waiting("late", timeout_s=0.999)]  # late: its deadline (1000 ms) is now
    d = run(ws, group("a"), cancelled=lambda rid, *_: rid == "c")
    assert {w.request.id: f.get("finish_reason") or f.get("code") for w, f in d.finals} == \
        {"c": "cancelled", "late": "timeout"}
    assert d.assignments == []


def test_without_a_group_a_request_waits_then_ends_unavailable_at_no_group_wait_s() -> None:
    w = waiting("q", since_ms=0.0)
    assert run([w], now_ms=29_999.0).finals == []  # still waiting
    [(_, final)] = run([w], now_ms=30_000.0).finals
    assert final["code"] == "unavailable"


def test_a_moved_request_is_admitted_past_the_bounds() -> None:
    ws = [waiting("a1"), waiting("a2"), waiting("moved", moved=True, priority=1)]
    d = run(ws, group("a"))
    assert [w.request.id for w, _g in d.assignments] == ["a1", "a2", "moved"] and d.finals == []
