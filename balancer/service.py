"""The balancer: ingress stream -> validated requests -> group queues; dead groups failed over.

Every balancer is a consumer in the ingress consumer group, so several run side by side and each
entry is read by one of them. An entry is acknowledged only after its request is on a group queue
or has its final event; a balancer killed at any instant leaves its entries pending, and another
(or its restart) claims them once idle for ``claim_idle_ms``. Dispatch is idempotent: the request
is first pinned to a group (CLAIM_OWNER), then queued at most once per epoch (DISPATCH), so a
re-processed entry never runs twice.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from typing import Any

from redis.exceptions import ResponseError

from balancer.admission import Limits, request_cost
from balancer.batching import AdaptiveBatcher
from balancer.failover import Failover
from balancer.ingress import IngressReader
from balancer.models import resolve_model
from balancer.pending import Final, Waiting, claim_reply
from balancer.poison import PoisonHandling
from balancer.reclaim import Reclaimer
from balancer.router import Router
from balancer.routing import AffinityTable, RoutingPolicy, prefix_key
from balancer.telemetry import BalancerTelemetry
from broker.cancellation import Cancellations
from broker.connection import TRANSIENT_ERRORS, RedisClock, backoff_delays
from broker.dead_letter import Attempts, DeadLetters
from broker.errors import InvalidRequest
from broker.failures import describe, raise_if_fatal
from broker.keys import INGRESS_GROUP, QUEUE_GROUP, Keys
from broker.protocol import (
    best_effort_reply_to,
    done_event,
    error_event,
    limit_problem,
    parse_request,
)
from broker.registry import read_groups, read_queue_loads
from broker.scripts import OVERSIZE_FIELD, Claim, Scripts, pack_events
from broker.settings import Settings
from broker.wire import Batch

log = logging.getLogger(__name__)

PUBLISHER = "balancer"  # owner name under which balancers publish the final events they decide
CLOSED_GROUP_PAUSE_S = 2.0  # a group that refused work is skipped this long (its heartbeat catches up)
FIRST_EPOCH = 1  # the epoch CLAIM_OWNER gives a request nobody claimed before
DISPATCH_ROUNDS = 3  # a request refused by a full or closed group is routed again, at most this often


def _of(model: str | None) -> str:
    return f" of model {model!r}" if model is not None else ""


def _raise_transient(results: list[Any]) -> None:
    """A lost connection mid-pipeline is retried by the loop; other errors are per request."""
    for raw in results:
        if isinstance(raw, TRANSIENT_ERRORS):
            raise raw


class Balancer(IngressReader, PoisonHandling):
    def __init__(
        self,
        redis: Any,
        *,
        settings: Settings,
        name: str | None = None,
        monotonic: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
        redis_uptime_s: Callable[[], float] | None = None,
        adaptive_routing: bool = True,
    ) -> None:
        self.redis = redis
        self.settings = settings
        self.keys = Keys(settings.prefix)
        self.name = name or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.scripts = Scripts(redis)
        self.clock = RedisClock(redis.time)
        self.limits = Limits.from_settings(settings)
        self.router = Router(policy=RoutingPolicy(), limits=self.limits, adaptive=adaptive_routing,
                             affinity=AffinityTable(ttl_s=settings.affinity_ttl_s))
        self.batcher = AdaptiveBatcher(max_batch=settings.balancer_batch_max,
                                       max_wait_s=settings.balancer_batch_wait_ms / 1000.0)
        self.stop = threading.Event()
        self.waiting: dict[bytes, Waiting] = {}
        self.counts: Counter[str] = Counter()  # dispatched, invalid_request, cancelled, overloaded, ...
        self.detections_ms: list[float] = []  # heartbeat age of each group this balancer failed over
        self._monotonic = monotonic
        self._sleep = sleep
        self.failover = Failover(redis, self.scripts, self.keys, settings=settings, owner=self.name,
                                 redis_uptime_s=redis_uptime_s or self._redis_uptime_s)
        self._cancelled = Cancellations()  # cancel entries read lately
        self._cancel_cursor = b"0-0"
        self._closed_until: dict[str, float] = {}  # refused work as closed: skipped until then
        self._full_until: dict[str, float] = {}  # refused work as full: no room until then
        self._next_refresh = 0.0
        self._next_claim = 0.0
        self._next_housekeeping = 0.0
        self._next_stats = 0.0
        # Entries one read may return: their bodies fit in balancer_read_bytes (larger ones are stubs).
        self._read_count = max(1, min(settings.balancer_batch_max,
                                      settings.balancer_read_bytes // settings.max_request_bytes))
        self.reclaimer = Reclaimer(redis, self.keys, consumer=self.name, min_idle_ms=settings.claim_idle_ms,
                                   count=self._read_count)
        self.attempts = Attempts()  # entries whose handling failed, backing off before the next try
        self._to_ack: list[bytes] = []  # done with, acknowledged with the next read
        self._failed_over: dict[str, int] = {}  # dead group -> heartbeat_ms when its queue was taken over
        self.telemetry = BalancerTelemetry(enabled=settings.metrics_port is not None,
                                           ready_within_s=settings.dead_after_s,
                                           live_within_s=settings.liveness_timeout_s, monotonic=monotonic)
        self.dead_letters = DeadLetters(redis, self.scripts, self.keys, publisher=PUBLISHER,
                                        ttl_ms=settings.result_ttl_s * 1000, on_dead=self.telemetry.dead_lettered)

    @property
    def batch_sizes(self) -> Counter[int]:
        return self.batcher.sizes

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
                raise_if_fatal(exc)
                delays = delays or backoff_delays(self.settings)
                delay = next(delays)
                log.warning("redis unavailable (%s); retrying in %.2fs", exc, delay)
                self.stop.wait(delay)
            except ResponseError as exc:
                raise_if_fatal(exc)
                if (problem := describe(exc)) is not None:  # out of memory, a read-only replica
                    log.warning("%s; retrying", problem.line)
                    self.stop.wait(next(delays := delays or backoff_delays(self.settings)))
                    continue
                if "NOGROUP" in str(exc):
                    # Redis lost the ingress stream (restarted without persistence): start it again.
                    log.error("the ingress consumer group is gone (%s); creating it again", exc)
                    self.stop.wait(next(delays := delays or backoff_delays(self.settings)))
                    self._retry(self.setup)
                    continue
                log.exception("balancer tick failed; retrying")
                self.stop.wait(next(delays := delays or backoff_delays(self.settings)))
            except Exception:
                # Never die on an unexpected reply: what was not acked is retried, after a backoff that
                # grows while the failures go on (per-request failures never get here: _give_up).
                log.exception("balancer tick failed; retrying")
                self.stop.wait(next(delays := delays or backoff_delays(self.settings)))
        try:
            self.flush_acks()
            # No longer a reader of the ingress stream: health checks of the path see it at once.
            self.redis.zrem(self.keys.balancers, self.name)
        except TRANSIENT_ERRORS:
            pass  # left pending: another balancer re-processes them harmlessly
        log.info("balancer %s stopped; %d waiting requests stay pending for other balancers",
                 self.name, len(self.waiting))

    def _redis_uptime_s(self) -> float:
        return float(self.redis.info("server").get("uptime_in_seconds", 1 << 30))

    def _retry(self, fn: Callable[[], object]) -> None:
        """Call ``fn`` once from an error handler; a failure is logged and the loop tries again."""
        try:
            fn()
        except Exception as exc:  # noqa: BLE001 - whatever broke, the loop goes on and tries again
            log.warning("%s failed (%s); trying again", getattr(fn, "__name__", "call"), exc)

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
        # Acknowledgements go out with the next read's pipeline, ahead of its (possibly blocking)
        # XREADGROUP: Redis runs them at once, so no round trip of their own is needed.
        self.process(entries + fresh)
        if after_read >= self._next_stats:
            self._next_stats = after_read + self.settings.stats_interval_s
            self.write_stats()
        if now >= self._next_housekeeping:
            self._next_housekeeping = now + 30.0
            self._housekeeping()

    def _can_route_waiting(self, now: float) -> bool:
        """Whether a routable group, not paused, serves the model of some waiting request (any group
        for one whose model is not resolved yet)."""
        wanted = {w.request.model if w.model_resolved else None for w in self.waiting.values()}
        return any(g.routable and self._closed_until.get(g.name, 0.0) <= now
                   and (None in wanted or any(g.serves(m) for m in wanted if m is not None))
                   for g in self.router.groups)

    def process(self, entries: list[tuple[bytes, dict[bytes, bytes]]]) -> None:
        """Validate new entries, then route everything waiting (in priority order)."""
        now_ms = self.clock.now_ms()
        finals: list[Final] = []
        admitted: list[Waiting] = []
        for entry_id, fields in entries:
            if entry_id in self.waiting:
                continue
            try:
                final = self._admit(entry_id, fields, now_ms)
            except Exception as exc:
                if isinstance(exc, TRANSIENT_ERRORS):
                    raise
                rid, reply = best_effort_reply_to(fields, entry_id=entry_id.decode(), prefix=self.settings.prefix)
                self._give_up(entry_id, rid, reply, exc, fields=fields)
                continue
            if final is not None:
                finals.append(final)
            elif entry_id in self.waiting:
                admitted.append(self.waiting[entry_id])
        finals = self._hold_for_refused(finals) + self._refuse_duplicates(admitted)
        for _round in range(DISPATCH_ROUNDS):
            assignments, more = self._route(now_ms)
            finals += more
            if not assignments and not finals:
                return
            refused = self._dispatch(assignments, finals)
            finals = []
            if not refused:
                return

    def _admit(self, entry_id: bytes, fields: dict[bytes, bytes], now_ms: float) -> Final | None:
        """Validate one entry: it waits for a group, or gets its final event (returned)."""
        eid = entry_id.decode()
        try:
            if OVERSIZE_FIELD in fields:  # a stub of READ_INGRESS: the body stayed in Redis
                raise InvalidRequest(f"request is {int(fields[OVERSIZE_FIELD])} bytes, over the limit of "
                                     f"{self.settings.max_request_bytes} bytes")
            request = parse_request(fields, entry_id=eid, prefix=self.settings.prefix,
                                    max_request_bytes=self.settings.max_request_bytes,
                                    default_max_tokens=self.settings.default_max_tokens)
            # What cannot be serialized cannot be queued: found here, it ends this entry alone
            # (the guard around _admit), rather than failing every later dispatch pipeline.
            request.to_wire()
        except InvalidRequest as exc:
            rid, reply = best_effort_reply_to(fields, entry_id=eid, prefix=self.settings.prefix)
            final = Final(entry_id, rid, reply, error_event(rid, exc.code, str(exc)))
            self.counts["invalid_request"] += 1
            self.telemetry.finished(rid, final.fields)
            return final
        moved = request.takeover_from is not None
        self.waiting[entry_id] = Waiting(
            entry_id, request, now_ms, request.takeover_from, request.takeover_epoch, moved=moved,
            prefix=prefix_key(request, chars=self.settings.affinity_prefix_chars,
                              tokens=self.settings.affinity_prefix_tokens))
        return None

    def _route(self, now_ms: float) -> tuple[list[tuple[Waiting, str]], list[Final]]:
        """A group for every waiting request that can go now, or its final event. Each request goes
        to a group of its model (balancer.models); the admission bounds count each model's groups."""
        assignments: list[tuple[Waiting, str]] = []
        finals: list[Final] = []
        now = self._monotonic()
        closed = frozenset(g for g, until in self._closed_until.items() if until > now)
        full = frozenset(g for g, until in self._full_until.items() if until > now)
        totals: dict[str | None, list[int]] = {}  # model -> [requests, tokens] on its groups, as sent
        held_back = 0  # requests that stay waiting here: bounded like the groups' queues
        for w in sorted(self.waiting.values(), key=lambda w: (w.request.priority, w.request.enqueued_ms)):
            if not self.attempts.ready(w.entry_id, now=now):
                continue  # failed lately: backing off (see _request_failed)
            try:
                request, final = w.request, None
                model, unroutable = self._model_of(w)
                routable = self.router.routable(model=model)
                w.cost = request_cost(request, max_context=max((g.max_context for g in routable), default=1 << 31))
                if model not in totals:
                    load = self.router.totals(model=model)
                    totals[model] = [load.requests, load.tokens]
                total = totals[model]
                if self._cancelled.matches(request.id, request.cancel_token):
                    final = done_event(request.id, text="", token_ids=[], finish_reason="cancelled", prompt_tokens=0)
                elif request.deadline_ms is not None and now_ms >= request.deadline_ms:
                    final = error_event(request.id, "timeout", f"deadline of {request.timeout_s}s passed before dispatch")
                elif unroutable is not None:
                    final = unroutable
                elif not routable:
                    if now_ms - w.since_ms >= self.settings.no_group_wait_s * 1000:
                        final = error_event(request.id, "unavailable", f"no live worker group{_of(model)} for "
                                                                       f"{self.settings.no_group_wait_s}s")
                    elif w.moved or held_back < self.limits.total_requests:
                        held_back += 1
                        continue  # stays waiting
                    else:
                        final = error_event(request.id, "overloaded", f"{held_back} requests wait for a worker group already")
                elif not w.moved and (total[0] + 1 > self.limits.total_requests
                                      or total[1] + w.cost > self.limits.total_tokens):
                    final = error_event(request.id, "overloaded", (
                        f"the worker groups{_of(model)} hold {total[0]} requests and {total[1]} tokens, at the bounds "
                        f"of {self.limits.total_requests} and {self.limits.total_tokens}; retry later"))
                else:
                    group = self.router.pick(prefix=w.prefix, cost=w.cost, now=now,
                                             exclude=closed if w.moved else closed | full, bounded=not w.moved,
                                             model=model, weights=request.weights if w.moved else None)
                    if group is None:
                        if not self.router.routable(exclude=closed, model=model) or w.moved:
                            held_back += 1
                            continue  # every group refused work lately: try again next tick
                        final = error_event(request.id, "overloaded", (
                            f"every worker group{_of(model)} is at its queue bound ({self.limits.group_requests} "
                            f"requests, {self.limits.group_tokens} tokens); retry later"))
                    elif request.prompt_ids is not None and (problem := limit_problem(
                            request.prompt_ids, request.sampling.needed_tokens,
                            vocab_size=group.vocab_size, max_context=group.max_context)):
                        final = error_event(request.id, "invalid_request", problem)
                    else:
                        self.router.sent(group.name, w.cost)
                        total[0] += 1
                        total[1] += w.cost
                        assignments.append((w, group.name))
                        continue
            except Exception as exc:
                if isinstance(exc, TRANSIENT_ERRORS):
                    raise
                self._give_up(w.entry_id, w.request.id, w.request.reply_to, exc)
                continue
            del self.waiting[w.entry_id]
            self.counts[final["code"] if final["event"] == "error" else "cancelled"] += 1
            self.telemetry.finished(request.id, final)
            finals.append(Final(w.entry_id, request.id, request.reply_to, final, w.takeover_from, w.takeover_epoch))
        return assignments, finals

    def _model_of(self, w: Waiting) -> tuple[str | None, dict[str, str] | None]:
        """The served model ``w`` goes to (then set on its request, so that it stays on that model
        when it moves), None while no group is registered; or the error event when there is none."""
        if w.model_resolved:
            return w.request.model, None
        try:
            model = resolve_model(w.request.model, self.router.groups, default=self.settings.default_model)
        except InvalidRequest as exc:
            return None, error_event(w.request.id, exc.code, str(exc))
        if model is not None:
            w.model_resolved = True
            if model != w.request.model:
                w.request = w.request.model_copy(update={"model": model})
        return model, None

    def _dispatch(self, assignments: list[tuple[Waiting, str]], finals: list[Final]) -> bool:
        """Claim, then queue or publish. True when some group refused (full or closed): route again.

        A request nobody claimed before is claimed and queued in one round trip: its DISPATCH rides
        in the claim's pipeline with the epoch a first claim gives (FIRST_EPOCH). Where the claim
        says otherwise (the request was pinned before: a re-submitted id, a re-read entry), that
        entry is taken back off the queue and the request goes where its claim says. The two calls
        stay separate scripts: their keys live in different cluster slots.
        """
        ttl_ms = self.settings.result_ttl_s * 1000
        eager = [w.takeover_from is None and not w.moved and not w.claimed for w, _group in assignments]

        # Phase 1: pin each request to its group (or learn where it is pinned already).
        def claim(pipe: Batch) -> None:
            for (w, group), first in zip(assignments, eager):
                self.scripts.claim_owner(progress=self.keys.progress(w.request.reply_to, w.request.id),
                                         reply_stream=w.request.reply_to, group=group, ttl_ms=ttl_ms,
                                         taken_from=w.takeover_from, taken_from_epoch=w.takeover_epoch, client=pipe)
                if first:
                    self._queue(pipe, w, group, FIRST_EPOCH)
            for f in finals:
                self.scripts.claim_owner(progress=self.keys.progress(f.reply_to, f.request_id),
                                         reply_stream=f.reply_to, group=PUBLISHER, ttl_ms=ttl_ms,
                                         taken_from=f.takeover_from, taken_from_epoch=f.takeover_epoch, client=pipe)

        _, results = self.scripts.execute(claim)
        _raise_transient(results)
        replies = iter(results)

        # Phase 2: queue pinned requests once; write the balancer's own final events.
        acks: list[bytes] = []
        sent: list[tuple[Waiting, str, int]] = []
        retract: list[tuple[str, Any]] = []  # (group, DISPATCH reply) of eager entries the claim overruled
        refused = False
        for (w, candidate), first in zip(assignments, eager):
            raw = next(replies)
            queued = next(replies) if first else None
            w.claimed = True
            got = claim_reply(raw)
            if first:
                if isinstance(got, Claim) and not got.finished and (got.owner, got.epoch) == (candidate, FIRST_EPOCH):
                    refused |= self._queued(w, candidate, FIRST_EPOCH, queued, acks)
                    continue
                retract.append((candidate, queued))
            if isinstance(got, Exception):
                # CLAIM_OWNER touches only keys of the reply stream's: its error is about them
                self._request_failed(w, got, reply_to_failed=True)
                continue
            if got.finished:
                acks.append(w.entry_id)
                del self.waiting[w.entry_id]
                continue
            target = self.router.find(got.owner)
            if target is None or not target.routable:
                # pinned to a group that is gone, or by a balancer that never finished it: take over
                w.takeover_from, w.takeover_epoch = got.owner, got.epoch
                continue
            if got.output_ids != w.request.output_ids:
                # moved mid-generation: the new group continues after what the stream carries already
                w.request = w.request.model_copy(update={"output_ids": got.output_ids})
            sent.append((w, got.owner, got.epoch))
        published: list[tuple[Final, int, dict[str, str]]] = []
        for f in finals:
            got = claim_reply(next(replies))
            if isinstance(got, Exception):
                self._give_up(f.entry_id, f.request_id, f.reply_to, got, reply_to_failed=True)
                continue
            if not got.finished and got.owner == PUBLISHER:
                published.append((f, got.epoch, f.with_progress(got)))
            acks.append(f.entry_id)  # finished, owned by a group, or published now

        def dispatch(pipe: Batch) -> None:
            for w, group, epoch in sent:
                self._queue(pipe, w, group, epoch)
            for f, epoch, fields in published:
                self.scripts.publish(reply_stream=f.reply_to, progress=self.keys.progress(f.reply_to, f.request_id),
                                     publisher=PUBLISHER, epoch=epoch, ttl_ms=ttl_ms,
                                     events=pack_events([("f", 0, fields)]), client=pipe)
            for group, queued in retract:
                if not isinstance(queued, Exception) and queued[0] == b"ok":
                    # never run: were the group to read it first, its publishes are fenced (wrong epoch)
                    self.scripts.ack(queue=self.keys.group_queue(group), queue_tokens=self.keys.group_queue_tokens(group),
                                     consumer_group=QUEUE_GROUP, entry_ids=[queued[1]], client=pipe)

        _, results = self.scripts.execute(dispatch) if sent or published or retract else (None, [])
        _raise_transient(results)
        for (w, group, epoch), raw in zip(sent, results[: len(sent)]):
            refused |= self._queued(w, group, epoch, raw, acks)
        for (f, _epoch, _fields), raw in zip(published, results[len(sent):]):
            if isinstance(raw, Exception):
                self._give_up(f.entry_id, f.request_id, f.reply_to, raw, reply_to_failed=True)
        self._ack(acks)
        return refused

    def _queue(self, pipe: Batch, w: Waiting, group: str, epoch: int) -> None:
        """Add the DISPATCH of ``w`` to ``group``'s queue under ``epoch`` to ``pipe``."""
        bounded = not w.moved
        self.scripts.dispatch(
            queue=self.keys.group_queue(group), marker=self.keys.dispatch_marker(group, w.request.id, epoch),
            accepting=self.keys.group_accepting(group), queue_tokens=self.keys.group_queue_tokens(group),
            request=self._wire(w, group), epoch=epoch, marker_ttl_ms=self.settings.result_ttl_s * 1000,
            cost=w.cost, max_entries=self.limits.group_requests if bounded else 0,
            max_tokens=self.limits.group_tokens if bounded else 0, client=pipe)

    def _wire(self, w: Waiting, group: str) -> bytes:
        """``w``'s request as queued for ``group``: stamped with the group's weights fingerprint, unless
        it carries tokens already, which keep the stamp of the weights that made them."""
        if not w.request.output_ids:
            target = self.router.find(group)
            weights = target.weights or None if target is not None else None
            if weights != w.request.weights:
                w.request = w.request.model_copy(update={"weights": weights})
        return w.request.to_wire()

    def _queued(self, w: Waiting, group: str, epoch: int, raw: Any, acks: list[bytes]) -> bool:
        """Take in a DISPATCH reply; True when the group refused (full or closed): route again."""
        if isinstance(raw, Exception) or not isinstance(raw, list) or not raw:
            self._request_failed(w, raw if isinstance(raw, Exception) else TypeError(f"DISPATCH replied {raw!r:.80}"))
            return False
        if raw[0] in (b"closed", b"full"):
            # draining or failed over, or at its bound: route elsewhere, taking the request over
            pause = CLOSED_GROUP_PAUSE_S if raw[0] == b"closed" else self.settings.groups_refresh_s
            (self._closed_until if raw[0] == b"closed" else self._full_until)[group] = self._monotonic() + pause
            w.takeover_from, w.takeover_epoch = group, epoch
            return True
        acks.append(w.entry_id)
        del self.waiting[w.entry_id]
        self.counts["dispatched"] += 1
        self.telemetry.dispatched(w.request.id, group, epoch=epoch, taken_from=w.takeover_from)
        return False

    def _ack(self, entry_ids: list[bytes]) -> None:
        """Acknowledge (and delete) ingress entries with the next read: one round trip less per batch.

        Until then they stay pending; should this balancer die first, re-processing them is harmless.
        """
        self._to_ack.extend(entry_ids)
        for entry_id in entry_ids:
            self.attempts.forget(entry_id)

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
        loads = read_queue_loads(self.redis, self.keys, [g.name for g in groups if g.routable])
        self.router.update(groups, loads)
        self.telemetry.groups(groups, waiting=len(self.waiting))
        for g in groups:
            if (not g.alive and self._failed_over.get(g.name) != g.heartbeat_ms
                    and self.fail_over(g.name) is not None):
                self._failed_over[g.name] = g.heartbeat_ms
            if g.heartbeat_age_s > self.settings.forget_dead_after_s:
                self.redis.zrem(self.keys.groups, g.name)
                self.redis.delete(self.keys.group_info(g.name))

    def fail_over(self, group: str) -> int | None:
        """Put a dead group's requests back on the ingress stream (balancer.failover); how many moved,
        None when not done now."""
        done = self.failover.fail_over(group)
        if done is None:
            return None
        self.counts["failovers"] += 1
        self.detections_ms.append(done.heartbeat_age_ms)
        self.telemetry.failed_over(group, done.moved)
        return done.moved

    # --- stats and housekeeping --------------------------------------------------------------------

    def stats(self) -> dict[str, str]:
        """What this balancer reports about itself (its stats key; ``ryzanstein status`` can show it)."""
        return {
            "name": self.name,
            "heartbeat_ms": str(int(self.clock.now_ms())),
            "batches": str(sum(self.batcher.sizes.values())),
            "batch_sizes": json.dumps(self.batcher.histogram(), separators=(",", ":")),
            "arrival_rate": f"{self.batcher.rate:.1f}",
            "waiting": str(len(self.waiting)),
            "counts": json.dumps(dict(self.counts), separators=(",", ":")),
            "affinity_hits": str(self.router.affinity_hits),
            "detections_ms": json.dumps([round(x) for x in self.detections_ms[-20:]]),
        }

    def write_stats(self) -> None:
        ttl_ms = int(max(self.settings.balancer_dead_after_s, 5 * self.settings.stats_interval_s) * 1000)
        stats = self.stats()
        pipe = self.redis.pipeline(transaction=False)
        pipe.hset(self.keys.balancer_stats(self.name), mapping=stats)
        pipe.pexpire(self.keys.balancer_stats(self.name), ttl_ms)
        pipe.zadd(self.keys.balancers, {self.name: int(stats["heartbeat_ms"])})
        pipe.zremrangebyscore(self.keys.balancers, "-inf", int(stats["heartbeat_ms"]) - ttl_ms)
        pipe.execute()

    def _housekeeping(self) -> None:
        """Forget old cancellations; trim the cancel stream; drop long-gone balancer consumers."""
        now_ms = self.clock.now_ms()
        horizon = now_ms - 600_000
        self._cancelled.prune(now_ms)
        self.redis.xtrim(self.keys.cancel, minid=f"{int(horizon)}-0", approximate=True)
        for consumer in self.redis.xinfo_consumers(self.keys.requests, INGRESS_GROUP):
            if consumer["pending"] == 0 and consumer["idle"] > 3_600_000 and consumer["name"] != self.name.encode():
                self.redis.xgroup_delconsumer(self.keys.requests, INGRESS_GROUP, consumer["name"])
