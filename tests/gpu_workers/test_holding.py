"""What a group holds: priority order, deadlines, running set, token counts; isolation bookkeeping."""

from __future__ import annotations

from broker.protocol import GenerationRequest, SamplingParams
from gpu_workers.holding import Held, Holding
from gpu_workers.isolation import Isolation
from gpu_workers.load import LoadMeter


def held(rid: str, *, priority: int = 0, enqueued_ms: int = 0, timeout_s: float | None = None,
         cost: int = 10, prompt: int = 3) -> Held:
    request = GenerationRequest(id=rid, prompt="x", reply_to="r", priority=priority, enqueued_ms=enqueued_ms,
                                timeout_s=timeout_s, sampling=SamplingParams(max_tokens=cost - prompt))
    return Held(entry_id=rid.encode(), request=request, epoch=1, cost=cost, prompt_ids=[1] * prompt)


def admitted(holding: Holding, *items: Held) -> list[Held]:
    for item in items:
        holding.add(item)
        holding.queue(item)
    return list(items)


def test_queued_requests_come_out_by_priority_then_arrival() -> None:
    holding = Holding()
    admitted(holding, held("late", priority=3), held("a", enqueued_ms=5), held("urgent", priority=-1),
             held("b", enqueued_ms=5), held("older", enqueued_ms=1))
    order = []
    while (item := holding.next_queued()) is not None:
        holding.started(item)
        order.append(item.request.id)
    assert order == ["urgent", "older", "a", "b", "late"]
    assert holding.running == {"urgent", "older", "a", "b", "late"}


def test_finished_forgotten_and_replaced_requests_are_skipped() -> None:
    holding = Holding()
    done, gone, old = admitted(holding, held("done"), held("gone"), held("same"))
    done.final = True
    holding.forget(gone)
    newer = held("same")  # the same request again with a newer epoch replaces the old one
    holding.forget(old)
    admitted(holding, newer)
    assert holding.next_queued() is newer
    assert holding.next_queued() is None


def test_expired_by_deadline_with_time_passed_in() -> None:
    holding = Holding()
    admitted(holding, held("soon", enqueued_ms=1000, timeout_s=1.0), held("later", enqueued_ms=1000, timeout_s=5.0),
             held("never", enqueued_ms=1000))
    assert [h.request.id for h in holding.expired(1999)] == []
    assert [h.request.id for h in holding.expired(2000)] == ["soon"]
    assert [h.request.id for h in holding.expired(10_000)] == ["later"]


def test_tokens_queued_by_cost_running_by_kv_footprint() -> None:
    holding = Holding()
    running, queued, finished = admitted(holding, held("r", cost=100, prompt=20), held("q", cost=50),
                                         held("f", cost=70))
    holding.started(holding.next_queued())  # type: ignore[arg-type]
    finished.final = True
    assert running.running and holding.tokens() == (50, 20)
    assert holding.waiting() == [queued]


def test_isolation_blames_a_lone_request_and_tries_several_one_at_a_time() -> None:
    holding = Holding()
    a, b, c = admitted(holding, held("a"), held("b"), held("c"))
    for item in (a, b, c):
        holding.started(holding.next_queued())  # type: ignore[arg-type]
    isolation = Isolation(holding)
    assert isolation.failed([b]) is b and not isolation.active
    for item in (a, b, c):  # the group takes them all out of the engine
        holding.stopped(item)
    assert isolation.failed([c, a, b]) is None and isolation.active
    tried = []
    while (suspect := isolation.next_suspect()) is not None:
        tried.append(suspect.request.id)
        if suspect is b:
            suspect.final = True  # its step failed alone: the group ended it
        else:
            isolation.passed(suspect)
    assert tried == ["a", "b", "c"] and not isolation.active
    assert [holding.next_queued(), holding.next_queued(), holding.next_queued()] == [a, c, None]


def test_load_meter_rate_and_latency() -> None:
    meter = LoadMeter(window_start=10.0)
    meter.step(0.1, tokens=4)
    assert meter.latency_ewma_s == 0.1
    for _ in range(30):
        meter.step(0.02, tokens=4)
    assert abs(meter.latency_ewma_s - 0.02) < 0.001
    assert meter.tokens_per_s(now=12.0) == 124 / 2.0
    meter.reset(now=12.0)
    assert meter.tokens_per_s(now=13.0) == 0.0 and meter.tokens_per_s(now=12.0) == 0.0
    assert meter.latency_ewma_s > 0  # the window had steps: kept
    meter.reset(now=13.0)
    assert meter.latency_ewma_s == 0.0  # a window without a step: idle, forgotten
    meter.step(5.0, tokens=1)  # the first step after idling starts afresh
    assert meter.latency_ewma_s == 5.0
