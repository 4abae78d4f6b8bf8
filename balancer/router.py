"""Choosing a worker group for a request: a pure function of what the groups last published.

First, simple policy: the routable group (alive, not draining) with the least outstanding work —
queued + running + waiting from its last heartbeat, plus what this balancer sent it since that
heartbeat — ties broken in turn so equal groups share the load.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from broker.registry import GroupStatus


@dataclass(slots=True)
class Router:
    groups: list[GroupStatus] = field(default_factory=list)
    # group -> requests this balancer dispatched since the heartbeat in `groups` was written
    sent_since_heartbeat: dict[str, int] = field(default_factory=dict)
    _turn: int = 0

    def update(self, groups: list[GroupStatus]) -> None:
        """New heartbeats: a group's own numbers now include what was sent before them."""
        old = {g.name: g.heartbeat_ms for g in self.groups}
        for g in groups:
            if old.get(g.name) != g.heartbeat_ms:
                self.sent_since_heartbeat.pop(g.name, None)
        self.groups = groups

    def outstanding(self, group: GroupStatus) -> int:
        return group.queue_depth + group.running + group.waiting + self.sent_since_heartbeat.get(group.name, 0)

    def pick(self, *, exclude: frozenset[str] = frozenset()) -> GroupStatus | None:
        candidates = [g for g in self.groups if g.routable and g.name not in exclude]
        if not candidates:
            return None
        least = min(self.outstanding(g) for g in candidates)
        tied = [g for g in candidates if self.outstanding(g) == least]
        self._turn += 1
        return tied[self._turn % len(tied)]

    def sent(self, name: str) -> None:
        self.sent_since_heartbeat[name] = self.sent_since_heartbeat.get(name, 0) + 1

    def find(self, name: str) -> GroupStatus | None:
        return next((g for g in self.groups if g.name == name), None)
