"""The one Redis stream-consumer loop: a balancer on the ingress stream and a worker group on its
queue are both a ``StreamConsumer`` driven by ``serve``.

``StreamConsumer`` owns, for one consumer of one consumer group on a list of streams (one stream for a
worker group's queue; the ingress sources for a balancer, broker.sources):

- the consumer group's creation (from id 0, the stream made if missing; an existing group is kept),
- its acknowledgements: the loop hands it the entries it is done with (``ack``); they go out ahead
  of the next read in that read's round trip (Redis runs them at once, so they cost no round trip
  of their own), or at once with ``flush_acks``; the stream's owner says how an entry is
  acknowledged (XACK + XDEL on the ingress stream, the ACK script on a group queue);
- reclaiming: re-reading its own pending entries (``own_pending``: a restarted group's unfinished
  work), keeping those it works on fresh (``keep``) and claiming the entries of consumers that died
  (``claim_idle``: a stopped balancer's ingress entries; broker.reclaim),
- the cancel feed: every read also reads the cancel streams (``{p}:cancel``, and each tenant's, whose
  cancels are that tenant's) from cursors that start at their last entries, and what it reads is
  remembered for ``cancel_horizon_s`` (broker.cancellation), so a cancel that comes before its
  request still applies; ``trim_cancels`` trims the streams to that horizon.

Entries are named by *refs*: on the first stream (``stream``) a ref is the entry id itself; on the
others ``<stream>/<entry id>`` (entry ids of different streams meet). ``ref`` and ``locate`` convert.

``serve`` is the loop around one iteration: a lost connection, a Redis that answers with an error,
or a bug in one iteration is logged and retried after a jittered, growing backoff (a blip must
never kill a process); a consumer group that vanished (NOGROUP: Redis restarted without
persistence, or the stream was deleted) is handed to the caller, who re-creates it or stops.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar, cast

from redis import Redis
from redis.exceptions import NoScriptError, ResponseError
from redis.typing import StreamIdT

from broker.cancellation import Cancel, Cancellations
from broker.connection import TRANSIENT_ERRORS, RedisClock, backoff_delays
from broker.failures import describe, raise_if_fatal
from broker.reclaim import Reclaimed, Reclaimer
from broker.scripts import Scripts
from broker.settings import Settings
from broker.sources import cancel_counts
from broker.wire import Batch

log = logging.getLogger(__name__)

T = TypeVar("T")
Entry = tuple[bytes, dict[bytes, bytes]]
# XREADGROUP's reply on a connection without decode_responses (every one here): per stream read,
# (stream name, its entries). redis-py types replies for either setting, so they are cast to this.
StreamsReply = list[tuple[bytes, list[Entry]]]
# Adds the acknowledgement of the given entry ids of the named stream to a batch (the owner says how).
AckWriter = Callable[[Batch, str, list[bytes]], None]
CANCEL_READ_COUNT = 1000  # most cancel entries one read takes in
# longest cancel id or token one read takes in (longer ones name no request: ids are at most 128
# characters, tokens 256 bytes); with CANCEL_READ_COUNT it bounds a read's memory, whatever is sent
CANCEL_FIELD_BYTES = 512


@dataclass(slots=True)
class Read:
    """What one ``StreamConsumer.read`` brought: the caller's own replies (its read commands', in
    the order its ``build`` added them) and the cancels read beside them."""

    replies: list[Any]
    cancels: list[Cancel] = field(default_factory=list)  # (request id, token, tenant), as read
    # Why the acknowledgements sent with the read failed (they stay due): raised by ``check`` once
    # the caller has taken in what it read (entries read and then dropped would stay pending).
    ack_error: Exception | None = None

    def check(self) -> None:
        if self.ack_error is not None:
            raise self.ack_error


class StreamConsumer:
    """One consumer (``consumer``) of ``group`` on ``stream`` (and on ``more`` streams, read the same
    way), and the cancel feed beside it: ``cancel_stream`` (shared) and ``tenant_cancels`` (cancel
    stream -> its tenant)."""

    def __init__(self, redis: Redis, scripts: Scripts, *, stream: str, group: str, consumer: str,
                 cancel_stream: str, cancel_horizon_ms: int, clock: RedisClock, ack: AckWriter) -> None:
        self.redis = redis
        self.scripts = scripts
        self.stream = stream
        self.streams: list[str] = [stream]  # every stream read; ``stream`` first
        self.group = group
        self.consumer = consumer
        self.cancel_stream = cancel_stream
        self.cancel_feeds: dict[str, str | None] = {cancel_stream: None}  # cancel stream -> its tenant
        self.cancel_horizon_ms = cancel_horizon_ms
        self.clock = clock
        self.cancels = Cancellations(horizon_ms=cancel_horizon_ms)  # cancel entries read lately
        self._write_ack = ack
        self._to_ack: list[bytes] = []  # refs done with, acknowledged with the next read
        self._cancel_cursors: dict[str, bytes] = {cancel_stream: b"0-0"}
        self._reclaimers: dict[str, Reclaimer] = {}
        self._claim_start = 0  # the stream claim_idle starts at: it rotates

    # --- the streams and refs --------------------------------------------------------------------

    def ref(self, stream: str, entry_id: bytes) -> bytes:
        """The name of entry ``entry_id`` of ``stream`` (the entry id itself on the first stream)."""
        return entry_id if stream == self.stream else stream.encode() + b"/" + entry_id

    def locate(self, ref: bytes) -> tuple[str, bytes]:
        """(stream, entry id) of a ``ref``."""
        stream, slash, entry_id = ref.rpartition(b"/")
        return (stream.decode(), entry_id) if slash else (self.stream, ref)

    def by_stream(self, refs: list[bytes]) -> dict[str, list[bytes]]:
        """``refs`` as entry ids per stream, in order."""
        out: dict[str, list[bytes]] = {}
        for ref in refs:
            stream, entry_id = self.locate(ref)
            out.setdefault(stream, []).append(entry_id)
        return out

    def set_streams(self, more: list[str], tenant_cancels: dict[str, str]) -> None:
        """Read ``more`` streams besides ``stream`` and the cancel streams ``tenant_cancels`` (stream ->
        tenant) besides ``cancel_stream``; the consumer group is made on each new stream, and a new
        cancel stream is read from its last entry on. Streams left out are no longer read (their
        entries pending on us stay so, for whoever reads them again)."""
        added = [s for s in more if s not in self.streams]
        feeds: dict[str, str | None] = {self.cancel_stream: None, **tenant_cancels}
        new_feeds = [s for s in feeds if s not in self._cancel_cursors]
        self.streams = [self.stream, *(s for s in more if s != self.stream)]
        self.cancel_feeds = feeds
        self._cancel_cursors = {s: c for s, c in self._cancel_cursors.items() if s in feeds}
        self._create_groups(added, new_feeds)

    # --- the consumer group ----------------------------------------------------------------------

    def create_group(self) -> None:
        """Create the consumer group on every stream (from id 0: entries added before it are read too)
        unless it exists; the cancel feed starts after the last cancel entry (older ones were for
        earlier processes)."""
        self._create_groups(self.streams, list(self.cancel_feeds))

    def _create_groups(self, streams: list[str], cancel_streams: list[str]) -> None:
        if not streams and not cancel_streams:
            return
        pipe = self.redis.pipeline(transaction=False)
        for stream in streams:
            pipe.xgroup_create(stream, self.group, id="0", mkstream=True)
        for stream in cancel_streams:
            pipe.xrevrange(stream, count=1)
        replies = pipe.execute(raise_on_error=False)
        for reply in replies[: len(streams)]:
            if isinstance(reply, Exception) and "BUSYGROUP" not in str(reply):
                raise reply
        for stream, last in zip(cancel_streams, replies[len(streams):]):
            if isinstance(last, Exception):
                raise last
            self._cancel_cursors[stream] = cast("list[Entry]", last)[0][0] if last else b"0-0"

    def recreate(self, streams: list[str]) -> None:
        """Make the consumer group again on ``streams`` (deleted since: NOGROUP), a tenant's alone."""
        self._create_groups(streams, [])

    def own_pending(self, *, count: int = 500) -> Iterator[list[tuple[bytes, dict[bytes, bytes] | None, int]]]:
        """This consumer's pending entries (read before, never acknowledged), a chunk at a time:
        (entry id, fields or None when deleted since, times delivered). Entries acknowledged but not
        yet flushed are left out."""
        cursor: bytes | str = "0"
        while True:
            reply = cast("StreamsReply | None",
                         self.redis.xreadgroup(self.group, self.consumer, {self.stream: cursor}, count=count))
            entries = [e for _s, es in (reply or []) for e in es]
            if not entries:
                return
            rows = cast("list[dict[str, Any]]", self.redis.xpending_range(
                self.stream, self.group, min=entries[0][0], max=entries[-1][0], count=len(entries),
                consumername=self.consumer))
            deliveries = {row["message_id"]: int(row["times_delivered"]) for row in rows}
            acking = set(self._to_ack)
            cursor = entries[-1][0]
            yield [(eid, fields, deliveries.get(eid, 0)) for eid, fields in entries if eid not in acking]

    def keep(self, refs: list[bytes]) -> None:
        """Reset the idle time of these pending entries of ours: nobody's ``claim_idle`` takes them."""
        if not refs:
            return
        pipe = self.redis.pipeline(transaction=False)
        for stream, entry_ids in self.by_stream(refs).items():
            pipe.xclaim(stream, self.group, self.consumer, 0, list[StreamIdT](entry_ids), justid=True)
        pipe.execute(raise_on_error=False)  # a stream deleted since (NOGROUP) keeps nothing: nothing to keep

    def claim_idle(self, *, min_idle_ms: int, count: int, skip: set[bytes] | dict[bytes, Any]) -> Reclaimed:
        """Claim entries pending on any consumer and idle past ``min_idle_ms`` (their consumer died or
        stalled), up to ``count`` per call over all streams, the first stream asked rotating, a cursor
        per stream moving through its pending list (broker.reclaim); those in ``skip`` (refs: ours
        already) are left out. The reply names entries by ref."""
        out = Reclaimed()
        streams = self.streams[self._claim_start:] + self.streams[: self._claim_start]
        self._claim_start = (self._claim_start + 1) % len(self.streams)
        for stream in streams:
            left = count - len(out.entries) - len(out.overdelivered)
            if left <= 0:
                break
            reclaimer = self._reclaimers.get(stream) or self._reclaimers.setdefault(stream, Reclaimer(
                self.redis, stream=stream, group=self.group, consumer=self.consumer, min_idle_ms=min_idle_ms, count=left))
            reclaimer.count = left
            ours = {eid for s, eid in map(self.locate, skip) if s == stream}
            try:
                found = reclaimer.claim(skip=ours)
            except ResponseError as exc:
                if stream == self.stream or "NOGROUP" not in str(exc):
                    raise
                self.recreate([stream])  # a tenant deleted its stream: its alone to lose
                continue
            out.entries += [(self.ref(stream, eid), f) for eid, f in found.entries]
            out.gone += [self.ref(stream, eid) for eid in found.gone]
            out.overdelivered += [(self.ref(stream, eid), f, n) for eid, f, n in found.overdelivered]
        return out

    def new_entries(self, *, count: int) -> Iterator[list[Entry]]:
        """Entries never delivered to any consumer, read (and so taken) a chunk at a time, without
        blocking, until none is left."""
        while True:
            reply = cast("StreamsReply | None",
                         self.redis.xreadgroup(self.group, self.consumer, {self.stream: ">"}, count=count))
            entries = [e for _s, es in (reply or []) for e in es]
            if not entries:
                return
            yield entries

    # --- acknowledgements ------------------------------------------------------------------------

    def ack(self, entry_ids: list[bytes]) -> None:
        """Acknowledge ``entry_ids`` with the next read. Until then they stay pending; should this
        process die first, whoever reads them again must find them harmless to re-process."""
        self._to_ack.extend(entry_ids)

    @property
    def acks_due(self) -> int:
        return len(self._to_ack)

    def flush_acks(self) -> None:
        """Send the acknowledgements due now, in a round trip of their own."""
        if self._to_ack:
            acks = list(self._to_ack)
            self.scripts.execute(lambda batch: self._write_acks(batch, acks))
            del self._to_ack[: len(acks)]

    def _write_acks(self, batch: Batch, refs: list[bytes]) -> None:
        for stream, entry_ids in self.by_stream(refs).items():
            self._write_ack(batch, stream, entry_ids)

    def drop_acks(self) -> None:
        """Forget the acknowledgements due (their entries have moved to another consumer)."""
        self._to_ack.clear()

    # --- reading ---------------------------------------------------------------------------------

    def read(self, build: Callable[[Batch], object], *, raise_errors: bool = True) -> Read:
        """One round trip: the acknowledgements due, then what ``build`` adds (the caller's reads of
        the streams), then the cancel feed. Any error reply of the caller's commands (unless
        ``raise_errors`` is False: then they come back in ``replies``) or of the shared cancel
        stream's read is raised (the loop retries; a tenant's cancel stream that cannot be read is
        skipped: its cancels alone wait); the acknowledgements stay due when theirs failed on a
        Redis that lost its scripts (a restart: they go again with the next read); another error of
        theirs comes back in ``Read.ack_error`` (they stay due). What ``build`` adds
        must be safe to send twice: it goes again, with the scripts loaded, when one of its scripts
        was missing."""
        acks = list(self._to_ack)
        for _attempt in range(2):
            batch = Batch()
            if acks:
                self._write_acks(batch, acks)
            first = len(batch)
            build(batch)
            feeds = list(self.cancel_feeds)  # the shared stream's CANCEL_READ_COUNT, as many for all tenants'
            cancel_at = [self.scripts.read_cancels(cancel_stream=stream, after=self._cancel_cursors.get(stream, b"0-0"),
                                                   count=n, max_field_bytes=CANCEL_FIELD_BYTES, client=batch)
                         for stream, n in zip(feeds, cancel_counts(feeds, self.cancel_stream, CANCEL_READ_COUNT))]
            results = self.scripts.wire.execute(batch)
            own = results[first:cancel_at[0]]
            if not any(isinstance(raw, NoScriptError) for raw in own):
                break
            self.scripts.load()  # Redis lost the scripts (a restart): the caller's read goes again
        cancels: dict[str, Any] = {}
        for stream, at in zip(feeds, cancel_at):
            raw = results[at]
            if isinstance(raw, NoScriptError):  # the caller's reads went through: not again; the
                self.scripts.load()  # cancels wait for the next read (the cursor has not moved)
            elif isinstance(raw, Exception) and stream != self.cancel_stream:
                log.warning("cannot read the cancel stream %s (%s); its cancels wait", stream, raw)
            else:
                cancels[stream] = raw
        for raw in [*(own if raise_errors else []), *cancels.values()]:
            if isinstance(raw, Exception):
                raise raw
        ack_error = next((raw for raw in results[:first] if isinstance(raw, Exception)), None)
        if isinstance(ack_error, NoScriptError):
            self.scripts.load()  # the acknowledgements go again with the next read
            ack_error = None
        elif ack_error is None:
            del self._to_ack[: len(acks)]
        return Read(replies=own, cancels=self._take_cancels(cancels), ack_error=ack_error)

    def _take_cancels(self, replies: dict[str, Any]) -> list[Cancel]:
        now_ms = self.clock.now_ms()
        seen: list[Cancel] = []
        for stream, reply in replies.items():
            tenant = self.cancel_feeds.get(stream)
            for _stream, entries in reply or []:
                for entry_id, flat in entries:  # READ_CANCELS: fields flat, only id and token
                    self._cancel_cursors[stream] = entry_id
                    it = iter(flat or [])
                    got = self.cancels.add(dict(zip(it, it)), now_ms, entry_id=entry_id, tenant=tenant)
                    if got is not None:
                        seen.append(got)
        self.cancels.prune(now_ms)
        return seen

    def trim_cancels(self) -> None:
        """Trim the cancel streams to the horizon (approximately: whole nodes only) and forget older cancels."""
        now_ms = self.clock.now_ms()
        self.cancels.prune(now_ms)
        pipe = self.redis.pipeline(transaction=False)
        for stream in self.cancel_feeds:
            pipe.xtrim(stream, minid=f"{int(now_ms - self.cancel_horizon_ms)}-0", approximate=True)
        pipe.execute(raise_on_error=False)  # (a tenant's stream of another type: trimmed next time)


