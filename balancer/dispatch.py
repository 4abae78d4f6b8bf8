"""The balancer's dispatcher: carries out what balancer.decision decided, in two round trips.

First each request is pinned to its group (CLAIM_OWNER), then queued at most once per epoch
(DISPATCH); the balancer's own final events are published under their claim. A request nobody
claimed before is claimed and queued in one round trip. Replies are taken by handle (the index each
command's reply has in its round trip), never by counting. Part of ``Balancer`` (a mixin: the state
it uses is the balancer's, declared below).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from balancer.pending import Final, Waiting, claim_reply
from balancer.poison import FIRST_EPOCH, PUBLISHER, Voided
from balancer.request_ids import Holder, add_hold, is_duplicate
from balancer.routing import Router
from balancer.telemetry import BalancerTelemetry
from broker.connection import TRANSIENT_ERRORS
from broker.keys import QUEUE_GROUP, Keys
from broker.scripts import Claim, Scripts, pack_events
from broker.settings import Settings
from broker.signing import SigningKey
from broker.wire import Batch

if TYPE_CHECKING:
    from balancer.admission import Limits

CLOSED_GROUP_PAUSE_S = 2.0  # a group that refused work is skipped this long (its heartbeat catches up)


@dataclass(frozen=True, slots=True)
class _Claimed:
    """The handles of one routed request's commands in the claim round trip."""

    held: int | None  # GET of its id's holder (add_hold), when its id was not held yet
    claimed: int  # CLAIM_OWNER
    queued: int | None  # its eager DISPATCH (a request nobody claimed before)


def _raise_transient(results: list[Any]) -> None:
    """A lost connection mid-pipeline is retried by the loop; other errors are per request."""
    for raw in results:
        if isinstance(raw, TRANSIENT_ERRORS):
            raise raw


