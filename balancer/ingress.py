"""A balancer's reads of the ingress streams (broker.sources: the shared one and each tenant's): new
entries (bounded in count and bytes, a fair share of each stream per read) and the entries of
balancers that died (broker.reclaim), through its ``StreamConsumer`` (broker.consumer, which reads
the cancels beside them and sends the acknowledgements). Entries are named by ref (broker.consumer).
Part of ``Balancer`` (a mixin: the state it uses is the balancer's, declared below)."""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from redis import Redis
from redis.exceptions import ResponseError

from broker.connection import is_cluster
from broker.consumer import StreamConsumer
from broker.dead_letter import Attempts
from broker.keys import INGRESS_GROUP, Keys, key_slot
from broker.scripts import Scripts, ingress_entries
from broker.settings import Settings
from broker.sources import Source, shares
from broker.validation import best_effort_reply_to
from broker.wire import Batch

if TYPE_CHECKING:
    from collections import Counter

    from balancer.batching import AdaptiveBatcher
    from balancer.pending import Waiting
    from balancer.routing import Router
    from balancer.telemetry import BalancerTelemetry
    from broker.connection import RedisClock

log = logging.getLogger("balancer.service")


# An idle balancer's blocking read on a Redis Cluster whose ingress streams (shards, tenants) lie in
# several slots: it blocks on one slot's streams only, so it wakes this often to read the others.
CLUSTER_IDLE_BLOCK_MS = 50


def slot_groups(streams: list[str]) -> list[list[str]]:
    """``streams`` grouped by hash slot (one XREADGROUP may read the streams of one slot only)."""
    groups: dict[int, list[str]] = {}
    for stream in streams:
        groups.setdefault(key_slot(stream), []).append(stream)
    return list(groups.values())


