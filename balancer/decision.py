"""The balancer's decision, on one screen: for every request waiting, a group now, its final event
now (cancelled, timed out, overloaded, no group, not servable), or another wait.

A pure function of what it is given (the waiting requests, the view of the groups, the cancels
read, the admission bounds, the clocks): no Redis, so every rule is unit-tested with time passed in.
The dispatcher (balancer.dispatch) carries the decision out. Each request goes to a group of its
model (balancer.models); the admission bounds (balancer.admission) count each model's groups:
what waits here is bounded like the groups' queues, and a request moved from a failed or draining
group, accepted before, is admitted past the bounds.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from balancer.admission import Limits, request_cost
from balancer.models import resolve_model
from balancer.pending import Waiting
from balancer.routing import Router
from broker.connection import TRANSIENT_ERRORS
from broker.errors import InvalidRequest
from broker.events import done_event, error_event
from broker.protocol import limit_problem


@dataclass(frozen=True, slots=True)
class Rules:
    """The settings the decision reads (broker.settings)."""

    limits: Limits
    no_group_wait_s: float  # a request with no live group of its model waits this long, then `unavailable`
    default_model: str | None = None  # where a request without `model` goes when several are served


@dataclass(slots=True)
class Decision:
    assignments: list[tuple[Waiting, str]] = field(default_factory=list)  # (request, group name)
    finals: list[tuple[Waiting, dict[str, str]]] = field(default_factory=list)  # (request, its final event)
    failed: list[tuple[Waiting, Exception]] = field(default_factory=list)  # deciding raised: to give up


def fair_order(waiting: list[Waiting]) -> list[Waiting]:
    """``waiting`` in turns of its sources (each tenant, and the shared stream: ``request.tenant``):
    each source's first request, then each one's second, ...; within a turn, and within a source, by
    ``priority`` then arrival. So the room left in the groups' queues is shared max-min fairly, and a
    tenant's priorities order its own requests only: a flood at the lowest priority takes no more
    than its turns. With one source it is plain priority order."""
    ranked: dict[str | None, int] = {}
    keyed = []
    for w in sorted(waiting, key=lambda w: (w.request.priority, w.request.enqueued_ms)):
        rank = ranked[w.request.tenant] = ranked.get(w.request.tenant, -1) + 1
        keyed.append((rank, w))
    return [w for _rank, w in sorted(keyed, key=lambda rw: (rw[0], rw[1].request.priority, rw[1].request.enqueued_ms))]


def _of(model: str | None) -> str:
    return f" of model {model!r}" if model is not None else ""


def decide(waiting: list[Waiting], *, router: Router, rules: Rules, now_ms: float, now: float,
           closed: frozenset[str], full: frozenset[str], cancelled: Callable[[str, str | None, str | None], bool],
           ready: Callable[[bytes], bool]) -> Decision:
    """Decide for ``waiting`` in turns of its sources (``fair_order``): in priority order (lower
    ``priority`` first, then arrival) within each source.

    ``now_ms``: the Redis clock (deadlines, waits); ``now``: the monotonic clock the router's
    affinity and pauses run on. ``closed``/``full``: groups that refused work lately as closed
    (skipped) or full (no room). ``cancelled(id, cancel_token, tenant)``: whether a cancel read applies;
    ``ready(entry_id)``: False while a request backs off after a failure (it is skipped). Assigned
    requests are counted into the router's view (``Router.sent``); a request's model, once
    resolved, is set on it, and its cost on the ``Waiting``.
    """
    out = Decision()
    limits = rules.limits
    totals: dict[str | None, list[int]] = {}  # model -> [requests, tokens] on its groups, as sent
    held_back = 0  # requests that stay waiting here: bounded like the groups' queues
    for w in fair_order(waiting):
        if not ready(w.entry_id):
            continue  # failed lately: backing off
        try:
            request, final = w.request, None
            model, unroutable = _model_of(w, router, rules)
            routable = router.routable(model=model)
            w.cost = request_cost(request, max_context=max((g.max_context for g in routable), default=1 << 31))
            if model not in totals:
                load = router.totals(model=model)
                totals[model] = [load.requests, load.tokens]
            total = totals[model]
            if cancelled(request.id, request.cancel_token, request.tenant):
                final = done_event(request.id, text="", token_ids=[], finish_reason="cancelled", prompt_tokens=0)
            elif request.deadline_ms is not None and now_ms >= request.deadline_ms:
                final = error_event(request.id, "timeout", f"deadline of {request.timeout_s}s passed before dispatch")
            elif unroutable is not None:
                final = unroutable
            elif not routable:
                if now_ms - w.since_ms >= rules.no_group_wait_s * 1000:
                    final = error_event(request.id, "unavailable", f"no live worker group{_of(model)} for "
                                                                   f"{rules.no_group_wait_s}s")
                elif w.moved or held_back < limits.total_requests:
                    held_back += 1
                    continue  # stays waiting
                else:
                    final = error_event(request.id, "overloaded", f"{held_back} requests wait for a worker group already")
            elif not w.moved and (total[0] + 1 > limits.total_requests or total[1] + w.cost > limits.total_tokens):
                final = error_event(request.id, "overloaded", (
                    f"the worker groups{_of(model)} hold {total[0]} requests and {total[1]} tokens, at the bounds "
                    f"of {limits.total_requests} and {limits.total_tokens}; retry later"))
            else:
                group = router.pick(prefix=w.prefix, cost=w.cost, now=now,
                                    exclude=closed if w.moved else closed | full, bounded=not w.moved,
                                    model=model, weights=request.weights if w.moved else None)
                if group is None:
                    if not router.routable(exclude=closed, model=model) or w.moved:
                        held_back += 1
                        continue  # every group refused work lately: try again next tick
                    final = error_event(request.id, "overloaded", (
                        f"every worker group{_of(model)} is at its queue bound ({limits.group_requests} "
                        f"requests, {limits.group_tokens} tokens); retry later"))
                elif request.prompt_ids is not None and (problem := limit_problem(
                        request.prompt_ids, request.sampling.needed_tokens,
                        vocab_size=group.vocab_size, max_context=group.max_context)):
                    final = error_event(request.id, "invalid_request", problem)
                else:
                    router.sent(group.name, w.cost)
                    total[0] += 1
                    total[1] += w.cost
                    out.assignments.append((w, group.name))
                    continue
        except Exception as exc:
            if isinstance(exc, TRANSIENT_ERRORS):
                raise
            out.failed.append((w, exc))
            continue
        out.finals.append((w, final))
    return out


def _model_of(w: Waiting, router: Router, rules: Rules) -> tuple[str | None, dict[str, str] | None]:
    """The served model ``w`` goes to (then set on its request, so that it stays on that model
    when it moves), None while no group is registered; or the error event when there is none."""
    if w.model_resolved:
        return w.request.model, None
    try:
        model = resolve_model(w.request.model, router.groups, default=rules.default_model)
    except InvalidRequest as exc:
        return None, error_event(w.request.id, exc.code, str(exc))
    if model is not None:
        w.model_resolved = True
        if model != w.request.model:
            w.request = w.request.model_copy(update={"model": model})
    return model, None