class Dispatcher:
    settings: Settings
    keys: Keys
    scripts: Scripts
    router: Router
    limits: Limits
    telemetry: BalancerTelemetry
    signing: SigningKey  # signs queue entries (broker.lua.queue_signature)
    waiting: dict[bytes, Waiting]
    counts: Counter[str]
    _closed_until: dict[str, float]
    _full_until: dict[str, float]
    _monotonic: Callable[[], float]
    _duplicates: list[Final]

    if TYPE_CHECKING:  # the Balancer's own
        def _ack(self, entry_ids: list[bytes]) -> None: ...

        def _give_up(self, entry_id: bytes, request_id: str | None, reply_to: str | None,
                     problem: BaseException | str, *, reply_to_failed: bool = False,
                     fields: dict[bytes, bytes] | None = None) -> None: ...

        def _request_failed(self, w: Waiting, problem: BaseException, *, reply_to_failed: bool = False) -> None: ...

        def _duplicate_of_claimed(self, w: Waiting, holder: Holder, got: Claim | Exception, candidate: str,
                                  queued: Any, voided: list[Voided], acks: list[bytes]) -> None: ...

        def _duplicate_of_waiting(self, w: Waiting, holder: Holder) -> Final | None: ...

        def _duplicate_final(self, f: Final, holder: Holder) -> Final | None: ...

        def _void(self, pipe: Batch, voided: list[Voided]) -> list[int | None]: ...

        def _voided(self, voided: list[Voided], handles: list[int | None], results: list[Any],
                    acks: list[bytes]) -> None: ...

    def _dispatch(self, assignments: list[tuple[Waiting, str]], finals: list[Final]) -> bool:
        """Claim, then queue or publish. True when some group refused (full or closed), or a request is
        to be taken over: route again.

        A request nobody claimed before is claimed and queued in one round trip: its DISPATCH rides
        in the claim's pipeline with the epoch a first claim gives (FIRST_EPOCH). Where the claim
        says otherwise (the request was pinned before: a re-submitted id, a re-read entry), that
        entry is taken back off the queue and the request goes where its claim says. The two calls
        stay separate scripts: their keys live in different cluster slots.

        New requests hold their ids in the same round trip, ahead of their claims (balancer.request_ids):
        routed ones, waiting ones, then the entries the balancer ends itself. A duplicate's eager
        claim and queue entry are undone in the second round trip (``_duplicate_of_claimed``).
        """
        ttl_ms = self.settings.result_ttl_s * 1000
        eager = [w.takeover_from is None and not w.moved and not w.claimed for w, _group in assignments]
        routed = {w.entry_id for w, _group in assignments}
        unheld = [w for w in self.waiting.values() if not w.held and w.entry_id not in routed]

        def hold(pipe: Batch, entry_id: bytes, request_id: str, reply_to: str) -> int:
            return add_hold(pipe, self.keys, entry_id, request_id, reply_to, ttl_ms=ttl_ms)

        # Phase 1: pin each request to its group (or learn where it is pinned already), holding new ids.
        def claim(pipe: Batch) -> tuple[list[_Claimed], list[int], list[tuple[int | None, int]]]:
            sent = []
            for (w, group), first in zip(assignments, eager):
                held = None if w.held else hold(pipe, w.entry_id, w.request.id, w.request.reply_to)
                claimed = self.scripts.claim_owner(
                    progress=self.keys.progress(w.request.reply_to, w.request.id), reply_stream=w.request.reply_to,
                    group=group, ttl_ms=ttl_ms, taken_from=w.takeover_from, taken_from_epoch=w.takeover_epoch,
                    client=pipe)
                sent.append(_Claimed(held, claimed, self._queue(pipe, w, group, FIRST_EPOCH) if first else None))
            waiting = [hold(pipe, w.entry_id, w.request.id, w.request.reply_to) for w in unheld]
            published = []
            for f in finals:
                held = hold(pipe, f.entry_id, f.request_id, f.reply_to) if f.hold else None
                published.append((held, self.scripts.claim_owner(
                    progress=self.keys.progress(f.reply_to, f.request_id), reply_stream=f.reply_to, group=PUBLISHER,
                    ttl_ms=ttl_ms, taken_from=f.takeover_from, taken_from_epoch=f.takeover_epoch, client=pipe)))
            return sent, waiting, published

        (claim_handles, waiting_handles, final_handles), results = self.scripts.execute(claim)
        _raise_transient(results)

        def holder(handle: int | None) -> Holder | None:
            return Holder.parse(results[handle]) if handle is not None else None

        # Phase 2: queue pinned requests once; write the balancer's own final events.
        acks: list[bytes] = []
        sent: list[tuple[Waiting, str, int]] = []
        retract: list[tuple[str, Any]] = []  # (group, DISPATCH reply) of eager entries the claim overruled
        voided: list[Voided] = []  # claims of duplicates, undone
        refused = False
        for (w, candidate), first, handles in zip(assignments, eager, claim_handles):
            queued = results[handles.queued] if handles.queued is not None else None
            held_by = holder(handles.held)
            w.claimed = w.held = True
            got = claim_reply(results[handles.claimed])
            if is_duplicate(held_by, w.entry_id):
                assert held_by is not None
                if first:
                    retract.append((candidate, queued))
                self._duplicate_of_claimed(w, held_by, got, candidate, queued, voided, acks)
                continue
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
                # (at once: the balancer's pin may be a duplicate's, undone in this round trip)
                w.takeover_from, w.takeover_epoch = got.owner, got.epoch
                refused = True
                continue
            if got.output_ids != w.request.output_ids:
                # moved mid-generation: the new group continues after what the stream carries already
                w.request = w.request.model_copy(update={"output_ids": got.output_ids})
            sent.append((w, got.owner, got.epoch))
        for w, handle in zip(unheld, waiting_handles):
            held_by = holder(handle)
            w.held = True
            if is_duplicate(held_by, w.entry_id):
                assert held_by is not None
                if (final := self._duplicate_of_waiting(w, held_by)) is not None:
                    self._duplicates.append(final)
        published: list[tuple[Final, int, dict[str, str]]] = []
        for f, (held_handle, claimed) in zip(finals, final_handles):
            held_by = holder(held_handle)
            got = claim_reply(results[claimed])
            if is_duplicate(held_by, f.entry_id):
                assert held_by is not None
                instead = self._duplicate_final(f, held_by)
                if instead is None:
                    continue
                f = instead
            if isinstance(got, Exception):
                self._give_up(f.entry_id, f.request_id, f.reply_to, got, reply_to_failed=True)
                continue
            if not got.finished and got.owner == PUBLISHER:
                published.append((f, got.epoch, f.with_progress(got)))
            acks.append(f.entry_id)  # finished, owned by a group, or published now

        def dispatch(pipe: Batch) -> tuple[list[int], list[int], list[int | None]]:
            queued = [self._queue(pipe, w, group, epoch) for w, group, epoch in sent]
            publishes = [self.scripts.publish(
                reply_stream=f.reply_to, progress=self.keys.progress(f.reply_to, f.request_id), publisher=PUBLISHER,
                epoch=epoch, ttl_ms=ttl_ms, events=pack_events([("f", 0, fields)]), client=pipe)
                for f, epoch, fields in published]
            for group, reply in retract:
                if not isinstance(reply, Exception) and reply[0] == b"ok":
                    # never run: were the group to read it first, its publishes are fenced (wrong epoch)
                    self.scripts.ack(queue=self.keys.group_queue(group), queue_tokens=self.keys.group_queue_tokens(group),
                                     consumer_group=QUEUE_GROUP, entry_ids=[reply[1]], client=pipe)
            return queued, publishes, self._void(pipe, voided)

        if not (sent or published or retract or voided):
            self._ack(acks)
            return refused
        (queue_handles, publish_handles, void_handles), results = self.scripts.execute(dispatch)
        _raise_transient(results)
        for (w, group, epoch), handle in zip(sent, queue_handles):
            refused |= self._queued(w, group, epoch, results[handle], acks)
        for (f, _epoch, _fields), handle in zip(published, publish_handles):
            if isinstance(raw := results[handle], Exception):
                self._give_up(f.entry_id, f.request_id, f.reply_to, raw, reply_to_failed=True)
        self._voided(voided, void_handles, results, acks)
        self._ack(acks)
        return refused

    def _queue(self, pipe: Batch, w: Waiting, group: str, epoch: int) -> int:
        """Add the DISPATCH of ``w`` to ``group``'s queue under ``epoch`` to ``pipe``; its reply's handle."""
        bounded = not w.moved
        handle: int = self.scripts.dispatch(
            queue=self.keys.group_queue(group), marker=self.keys.dispatch_marker(group, w.request.id, epoch),
            accepting=self.keys.group_accepting(group), queue_tokens=self.keys.group_queue_tokens(group),
            request=self._wire(w, group), epoch=epoch, marker_ttl_ms=self.settings.result_ttl_s * 1000,
            cost=w.cost, max_entries=self.limits.group_requests if bounded else 0,
            max_tokens=self.limits.group_tokens if bounded else 0, signing_key=self.signing.current(), client=pipe)
        return handle

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

