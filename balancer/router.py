"""The balancer's view of the groups, and the routing decision made on it (balancer.routing).

The view: each group's last heartbeat (health, KV utilization, step latency), its queue as last read
(requests and tokens dispatched and not finished), and what this balancer sent it since that reading.
Only routable groups (alive, ``ready``) are candidates, so a new group takes work from its first
heartbeat and a draining or dead one from none; with admission bounds, only those with room; with a
``model``, only those serving it (balancer.models).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from balancer.admission import Limits, has_room
from balancer.routing import AffinityTable, Candidate, Decision, RoutingPolicy, choose, round_robin
from broker.registry import GroupStatus, QueueLoad

NO_LIMITS = Limits(1 << 62, 1 << 62, 1 << 62, 1 << 62)


@dataclass(slots=True)
class Router:
    policy: RoutingPolicy = field(default_factory=RoutingPolicy)
    limits: Limits = NO_LIMITS
    affinity: AffinityTable = field(default_factory=lambda: AffinityTable(ttl_s=300.0))
    adaptive: bool = True  # False: round robin (the benchmark's baseline)
    groups: list[GroupStatus] = field(default_factory=list)
    loads: dict[str, QueueLoad] = field(default_factory=dict)  # as read with the last update
    # group -> [requests, tokens] this balancer dispatched since `loads` (or the heartbeat) was read
    sent_since: dict[str, list[int]] = field(default_factory=dict)
    affinity_hits: int = 0
    _turn: int = 0

    def update(self, groups: list[GroupStatus], loads: dict[str, QueueLoad] | None = None) -> None:
        """A new view. A group's own numbers now include what was sent before them: with queue
        readings (``loads``) for every group; without, for a group whose heartbeat is new."""
        old = {g.name: g.heartbeat_ms for g in self.groups}
        for g in groups:
            if (loads is not None and g.name in loads) or old.get(g.name) != g.heartbeat_ms:
                self.sent_since.pop(g.name, None)
        for name in old.keys() - {g.name for g in groups if g.routable}:
            self.affinity.forget_group(name)
        self.groups = groups
        self.loads = dict(loads or {})

    def queue_load(self, group: GroupStatus) -> QueueLoad:
        """Requests and tokens on the group now, as far as this balancer knows."""
        base = self.loads.get(group.name) or QueueLoad(
            group.queue_depth + group.running + group.waiting, group.queued_tokens + group.running_tokens)
        sent = self.sent_since.get(group.name, (0, 0))
        return QueueLoad(base.requests + sent[0], base.tokens + sent[1])

    def outstanding(self, group: GroupStatus) -> int:
        return self.queue_load(group).requests

    def candidate(self, group: GroupStatus) -> Candidate:
        load = self.queue_load(group)
        return Candidate(group.name, requests=load.requests, tokens=load.tokens,
                         kv_utilization=group.kv_utilization, latency_ewma_ms=group.latency_ewma_ms)

    def routable(self, *, exclude: frozenset[str] = frozenset(), model: str | None = None) -> list[GroupStatus]:
        """Groups that take work now (of ``model``, when given), but those in ``exclude``."""
        return [g for g in self.groups
                if g.routable and g.name not in exclude and (model is None or g.serves(model))]

    def has_room(self, group: GroupStatus, cost: int) -> bool:
        load = self.queue_load(group)
        return has_room(load.requests, load.tokens, cost, max_requests=self.limits.group_requests,
                        max_tokens=self.limits.group_tokens)

    def pick(self, *, prefix: str | None = None, cost: int = 1, now: float = 0.0,
             exclude: frozenset[str] = frozenset(), bounded: bool = True, model: str | None = None,
             weights: str | None = None) -> GroupStatus | None:
        """The group for one request (and remember that it served ``prefix``); None when no routable
        group is left (``bounded``: none with room for ``cost``). With ``model``, only groups serving
        it; with ``weights``, groups with that weights fingerprint if any can take it."""
        groups = self.routable(exclude=exclude, model=model)
        if weights is not None and any(g.weights == weights for g in groups):
            groups = [g for g in groups if g.weights == weights]
        candidates: list[Candidate] = []
        by_name: dict[str, GroupStatus] = {}
        for g in groups:
            load = self.queue_load(g)
            if bounded and not has_room(load.requests, load.tokens, cost, max_requests=self.limits.group_requests,
                                        max_tokens=self.limits.group_tokens):
                continue
            candidates.append(Candidate(g.name, requests=load.requests, tokens=load.tokens,
                                        kv_utilization=g.kv_utilization, latency_ewma_ms=g.latency_ewma_ms))
            by_name[g.name] = g
        self._turn += 1
        decision: Decision | None
        if self.adaptive:
            decision = choose(candidates, homes=self.affinity.homes(prefix, now), turn=self._turn,
                              policy=self.policy)
        else:
            decision = round_robin(candidates, turn=self._turn)
        if decision is None:
            return None
        self.affinity_hits += decision.affinity
        self.affinity.record(prefix, decision.name, now)
        return by_name[decision.name]

    def sent(self, name: str, cost: int = 1) -> None:
        sent = self.sent_since.setdefault(name, [0, 0])
        sent[0] += 1
        sent[1] += cost

    def totals(self, *, model: str | None = None) -> QueueLoad:
        """Requests and tokens on all routable groups (of ``model``, when given) together."""
        loads = [self.queue_load(g) for g in self.routable(model=model)]
        return QueueLoad(sum(x.requests for x in loads), sum(x.tokens for x in loads))

    def find(self, name: str) -> GroupStatus | None:
        return next((g for g in self.groups if g.name == name), None)
