"""Claiming the pending entries of consumers that died (the ingress entries of balancers): XAUTOCLAIM,
made safe against what it returns. Used through ``broker.consumer.StreamConsumer.claim_idle``.

Two things make a claimed entry unusable, and neither may stop a balancer:

- **Deleted entries.** An entry ``XDEL``ed (or trimmed) after a balancer read it stays pending. Redis
  7 drops it from the pending list during ``XAUTOCLAIM`` and names it in a third reply element;
  Redis 6.2 claims it and returns it as nil, without its id (redis-py: ``(None, None)``). Its id
  is then found with ``XPENDING`` (which still lists it) and an empty ``XRANGE``; it is acknowledged.
- **Entries claimed too often.** ``XAUTOCLAIM`` counts deliveries. An entry delivered more than
  ``MAX_DELIVERIES`` times has outlived that many consumers (or restarts of one): whatever it does
  to them, it is given up (``broker.dead_letter``) instead of being tried once more.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, cast

from redis import Redis

log = logging.getLogger(__name__)

MAX_DELIVERIES = 5  # deliveries of one entry (first read + claims) before it is given up

Entry = tuple[bytes, dict[bytes, bytes]]


@dataclass(slots=True)
class Reclaimed:
    """What one XAUTOCLAIM pass found."""

    entries: list[Entry] = field(default_factory=list)  # to process like fresh ones
    gone: list[bytes] = field(default_factory=list)  # deleted after they were read: to acknowledge
    overdelivered: list[tuple[bytes, dict[bytes, bytes], int]] = field(default_factory=list)  # (.., deliveries)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class Reclaimer:
    """One consumer's XAUTOCLAIM cursor over the pending entries of ``group`` on ``stream``."""

    def __init__(self, redis: Redis, *, stream: str, group: str, consumer: str, min_idle_ms: int, count: int,
                 max_deliveries: int = MAX_DELIVERIES) -> None:
        self.redis = redis
        self.stream = stream
        self.group = group
        self.consumer = consumer
        self.min_idle_ms = min_idle_ms
        self.count = count
        self.max_deliveries = max_deliveries
        self.cursor = "0-0"

    def claim(self, *, skip: set[bytes] | dict[bytes, Any]) -> Reclaimed:
        """Claim entries idle past ``min_idle_ms``; those in ``skip`` (ours already) are left out."""
        start = self.cursor
        reply = self.redis.xautoclaim(self.stream, self.group, self.consumer, self.min_idle_ms,
                                      start, count=self.count)
        self.cursor = _text(reply[0])
        raw = list(reply[1]) if len(reply) > 1 and reply[1] else []
        out = Reclaimed()
        nil = False
        live: list[Entry] = []
        for item in raw:
            if not item or item[0] is None:
                nil = True  # Redis 6.2: a deleted entry, now pending on us, without its id
                continue
            entry_id, fields = item[0], item[1]
            if entry_id in skip:
                continue
            if fields:
                live.append((entry_id, fields))
            else:
                out.gone.append(entry_id)
        if not live and not nil:
            return out
        pending = self._pending(start, size=len(raw) + len(skip) + 1)
        if nil:
            known = {eid for eid, _f in live} | set(skip) | set(out.gone)
            out.gone += self._deleted([eid for eid in pending if eid not in known])
        for entry_id, fields in live:
            deliveries = pending.get(entry_id, 0)
            if deliveries > self.max_deliveries:
                out.overdelivered.append((entry_id, fields, deliveries))
            else:
                out.entries.append((entry_id, fields))
        return out

    def _pending(self, start: str, *, size: int) -> dict[bytes, int]:
        """Our pending entries from ``start`` on: entry id -> times delivered."""
        rows = cast("list[dict[str, Any]] | None",  # (bytes ids: no decode_responses)
                    self.redis.xpending_range(self.stream, self.group, min=start, max="+", count=size,
                                              consumername=self.consumer))
        return {row["message_id"]: int(row["times_delivered"]) for row in rows or [] if row.get("message_id")}

    def _deleted(self, candidates: list[bytes]) -> list[bytes]:
        """Those of ``candidates`` no longer in the stream."""
        if not candidates:
            return []
        pipe = self.redis.pipeline(transaction=False)
        for entry_id in candidates:
            pipe.xrange(self.stream, entry_id, entry_id, count=1)
        found = pipe.execute()
        return [eid for eid, rows in zip(candidates, found) if not rows]