# --- the loop ------------------------------------------------------------------------------------


class Next(enum.Enum):
    """What ``serve`` does after a failure its caller decided about."""

    RETRY = "retry"  # the next iteration at once
    BACKOFF = "backoff"  # the next iteration after the backoff delay
    LEAVE = "leave"  # return from serve


def serve(iteration: Callable[[], bool], *, settings: Settings, what: str, stopped: Callable[[], bool],
          wait: Callable[[float], object], on_lost: Callable[[BaseException], Next] = lambda _exc: Next.BACKOFF,
          on_nogroup: Callable[[ResponseError], Next], passthrough: tuple[type[BaseException], ...] = ()) -> None:
    """Run ``iteration`` until ``stopped()`` or it returns False; never die of a Redis failure or a bug.

    ``on_lost``: a lost connection (the default waits out the backoff and retries); ``on_nogroup``:
    the consumer group is gone. Errors that waiting cannot cure (credentials, permissions) raise
    ``FatalRedisError``; exceptions of ``passthrough`` types propagate as they are. ``wait``: sleeps
    the given seconds (a stop event's ``wait`` cuts it short).
    """
    delays: Iterator[float] | None = None

    def backoff() -> None:
        nonlocal delays
        delays = delays or backoff_delays(settings)
        wait(next(delays))

    while not stopped():
        try:
            if not iteration():
                return
            delays = None
        except passthrough:
            raise
        except TRANSIENT_ERRORS as exc:
            raise_if_fatal(exc)
            then = on_lost(exc)
            if then is Next.LEAVE:
                return
            if then is Next.BACKOFF:
                delays = delays or backoff_delays(settings)
                delay = next(delays)
                log.warning("redis unavailable (%s); retrying in %.2fs", exc, delay)
                wait(delay)
        except ResponseError as exc:
            raise_if_fatal(exc)
            if (problem := describe(exc)) is not None:  # out of memory, a read-only replica: one line
                log.warning("%s; retrying", problem.line)
                backoff()
            elif "NOGROUP" in str(exc):
                then = on_nogroup(exc)
                if then is Next.LEAVE:
                    return
                if then is Next.BACKOFF:
                    backoff()
            else:
                log.exception("%s tick failed; retrying", what)
                backoff()
        except Exception:
            # Never die on an unexpected reply or a bug: what was not acknowledged is retried, after a
            # backoff that grows while the failures go on.
            log.exception("%s tick failed; retrying", what)
            backoff()
