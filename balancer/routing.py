"""Choosing a worker group for a request: a pure function of load and prompt-prefix affinity.

Each candidate (a routable group with room for the request) gets a load score, lower is better:

    requests / request_unit + tokens / token_unit + kv_weight * kv_utilization + latency_ewma_ms / latency_unit_ms

(requests and tokens: what its queue holds, queued and running, plus what this balancer sent it since
it last read them). Then:

1. **Affinity.** If the prompt's prefix was recently served by some candidates ("homes"), the
   request goes to a home, where the KV prefix cache may still hold the prefix, unless that home's
   score is more than ``affinity_slack`` above the best candidate's (it is overloaded) or its KV
   cache is nearly full (it would evict). Among several homes, the most recently used one keeps the
   prefix unless another is better by more than ``near_equal``.
2. **Load.** Otherwise, the best score wins; candidates within ``near_equal`` of it count as tied
   and take turns, so that near-equal groups share the work instead of all of it swinging to
   whichever looked a hair better in stale heartbeats (and back at the next one).

``near_equal`` and ``affinity_slack`` are the hysteresis: a decision changes only when the load
difference is larger than them. Time enters only through ``homes`` (see ``AffinityTable``), so every
rule here is unit-tested with time passed in.

``Router`` is the balancer's view of the groups that decision is made on: each group's last
heartbeat (health, KV utilization, step latency), its queue as last read (requests and tokens
dispatched and not finished), and what this balancer sent it since that reading. Only routable
groups (alive, ``ready``) are candidates, so a new group takes work from its first heartbeat and a
draining or dead one from none; with admission bounds, only those with room; with a ``model``, only
those serving it (balancer.models).
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from balancer.admission import Limits, has_room
from broker.protocol import GenerationRequest
from broker.registry import GroupStatus, QueueLoad


@dataclass(frozen=True, slots=True)
class RoutingPolicy:
    request_unit: float = 16.0  # queued or running requests worth one point
    token_unit: float = 4096.0  # their tokens (prompt + max_tokens) worth one point
    kv_weight: float = 2.0  # points of a full KV cache
    latency_unit_ms: float = 200.0  # engine step time worth one point
    near_equal: float = 0.1  # scores closer than this are ties (hysteresis)
    affinity_slack: float = 1.0  # a home keeps its prefix until it is this many points worse than the best
    kv_affinity_limit: float = 0.95  # a home with more KV in use than this gets no affinity


@dataclass(frozen=True, slots=True)
class Candidate:
    """What routing knows about one group that could take the request."""

    name: str
    requests: int = 0
    tokens: int = 0
    kv_utilization: float = 0.0
    latency_ewma_ms: float = 0.0


@dataclass(frozen=True, slots=True)
class Decision:
    name: str
    affinity: bool  # sent to a group that served the prompt's prefix recently


def score(candidate: Candidate, policy: RoutingPolicy) -> float:
    return (candidate.requests / policy.request_unit + candidate.tokens / policy.token_unit
            + policy.kv_weight * candidate.kv_utilization + candidate.latency_ewma_ms / policy.latency_unit_ms)


def choose(candidates: Sequence[Candidate], *, homes: Mapping[str, float], turn: int,
           policy: RoutingPolicy) -> Decision | None:
    """The group for one request. ``homes``: group -> when it last served the prompt's prefix
    (any clock; only the order matters); ``turn`` rotates ties."""
    if not candidates:
        return None
    scores = {c.name: score(c, policy) for c in candidates}
    best = min(scores.values())
    warm = [c for c in candidates if c.name in homes and c.kv_utilization <= policy.kv_affinity_limit]
    if warm:
        recent = max(warm, key=lambda c: (homes[c.name], c.name))
        pick = min(warm, key=lambda c: (scores[c.name], c.name))
        if scores[recent.name] <= scores[pick.name] + policy.near_equal:
            pick = recent
        if scores[pick.name] <= best + policy.affinity_slack:
            return Decision(pick.name, affinity=True)
    tied = sorted(c.name for c in candidates if scores[c.name] <= best + policy.near_equal)
    return Decision(tied[turn % len(tied)], affinity=False)


def round_robin(candidates: Sequence[Candidate], *, turn: int) -> Decision | None:
    """The baseline the benchmark compares with: every group in turn, blind to load and prefixes."""
    if not candidates:
        return None
    names = sorted(c.name for c in candidates)
    return Decision(names[turn % len(names)], affinity=False)


def prefix_key(request: GenerationRequest, *, chars: int, tokens: int) -> str | None:
    """A digest of the prompt's first ``chars`` characters (or ``tokens`` token ids); None for a
    prompt shorter than that, whose prefix is not worth keeping a cache for."""
    if request.prompt_ids is not None:
        if len(request.prompt_ids) < tokens:
            return None
        data = ",".join(map(str, request.prompt_ids[:tokens])).encode()
    else:
        prompt = request.prompt or ""
        if len(prompt) < chars:
            return None
        data = prompt[:chars].encode("utf-8", "surrogatepass")
    return hashlib.blake2b(data, digest_size=8).hexdigest()


class AffinityTable:
    """prefix key -> {group: when it last served a request with that prefix}; bounded (LRU).

    Entries older than ``ttl_s`` do not count: a KV prefix cache evicts what it has not seen in a while.
    """

    def __init__(self, *, ttl_s: float, capacity: int = 100_000) -> None:
        self.ttl_s = ttl_s
        self.capacity = capacity
        self._entries: OrderedDict[str, dict[str, float]] = OrderedDict()

    def homes(self, key: str | None, now: float) -> dict[str, float]:
        if key is None or key not in self._entries:
            return {}
        fresh = {g: t for g, t in self._entries[key].items() if now - t <= self.ttl_s}
        if fresh:
            self._entries[key] = fresh
        else:
            del self._entries[key]
        return dict(fresh)

    def record(self, key: str | None, group: str, now: float) -> None:
        if key is None:
            return
        self._entries.setdefault(key, {})[group] = now
        self._entries.move_to_end(key)
        while len(self._entries) > self.capacity:
            self._entries.popitem(last=False)

    def forget_group(self, group: str) -> None:
        """A group left (dead or drained): its cache went with it."""
        for key in list(self._entries):
            homes = self._entries[key]
            if homes.pop(group, None) is not None and not homes:
                del self._entries[key]

    def __len__(self) -> int:
        return len(self._entries)


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
