"""The balancer: ingress stream -> validated requests -> group queues; dead groups failed over.

Every balancer is a consumer in the ingress consumer group, so several run side by side and each
entry is read by one of them. An entry is acknowledged only after its request is on a group queue
or has its final event; a balancer killed at any instant leaves its entries pending, and another
(or its restart) claims them once idle for ``claim_idle_ms``. Dispatch is idempotent: the request
is first pinned to a group (CLAIM_OWNER), then queued at most once per epoch (DISPATCH), so a
re-processed entry never runs twice.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from redis.exceptions import ResponseError

from balancer.router import Router
from balancer.telemetry import BalancerTelemetry
from broker.connection import TRANSIENT_ERRORS, RedisClock, backoff_delays
from broker.errors import InvalidRequest
from broker.keys import INGRESS_GROUP, Keys
from broker.logs import request_extra
from broker.protocol import (
    GenerationRequest,
    best_effort_reply_to,
    done_event,
    error_event,
    limit_problem,
    parse_request,
)
from broker.registry import read_groups
from broker.scripts import Scripts, pack_events
from broker.settings import Settings

log = logging.getLogger(__name__)

PUBLISHER = "balancer"  # owner name under which balancers publish the final events they decide
CLOSED_GROUP_PAUSE_S = 2.0  # a group that refused work is skipped this long (its heartbeat catches up)


@dataclass(slots=True)
class Waiting:
    """An ingress entry read but not yet dispatched (no group yet, or re-routing)."""

    entry_id: bytes
    request: GenerationRequest
    since_ms: float  # when it started waiting (Redis clock)
    takeover_from: str | None = None
    takeover_epoch: int = 0


@dataclass(slots=True)
class Final:
    """A final event the balancer itself writes (invalid, cancelled, timed out, no group)."""

    entry_id: bytes
    request_id: str
    reply_to: str
    fields: dict[str, str]
    takeover_from: str | None = None
    takeover_epoch: int = 0


def _raise_transient(results: list[Any]) -> None:
    """A lost connection mid-pipeline is retried by the loop; other errors are per request."""
    for raw in results:
        if isinstance(raw, TRANSIENT_ERRORS):
            raise raw


class Balancer:
    def __init__(
        self,
        redis: Any,
        *,
        settings: Settings,
        name: str | None = None,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.redis = redis
        self.settings = settings
        self.keys = Keys(settings.prefix)
        self.name = name or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.scripts = Scripts(redis)
        self.clock = RedisClock(redis.time)
        self.router = Router()
        self.stop = threading.Event()
        self.waiting: dict[bytes, Waiting] = {}
        self.batch_sizes: Counter[int] = Counter()
        self.counts: Counter[str] = Counter()  # dispatched, invalid_request, cancelled, ...
        self._monotonic = monotonic
        self._cancelled: dict[str, float] = {}
        self._cancel_cursor = b"0-0"
        self._closed_until: dict[str, float] = {}
        self._next_refresh = 0.0
        self._next_claim = 0.0
        self._next_housekeeping = 0.0
        self._claim_cursor = "0-0"
        self._to_ack: list[bytes] = []  # done with, acknowledged with the next read
        self._failed_over: dict[str, int] = {}  # dead group -> heartbeat_ms when its queue was taken over
        self.telemetry = BalancerTelemetry(enabled=settings.metrics_port is not None,
                                           ready_within_s=settings.dead_after_s,
                                           live_within_s=settings.liveness_timeout_s, monotonic=monotonic)

    # --- lifecycle -------------------------------------------------------------------------------

    def setup(self) -> None:
        try:
            # From id 0: requests sent before the first balancer started are served too.
            self.redis.xgroup_create(self.keys.requests, INGRESS_GROUP, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        last = self.redis.xrevrange(self.keys.cancel, count=1)
        self._cancel_cursor = last[0][0] if last else b"0-0"

    def run(self) -> None:
        delays = None
        while not self.stop.is_set():
            try:
                self.tick()
                delays = None
            except TRANSIENT_ERRORS as exc:
                delays = delays or backoff_delays(self.settings)
                delay = next(delays)
                log.warning("redis unavailable (%s); retrying in %.2fs", exc, delay)
                self.stop.wait(delay)
            except Exception:
                # Never die on one bad entry or an unexpected reply: what was not acked is retried.
                log.exception("balancer tick failed; retrying")
                self.stop.wait(next(backoff_delays(self.settings)))
        try:
            self.flush_acks()
        except TRANSIENT_ERRORS:
            pass  # left pending: another balancer re-processes them harmlessly
        log.info("balancer %s stopped; %d waiting requests stay pending for other balancers",
                 self.name, len(self.waiting))

    # --- one iteration ---------------------------------------------------------------------------

    def tick(self) -> None:
        now = self._monotonic()
        if now >= self._next_refresh:
            self._next_refresh = now + self.settings.groups_refresh_s
            self.refresh_groups()
        entries: list[tuple[bytes, dict[bytes, bytes]]] = []
        if now >= self._next_claim:
            self._next_claim = now + self.settings.claim_idle_ms / 3000.0
            entries += self._reclaim()
        fresh = self._read()
        after_read = self._monotonic()
        if fresh and after_read >= self._next_refresh:
            # The read may have blocked a while: route by heartbeats read now, not before it.
            self._next_refresh = after_read + self.settings.groups_refresh_s
            self.refresh_groups()
        self.process(entries + fresh)
        if len(fresh) < self.settings.balancer_batch_max:
            self.flush_acks()  # no full batch behind: the next read may block, acknowledge now
        if now >= self._next_housekeeping:
            self._next_housekeeping = now + 30.0
            self._housekeeping()

    def _read(self) -> list[tuple[bytes, dict[bytes, bytes]]]:
        # Waiting requests are re-checked every tick; block anyway while none of them can be routed
        # (no live group, or all refused work lately): without it the loop spins on Redis for as long
        # as requests wait for a group (up to no_group_wait_s, e.g. while workers load a model).
        now = self._monotonic()
        can_route = any(g.routable and self._closed_until.get(g.name, 0.0) <= now
                        for g in self.router.groups)
        block = None if self.waiting and can_route else self.settings.balancer_block_ms
        pipe = self.redis.pipeline(transaction=False)
        acks = len(self._to_ack)
        if acks:
            pipe.xack(self.keys.requests, INGRESS_GROUP, *self._to_ack)
            pipe.xdel(self.keys.requests, *self._to_ack)
        pipe.xreadgroup(INGRESS_GROUP, self.name, {self.keys.requests: ">"},
                        count=self.settings.balancer_batch_max, block=block)
        pipe.xread({self.keys.cancel: self._cancel_cursor}, count=1000)
        *_, fresh, cancels = pipe.execute()
        del self._to_ack[:acks]
        now_ms = self.clock.now_ms()
        for _stream, items in cancels or []:
            for entry_id, fields in items:
                self._cancel_cursor = entry_id
                if fields.get(b"id"):
                    self._cancelled[fields[b"id"].decode("utf-8", "replace")] = now_ms
        entries = [e for _s, items in (fresh or []) for e in items]
        if entries:
            self.batch_sizes[len(entries)] += 1
            self.telemetry.read(len(entries))
        return entries

    def _reclaim(self) -> list[tuple[bytes, dict[bytes, bytes]]]:
        """Entries of balancers that died (idle past claim_idle_ms) become ours; ours stay fresh."""
        if self.waiting:
            self.redis.xclaim(self.keys.requests, INGRESS_GROUP, self.name, 0, list(self.waiting), justid=True)
        reply = self.redis.xautoclaim(self.keys.requests, INGRESS_GROUP, self.name,
                                      self.settings.claim_idle_ms, self._claim_cursor,
                                      count=self.settings.balancer_batch_max)
        self._claim_cursor = reply[0].decode() if isinstance(reply[0], bytes) else str(reply[0])
        claimed = [(eid, fields) for eid, fields in reply[1] if eid not in self.waiting]
        gone = [eid for eid, fields in claimed if not fields]  # deleted after it was read
        if gone:
            self._ack(gone)
        if len(claimed) > len(gone):
            log.info("claimed %d pending requests of stopped balancers", len(claimed) - len(gone))
        return [(eid, fields) for eid, fields in claimed if fields]

    def process(self, entries: list[tuple[bytes, dict[bytes, bytes]]]) -> None:
        """Validate new entries, then route everything waiting (new first in priority order)."""
        now_ms = self.clock.now_ms()
        finals: list[Final] = []
        for entry_id, fields in entries:
            if entry_id in self.waiting:
                continue
            eid = entry_id.decode()
            try:
                request = parse_request(fields, entry_id=eid, prefix=self.settings.prefix,
                                        max_request_bytes=self.settings.max_request_bytes,
                                        default_max_tokens=self.settings.default_max_tokens)
            except InvalidRequest as exc:
                rid, reply = best_effort_reply_to(fields, entry_id=eid, prefix=self.settings.prefix)
                finals.append(Final(entry_id, rid, reply, error_event(rid, exc.code, str(exc))))
                self.counts["invalid_request"] += 1
                self.telemetry.finished(rid, finals[-1].fields)
                continue
            self.waiting[entry_id] = Waiting(entry_id, request, now_ms, request.takeover_from,
                                             request.takeover_epoch)
        if not self.waiting and not finals:
            return

        assignments: list[tuple[Waiting, str]] = []
        now = self._monotonic()
        closed = frozenset(g for g, until in self._closed_until.items() if until > now)
        for w in sorted(self.waiting.values(), key=lambda w: (w.request.priority, w.request.enqueued_ms)):
            request, final = w.request, None
            if request.id in self._cancelled:
                final = done_event(request.id, text="", token_ids=[], finish_reason="cancelled", prompt_tokens=0)
            elif request.deadline_ms is not None and now_ms >= request.deadline_ms:
                final = error_event(request.id, "timeout", f"deadline of {request.timeout_s}s passed before dispatch")
            else:
                group = self.router.pick(exclude=closed)
                if group is None:
                    if now_ms - w.since_ms >= self.settings.no_group_wait_s * 1000:
                        final = error_event(request.id, "unavailable",
                                            f"no live worker group for {self.settings.no_group_wait_s}s")
                    else:
                        continue  # stays waiting
                elif request.prompt_ids is not None and (problem := limit_problem(
                        request.prompt_ids, request.sampling.max_tokens,
                        vocab_size=group.vocab_size, max_context=group.max_context)):
                    final = error_event(request.id, "invalid_request", problem)
                else:
                    self.router.sent(group.name)
                    assignments.append((w, group.name))
                    continue
            del self.waiting[w.entry_id]
            self.counts[final["code"] if final["event"] == "error" else "cancelled"] += 1
            self.telemetry.finished(request.id, final)
            finals.append(Final(w.entry_id, request.id, request.reply_to, final, w.takeover_from, w.takeover_epoch))
        if assignments or finals:
            self._dispatch(assignments, finals)

    def _dispatch(self, assignments: list[tuple[Waiting, str]], finals: list[Final]) -> None:
        ttl_ms = self.settings.result_ttl_s * 1000

        # Phase 1: pin each request to its group (or learn where it is pinned already).
        def claim(pipe: Any) -> None:
            for w, group in assignments:
                self.scripts.claim_owner(keys=[self.keys.state(w.request.reply_to, w.request.id)],
                                         args=[group, ttl_ms, w.takeover_from or "", w.takeover_epoch], client=pipe)
            for f in finals:
                self.scripts.claim_owner(keys=[self.keys.state(f.reply_to, f.request_id)],
                                         args=[PUBLISHER, ttl_ms, f.takeover_from or "", f.takeover_epoch],
                                         client=pipe)

        _, claims = self.scripts.execute(claim)
        _raise_transient(claims)

        # Phase 2: queue pinned requests once; write the balancer's own final events.
        acks: list[bytes] = []
        sent: list[tuple[Waiting, str, int]] = []
        for (w, _candidate), raw in zip(assignments, claims[: len(assignments)]):
            if isinstance(raw, Exception):
                log.error("request %s: cannot claim: %s; will retry", w.request.id, raw,
                          extra=request_extra(w.request.id))
                continue
            owner, epoch, finished = raw[0].decode(), int(raw[1]), raw[2]
            if finished:
                acks.append(w.entry_id)
                del self.waiting[w.entry_id]
                continue
            target = self.router.find(owner)
            if target is None or not target.routable:
                # pinned to a group that is gone, or by a balancer that never finished it: take over
                w.takeover_from, w.takeover_epoch = owner, epoch
                continue
            sent.append((w, owner, epoch))
        published: list[tuple[Final, int]] = []
        for f, raw in zip(finals, claims[len(assignments):]):
            if isinstance(raw, Exception):
                log.error("request %s: cannot claim: %s", f.request_id, raw, extra=request_extra(f.request_id))
            elif not raw[2] and raw[0].decode() == PUBLISHER:
                published.append((f, int(raw[1])))
            acks.append(f.entry_id)  # finished, owned by a group, or published now

        def dispatch(pipe: Any) -> None:
            for w, group, epoch in sent:
                self.scripts.dispatch(
                    keys=[self.keys.group_queue(group), self.keys.dispatch_marker(group, w.request.id, epoch),
                          self.keys.group_accepting(group)],
                    args=[w.request.to_wire(), epoch, ttl_ms], client=pipe)
            for f, epoch in published:
                self.scripts.publish(keys=[f.reply_to, self.keys.state(f.reply_to, f.request_id)],
                                     args=[PUBLISHER, epoch, ttl_ms, pack_events([("f", 0, f.fields)])],
                                     client=pipe)

        _, results = self.scripts.execute(dispatch) if sent or published else (None, [])
        _raise_transient(results)
        for (w, group, epoch), raw in zip(sent, results[: len(sent)]):
            if isinstance(raw, Exception):
                log.error("request %s: cannot dispatch to %s: %s; will retry", w.request.id, group, raw,
                          extra=request_extra(w.request.id))
                continue
            if raw[0] == b"closed":
                # draining or failed over: route elsewhere, taking the request over from it
                self._closed_until[group] = self._monotonic() + CLOSED_GROUP_PAUSE_S
                w.takeover_from, w.takeover_epoch = group, epoch
                continue
            acks.append(w.entry_id)
            del self.waiting[w.entry_id]
            self.counts["dispatched"] += 1
            self.telemetry.dispatched(w.request.id, group, epoch=epoch, taken_from=w.takeover_from)
        for (f, _epoch), raw in zip(published, results[len(sent):]):
            if isinstance(raw, Exception):
                log.error("request %s: cannot publish to %r: %s", f.request_id, f.reply_to, raw,
                          extra=request_extra(f.request_id))
        self._ack(acks)

    def _ack(self, entry_ids: list[bytes]) -> None:
        """Acknowledge (and delete) ingress entries with the next read: one round trip less per batch.

        Until then they stay pending; should this balancer die first, re-processing them is harmless.
        """
        self._to_ack.extend(entry_ids)

    def flush_acks(self) -> None:
        if self._to_ack:
            pipe = self.redis.pipeline(transaction=False)
            pipe.xack(self.keys.requests, INGRESS_GROUP, *self._to_ack)
            pipe.xdel(self.keys.requests, *self._to_ack)
            pipe.execute()
            self._to_ack.clear()

    # --- groups: health and failover -------------------------------------------------------------

    def refresh_groups(self) -> None:
        groups = read_groups(self.redis, self.keys, dead_after_s=self.settings.dead_after_s)
        self.router.update(groups)
        self.telemetry.groups(groups, waiting=len(self.waiting))
        for g in groups:
            if not g.alive and self._failed_over.get(g.name) != g.heartbeat_ms:
                self.fail_over(g.name)
                self._failed_over[g.name] = g.heartbeat_ms
            if g.heartbeat_age_s > self.settings.forget_dead_after_s:
                self.redis.zrem(self.keys.groups, g.name)
                self.redis.delete(self.keys.group_info(g.name))

    def fail_over(self, group: str) -> int:
        """Put a dead group's queued and in-flight requests back on the ingress stream.

        The group's accepting flag goes first, so no balancer adds to the queue meanwhile; each
        request is taken over from the dead group's epoch, which fences the group should it wake.
        Returns how many requests were moved.
        """
        queue = self.keys.group_queue(group)
        lock = self.keys.group_failover_lock(group)
        if not self.redis.set(lock, self.name, nx=True, px=30_000):
            return 0  # another balancer is on it
        moved = 0
        try:
            self.redis.delete(self.keys.group_accepting(group))
            cursor = "-"
            while True:
                entries = self.redis.xrange(queue, min=cursor, max="+", count=500)
                if not entries:
                    break
                pipe = self.redis.pipeline(transaction=False)
                for entry_id, fields in entries:
                    try:
                        request = GenerationRequest.from_wire(fields[b"r"])
                        pipe.xadd(self.keys.requests, request.to_ingress(from_owner=group, epoch=int(fields[b"e"])))
                        moved += 1
                    except Exception:
                        log.exception("dropping malformed queue entry %s of %s", entry_id, group)
                pipe.xdel(queue, *[e for e, _ in entries])
                pipe.execute()
                cursor = "(" + entries[-1][0].decode()
            self.redis.delete(queue)
        finally:
            self.redis.delete(lock)
        self.telemetry.failed_over(group, moved)
        if moved:
            log.warning("group %s is dead: moved %d requests to other groups", group, moved)
        return moved

    def _housekeeping(self) -> None:
        """Forget old cancellations; trim the cancel stream; drop long-gone balancer consumers."""
        now_ms = self.clock.now_ms()
        horizon = now_ms - 600_000
        self._cancelled = {k: v for k, v in self._cancelled.items() if v >= horizon}
        self.redis.xtrim(self.keys.cancel, minid=f"{int(horizon)}-0", approximate=True)
        for consumer in self.redis.xinfo_consumers(self.keys.requests, INGRESS_GROUP):
            if consumer["pending"] == 0 and consumer["idle"] > 3_600_000 and consumer["name"] != self.name.encode():
                self.redis.xgroup_delconsumer(self.keys.requests, INGRESS_GROUP, consumer["name"])
