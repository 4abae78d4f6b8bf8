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

from redis import Redis
from redis.exceptions import ResponseError
from redis.typing import EncodableT, FieldT

from balancer.admission import Limits
from balancer.batching import AdaptiveBatcher
from balancer.decision import Rules, decide
from balancer.dispatch import Dispatcher
from balancer.failover import Failover
from balancer.ingress import IngressReader
from balancer.pending import Final, Waiting
from balancer.poison import PUBLISHER, PoisonHandling
from balancer.routing import AffinityTable, Router, RoutingPolicy, prefix_key
from balancer.telemetry import BalancerTelemetry
from broker.connection import TRANSIENT_ERRORS, RedisClock, is_cluster, server_time
from broker.consumer import Next, StreamConsumer, serve
from broker.dead_letter import Attempts, DeadLetters
from broker.errors import InvalidRequest
from broker.events import error_event
from broker.keys import INGRESS_GROUP, Keys
from broker.registry import read_groups, read_queue_loads
from broker.scripts import OVERSIZE_FIELD, Scripts
from broker.settings import Settings
from broker.signing import SigningKey
from broker.sources import Source, read_tenants, sources
from broker.validation import parse_request
from broker.wire import Batch

log = logging.getLogger(__name__)

DISPATCH_ROUNDS = 3  # a request refused by a full or closed group is routed again, at most this often


