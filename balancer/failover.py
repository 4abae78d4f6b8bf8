"""Failing a dead worker group over: its queued and in-flight requests go back to the ingress stream.

The group's accepting flag goes first, so no balancer adds to its queue meanwhile; then every entry
of its queue, read or not, is put back on ``{p}:requests`` with takeover information (the dead group
and the entry's epoch; signed, broker.signing, so that no client can write such an entry) and deleted from the queue, and the empty queue is retired (RETIRE_QUEUE), which
a stalled group notices (``NOGROUP``) when it wakes. Balancers then route the requests like new ones,
taking them over with a new epoch (CLAIM_OWNER), which fences the old group, and learning the tokens
already streamed, which the new group continues after.

Only one balancer does it (a lock per group), and only when it is sure: the heartbeat is read again
under the lock, and a Redis that restarted less than ``dead_after_s + heartbeat_interval_s`` ago gets
no failovers, since every heartbeat is old after a restart until the groups have reconnected.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import cast

from redis import Redis

from broker.connection import pipe_time, time_pair
from broker.consumer import Entry
from broker.keys import Keys
from broker.lua import queue_entry
from broker.scripts import Scripts
from broker.settings import Settings
from broker.signing import SigningKey

log = logging.getLogger(__name__)

LOCK_MS = 30_000


@dataclass(frozen=True, slots=True)
class FailedOver:
    moved: int  # requests put back on the ingress stream
    heartbeat_age_ms: float  # how old the group's last heartbeat was: the detection time


class Failover:
    def __init__(self, redis: Redis, scripts: Scripts, keys: Keys, *, settings: Settings, owner: str,
                 redis_uptime_s: Callable[[], float]) -> None:
        self.redis = redis
        self.scripts = scripts
        self.keys = keys
        self.settings = settings
        self.owner = owner
        self.redis_uptime_s = redis_uptime_s
        self.signing = SigningKey(redis, keys)

    def fail_over(self, group: str) -> FailedOver | None:
        """Move the dead ``group``'s requests; None when not done now (another balancer is on it,
        the group beat again, or Redis restarted too recently to judge)."""
        lock = self.keys.group_failover_lock(group)
        if not self.redis.set(lock, self.owner, nx=True, px=LOCK_MS):
            return None
        try:
            age_ms = self.heartbeat_age_ms(group)
            if age_ms is not None and age_ms <= self.settings.dead_after_s * 1000:
                return None
            if self.redis_uptime_s() < self.settings.dead_after_s + self.settings.heartbeat_interval_s:
                return None
            moved = self._move(group)
        finally:
            self.redis.delete(lock)
        log.warning("group %s is dead (heartbeat %.1fs old): moved %d requests to other groups",
                    group, (age_ms or 0.0) / 1000, moved)
        return FailedOver(moved, age_ms or 0.0)

    def _move(self, group: str) -> int:
        queue = self.keys.group_queue(group)
        self.redis.delete(self.keys.group_accepting(group))
        moved, cursor = 0, "-"
        signing_key = self.signing.get()  # entries put back on the ingress stream carry its signature
        while True:
            entries = cast("list[Entry]", self.redis.xrange(queue, min=cursor, max="+", count=500))
            if not entries:
                break
            pipe = self.redis.pipeline(transaction=False)
            for entry_id, fields in entries:
                try:
                    entry = queue_entry(fields, signing=self.signing)  # (a forged one is dropped)
                    pipe.xadd(self.keys.requests, entry.request.to_ingress(from_owner=group, epoch=entry.epoch,
                                                                             signing_key=signing_key))
                    moved += 1
                except Exception:
                    log.exception("dropping malformed queue entry %s of %s", entry_id, group)
            # XADD before XDEL: a crash in between leaves duplicates, which takeover makes harmless
            pipe.xdel(queue, *[e for e, _ in entries])
            pipe.execute()
            cursor = "(" + entries[-1][0].decode()
        self.scripts.retire_queue(queue=queue, queue_tokens=self.keys.group_queue_tokens(group))
        return moved

    def heartbeat_age_ms(self, group: str) -> float | None:
        """How old the group's heartbeat is now, on the Redis clock; None when it is not registered."""
        pipe = self.redis.pipeline(transaction=False)
        pipe_time(pipe, self.keys.groups)
        pipe.zscore(self.keys.groups, group)
        raw_time, score = pipe.execute()
        secs, micros = time_pair(raw_time)
        return None if score is None else secs * 1000.0 + micros / 1000.0 - score