class IngressReader:
    redis: Redis
    settings: Settings
    keys: Keys
    name: str
    scripts: Scripts
    clock: RedisClock
    router: Router
    batcher: AdaptiveBatcher
    telemetry: BalancerTelemetry
    ingress: StreamConsumer
    sources: dict[str, Source]
    _read_start: int
    attempts: Attempts
    waiting: dict[bytes, Waiting]
    counts: Counter[str]
    _closed_until: dict[str, float]
    _next_refresh: float
    _read_count: int
    _monotonic: Callable[[], float]
    _sleep: Callable[[float], None]

    if TYPE_CHECKING:  # the Balancer's own
        def _ack(self, entry_ids: list[bytes]) -> None:
            ...

        def _can_route_waiting(self, now: float) -> bool:
            ...

        def _give_up(self, entry_id: bytes, request_id: str | None, reply_to: str | None,
                     problem: BaseException | str, *, reply_to_failed: bool = False,
                     fields: dict[bytes, bytes] | None = None) -> None:
            ...

    def _read(self) -> list[tuple[bytes, dict[bytes, bytes]]]:
        # Waiting requests are re-checked every tick; block anyway while none of them can be routed
        # (no live group, or all refused work lately): without it the loop spins on Redis for as long
        # as requests wait for a group (up to no_group_wait_s, e.g. while workers load a model).
        now = self._monotonic()
        can_route = self._can_route_waiting(now)
        # Entries that failed lately wait out their backoff: they alone are no reason not to block.
        ready = bool(self.waiting) and (not len(self.attempts)
                                        or any(self.attempts.ready(e, now=now) for e in self.waiting))
        # An idle read still wakes for the next registry refresh: a group's death is noticed within
        # dead_after_s + groups_refresh_s of its last heartbeat, busy or not.
        retry = self.attempts.next_retry()
        wake = min(self._next_refresh, retry) if retry is not None and retry > now else self._next_refresh
        until_ms = max(1, int((wake - now) * 1000))
        block = None if ready and can_route else min(self.settings.balancer_block_ms, until_ms)

        read: list[tuple[str, int]] = []

        def build(batch: Batch) -> None:
            if block is None:
                read[:] = self._read_ingress(batch, self._read_count)
            else:
                # Idle: one entry of each stream at a time, whatever its size; the rest follow without blocking.
                # On a Redis Cluster one read covers the streams of one slot: one per slot, the last
                # blocking (briefly when there are several, so that no slot's entries wait long).
                groups = slot_groups(self.ingress.streams) if is_cluster(self.redis) else [self.ingress.streams]
                for n, streams in enumerate(groups):
                    last = n == len(groups) - 1
                    batch.xreadgroup(INGRESS_GROUP, self.name, dict.fromkeys(streams, ">"), count=1,
                                     block=(block if len(groups) == 1 else min(block, CLUSTER_IDLE_BLOCK_MS))
                                     if last else None)

        got = self.ingress.read(build, raise_errors=False)
        if block is None:
            entries, full = self._entries(read, got.replies)
            if full and len(entries) < self._read_count:  # some streams had less than their share
                entries += self._read_more(self._read_count - len(entries), full)
        else:
            fresh: list[Any] = []
            for reply in got.replies:
                if isinstance(reply, ResponseError) and "NOGROUP" in str(reply) and len(self.ingress.streams) > 1:
                    self.ingress.recreate(self.ingress.streams)  # a tenant deleted its stream: made again
                elif isinstance(reply, Exception):
                    raise reply
                else:
                    fresh += reply or []
            entries = [(self.ingress.ref(stream.decode(), eid), f) for stream, items in (fresh or [])
                       for eid, f in items]
            if entries and self._read_count > len(entries):
                entries += self._read_more(self._read_count - len(entries))
        self.batcher.observe(len(entries), self._monotonic())
        wait = self.batcher.wait_s(len(entries))
        if wait > 0 and len(entries) < self._read_count:
            # Under load: a moment's wait makes this batch larger (fewer round trips per request).
            self._sleep(wait)
            entries += self._read_more(self._read_count - len(entries))
        self.batcher.record(len(entries))
        if entries:
            self.telemetry.read(len(entries))
        got.check()
        return entries

    def _read_ingress(self, client: Batch, count: int, streams: list[str] | None = None) -> list[tuple[str, int]]:
        """Add non-blocking reads of up to ``count`` new entries in all of ``streams`` (default: every
        ingress stream) to ``client`` (READ_INGRESS, one per stream): an equal share of each, the
        first share rotating (broker.sources.shares), so that a stream flooded with entries delays
        no other. The (stream, entries asked) read, in order."""
        streams = streams if streams is not None else self.ingress.streams
        counts = shares(count, len(streams), start=self._read_start % max(1, len(streams)))
        self._read_start += 1
        read = [(stream, n) for stream, n in zip(streams, counts) if n > 0]
        for stream, n in read:
            self.scripts.read_ingress(ingress=stream, consumer_group=INGRESS_GROUP, consumer=self.name,
                                      count=n, max_entry_bytes=self.settings.max_request_bytes, client=client)
        return read

    def _entries(self, read: list[tuple[str, int]], replies: list[object]
                 ) -> tuple[list[tuple[bytes, dict[bytes, bytes]]], list[str]]:
        """The entries (by ref) of READ_INGRESS ``replies`` to ``read``, and the streams that gave all
        that was asked (they may hold more). A tenant's stream deleted since (NOGROUP) gets its
        consumer group again; any other error reply is raised."""
        out: list[tuple[bytes, dict[bytes, bytes]]] = []
        full: list[str] = []
        for (stream, asked), raw in zip(read, replies):
            if isinstance(raw, ResponseError) and "NOGROUP" in str(raw) and stream != self.ingress.stream:
                self.ingress.recreate([stream])
            elif isinstance(raw, Exception):
                raise raw
            else:
                got = ingress_entries(raw)
                out += [(self.ingress.ref(stream, eid), f) for eid, f in got]
                if len(got) >= asked:
                    full.append(stream)
        return out, full

    def _read_more(self, count: int, streams: list[str] | None = None) -> list[tuple[bytes, dict[bytes, bytes]]]:
        """Up to ``count`` more entries of ``streams`` (default: all), without blocking: a fair share
        of each; what the streams with fewer entries left goes, once more, to those that gave their
        full share (max-min fair: a lone busy stream still fills the read)."""
        out: list[tuple[bytes, dict[bytes, bytes]]] = []
        for _pass in range(2):
            left = count - len(out)
            if left <= 0 or streams == []:
                break
            read, replies = self.scripts.execute(functools.partial(self._read_ingress, count=left, streams=streams))
            got, streams = self._entries(read, replies)
            out += got
        return out

    def _tenant_of(self, stream: str) -> str | None:
        source = self.sources.get(stream)
        return source.tenant if source is not None else None

    def _reply_of(self, ref: bytes, fields: dict[bytes, bytes], *,
                  signing_key: bytes | None = None) -> tuple[str, str]:
        """(request id, reply stream) to tell about an entry that cannot be handled (by ref)."""
        stream, entry_id = self.ingress.locate(ref)
        return best_effort_reply_to(fields, entry_id=entry_id.decode(), prefix=self.settings.prefix,
                                    signing_key=signing_key, tenant=self._tenant_of(stream), now_ms=self.clock.now_ms())

    def _reclaim(self) -> list[tuple[bytes, dict[bytes, bytes]]]:
        """Entries of balancers that died (idle past claim_idle_ms) become ours; ours stay fresh.

        Deleted entries are acknowledged, entries delivered too often given up (broker.reclaim)."""
        self.ingress.keep(list(self.waiting))
        found = self.ingress.claim_idle(min_idle_ms=self.settings.claim_idle_ms, count=self._read_count,
                                        skip=self.waiting)
        if found.gone:
            self._ack(found.gone)
        for entry_id, fields, deliveries in found.overdelivered:
            rid, reply = self._reply_of(entry_id, fields)
            self._give_up(entry_id, rid, reply, f"delivered {deliveries} times and never handled",
                          fields=fields)
        if found.entries:
            self.counts["reclaimed"] += len(found.entries)
            log.info("claimed %d pending requests of stopped balancers", len(found.entries))
        return found.entries