class Balancer(IngressReader, PoisonHandling, Dispatcher):
    def __init__(
        self,
        redis: Redis,
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
        self.clock = RedisClock(lambda: server_time(redis, self.keys.groups))
        self.limits = Limits.from_settings(settings)
        self.rules = Rules(self.limits, no_group_wait_s=settings.no_group_wait_s, default_model=settings.default_model)
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
        self._closed_until: dict[str, float] = {}  # refused work as closed: skipped until then
        self._full_until: dict[str, float] = {}  # refused work as full: no room until then
        self._next_refresh = 0.0
        self._next_claim = 0.0
        self._next_housekeeping = 0.0
        self._next_stats = 0.0
        # Entries one read may return: their bodies fit in balancer_read_bytes (larger ones are stubs).
        self._read_count = max(1, min(settings.balancer_batch_max,
                                      settings.balancer_read_bytes // settings.max_request_bytes))
        self.ingress = StreamConsumer(
            redis, self.scripts, stream=self.keys.requests, group=INGRESS_GROUP, consumer=self.name,
            cancel_stream=self.keys.cancel, cancel_horizon_ms=int(settings.cancel_horizon_s * 1000),
            clock=self.clock, ack=self._write_acks)
        # The ingress streams read (broker.sources), by name: the shared one, then the tenants' (refresh_sources).
        self.sources: dict[str, Source] = {s.stream: s for s in sources(self.keys)}  # + shards: setup
        self._read_start = 0  # the source whose share of a read comes first: it rotates (fairness)
        self.attempts = Attempts()  # entries whose handling failed, backing off before the next try
        self._duplicates: list[Final] = []  # duplicate_id events found by _dispatch, for its next round
        self._failed_over: dict[str, int] = {}  # dead group -> heartbeat_ms when its queue was taken over
        self.telemetry = BalancerTelemetry(enabled=settings.metrics_port is not None,
                                           ready_within_s=settings.dead_after_s,
                                           live_within_s=settings.liveness_timeout_s, monotonic=monotonic)
        self.signing = SigningKey(redis, self.keys, monotonic=monotonic)  # checks moved requests' signatures
        self.dead_letters = DeadLetters(redis, self.scripts, self.keys, publisher=PUBLISHER,
                                        ttl_ms=settings.result_ttl_s * 1000, on_dead=self.telemetry.dead_lettered)

    @property
    def batch_sizes(self) -> Counter[int]:
        return self.batcher.sizes

    # --- lifecycle -------------------------------------------------------------------------------

    def setup(self) -> None:
        # From id 0: requests sent before the first balancer started are served too.
        self.ingress.create_group()
        self.refresh_sources()
        self.signing.get()

    def refresh_sources(self) -> None:
        """Read the tenants (``{p}:tenants``, broker.sources): each one's ingress and cancel streams
        are read from now on (their consumer groups made when new), and the ingress shards
        (Settings.ingress_shards). A removed tenant's stream (``{p}:tenants:removed``) is still read:
        its entries are answered with ``invalid_request``."""
        found = sources(self.keys, read_tenants(self.redis, self.keys),
                        read_tenants(self.redis, self.keys, removed=True), shards=self.settings.ingress_shards)
        if found != list(self.sources.values()):
            self.ingress.set_streams([s.stream for s in found[1:]],
                                     {s.cancel: s.tenant for s in found[1:] if s.tenant is not None})
            self.sources = {s.stream: s for s in found}
            log.info("reading %d ingress streams (%d tenants)", len(found), sum(s.tenant is not None for s in found))

    def run(self) -> None:
        recreate = False

        def iteration() -> bool:
            nonlocal recreate
            if recreate:
                recreate = False
                self._retry(self.setup)
            self.tick()
            return True

        def on_nogroup(exc: ResponseError) -> Next:
            nonlocal recreate
            # Redis lost the ingress stream (restarted without persistence): start it again.
            log.error("the ingress consumer group is gone (%s); creating it again", exc)
            recreate = True
            return Next.BACKOFF

        serve(iteration, settings=self.settings, what="balancer", stopped=self.stop.is_set, wait=self.stop.wait,
              on_nogroup=on_nogroup)
        try:
            self.flush_acks()
            # No longer a reader of the ingress stream: health checks of the path see it at once.
            self.redis.zrem(self.keys.balancers, self.name)
        except TRANSIENT_ERRORS:
            pass  # left pending: another balancer re-processes them harmlessly
        log.info("balancer %s stopped; %d waiting requests stay pending for other balancers",
                 self.name, len(self.waiting))

    def _redis_uptime_s(self) -> float:
        """Uptime of the server holding the heartbeats (on a cluster, the registry's master)."""
        if is_cluster(self.redis):
            node = self.redis.get_node_from_key(self.keys.groups)  # type: ignore[attr-defined]
            return float(self.redis.info("server", target_nodes=node).get("uptime_in_seconds", 1 << 30))
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
            self.refresh_sources()
            self.signing.get()  # a key deleted and made anew: queue entries are signed under the new one
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
        for entry_id, fields in entries:
            if entry_id in self.waiting:
                continue
            try:
                final = self._admit(entry_id, fields, now_ms)
            except Exception as exc:
                if isinstance(exc, TRANSIENT_ERRORS):
                    raise
                rid, reply = self._reply_of(entry_id, fields)
                self._give_up(entry_id, rid, reply, exc, fields=fields)
                continue
            if final is not None:
                finals.append(final)
        for _round in range(DISPATCH_ROUNDS):
            assignments, more = self._route(now_ms)
            finals += more
            if not assignments and not finals and all(w.held for w in self.waiting.values()):
                return
            refused = self._dispatch(assignments, finals)
            finals, self._duplicates = self._duplicates, []
            if not refused and not finals:
                return
        if finals:
            self._dispatch([], finals)

    def _admit(self, entry_id: bytes, fields: dict[bytes, bytes], now_ms: float) -> Final | None:
        """Validate one entry (``entry_id``: its ref, broker.consumer): it waits for a group, or gets its
        final event (returned). Its source's tenant is the request's (broker.sources)."""
        stream, raw_id = self.ingress.locate(entry_id)
        eid, tenant = raw_id.decode(), self._tenant_of(stream)
        try:
            if (source := self.sources.get(stream)) is not None and source.removed:
                raise InvalidRequest(f"tenant {source.tenant!r} was removed (ryzanstein tenant remove): "
                                     "its requests are no longer served")
            if OVERSIZE_FIELD in fields:  # a stub of READ_INGRESS: the body stayed in Redis
                raise InvalidRequest(f"request is {int(fields[OVERSIZE_FIELD])} bytes, over the limit of "
                                     f"{self.settings.max_request_bytes} bytes")
            request = parse_request(fields, entry_id=eid, prefix=self.settings.prefix,
                                    max_request_bytes=self.settings.max_request_bytes,
                                    default_max_tokens=self.settings.default_max_tokens,
                                    signing_key=self.signing.for_entry(fields), tenant=tenant, now_ms=now_ms)
            # What cannot be serialized cannot be queued: found here, it ends this entry alone
            # (the guard around _admit), rather than failing every later dispatch pipeline.
            request.to_wire()
        except InvalidRequest as exc:
            rid, reply = self._reply_of(entry_id, fields, signing_key=self.signing.for_entry(fields))
            final = Final(entry_id, rid, reply, error_event(rid, exc.code, str(exc)), hold=True, invalid=True)
            self.counts["invalid_request"] += 1
            self.telemetry.finished(rid, final.fields)
            return final
        moved = request.takeover_from is not None
        if request.enqueued_ms > now_ms:  # an explicit entry id in the future (XADD <ms>-0): it counts
            request = request.model_copy(update={"enqueued_ms": int(now_ms)})  # from now, not from then
        self.waiting[entry_id] = Waiting(
            entry_id, request, now_ms, request.takeover_from, request.takeover_epoch, moved=moved, held=moved,
            prefix=prefix_key(request, chars=self.settings.affinity_prefix_chars,
                              tokens=self.settings.affinity_prefix_tokens))
        return None

    def _route(self, now_ms: float) -> tuple[list[tuple[Waiting, str]], list[Final]]:
        """A group for every waiting request that can go now, or its final event (balancer.decision)."""
        now = self._monotonic()
        decision = decide(
            list(self.waiting.values()), router=self.router, rules=self.rules, now_ms=now_ms, now=now,
            closed=frozenset(g for g, until in self._closed_until.items() if until > now),
            full=frozenset(g for g, until in self._full_until.items() if until > now),
            cancelled=self.ingress.cancels.matches, ready=lambda entry_id: self.attempts.ready(entry_id, now=now))
        for w, exc in decision.failed:
            self._give_up(w.entry_id, w.request.id, w.request.reply_to, exc)
        finals: list[Final] = []
        for w, final in decision.finals:
            del self.waiting[w.entry_id]
            self.counts[final["code"] if final["event"] == "error" else "cancelled"] += 1
            self.telemetry.finished(w.request.id, final)
            finals.append(Final(w.entry_id, w.request.id, w.request.reply_to, final, w.takeover_from,
                                w.takeover_epoch, hold=not w.held))
        return decision.assignments, finals

    def _ack(self, entry_ids: list[bytes]) -> None:
        """Acknowledge (and delete) ingress entries with the next read: one round trip less per batch.

        Until then they stay pending; should this balancer die first, re-processing them is harmless.
        """
        self.ingress.ack(entry_ids)
        for entry_id in entry_ids:
            self.attempts.forget(entry_id)

    def flush_acks(self) -> None:
        self.ingress.flush_acks()

    def _write_acks(self, batch: Batch, stream: str, entry_ids: list[bytes]) -> None:
        """Acknowledge and delete entries of an ingress stream (XACK, XDEL)."""
        batch.xack(stream, INGRESS_GROUP, *entry_ids)
        batch.xdel(stream, *entry_ids)

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
        fields: dict[FieldT, EncodableT] = {k: v for k, v in stats.items()}  # (redis-py's key type)
        pipe.hset(self.keys.balancer_stats(self.name), mapping=fields)
        pipe.pexpire(self.keys.balancer_stats(self.name), ttl_ms)
        pipe.zadd(self.keys.balancers, {self.name: int(stats["heartbeat_ms"])})
        pipe.zremrangebyscore(self.keys.balancers, "-inf", int(stats["heartbeat_ms"]) - ttl_ms)
        pipe.execute()

    def _housekeeping(self) -> None:
        """Forget old cancellations; trim the cancel stream; drop long-gone balancer consumers."""
        self.ingress.trim_cancels()
        for stream in self.sources:
            try:
                consumers = self.redis.xinfo_consumers(stream, INGRESS_GROUP)
            except ResponseError:  # a tenant's stream deleted since: the next read makes it again
                continue
            for consumer in consumers:
                if consumer["pending"] == 0 and consumer["idle"] > 3_600_000 and consumer["name"] != self.name.encode():
                    self.redis.xgroup_delconsumer(stream, INGRESS_GROUP, consumer["name"])
