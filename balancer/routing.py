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
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from broker.protocol import GenerationRequest


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
