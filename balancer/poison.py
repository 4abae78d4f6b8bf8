"""A balancer's requests that cannot be handled (broker.dead_letter), and duplicate ids
(balancer.request_ids, found in the claim's round trip). Part of ``Balancer`` (a mixin: the state it uses is the balancer's)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from redis import Redis
from redis.exceptions import ResponseError

from balancer.pending import Final, Waiting
from balancer.request_ids import Holder
from broker.consumer import StreamConsumer
from broker.dead_letter import Attempts, DeadLetters, describe, is_transient
from broker.events import error_event
from broker.keys import Keys
from broker.logs import request_extra
from broker.scripts import Claim, Scripts, pack_events
from broker.settings import Settings
from broker.wire import Batch

if TYPE_CHECKING:
    from collections import Counter

    from balancer.telemetry import BalancerTelemetry

log = logging.getLogger("balancer.service")

PUBLISHER = "balancer"  # owner name under which balancers publish the final events they decide
FIRST_EPOCH = 1  # the epoch CLAIM_OWNER gives a request nobody claimed before


class PoisonHandling:
    redis: Redis
    settings: Settings
    keys: Keys
    scripts: Scripts
    telemetry: BalancerTelemetry
    dead_letters: DeadLetters
    ingress: StreamConsumer
    attempts: Attempts
    waiting: dict[bytes, Waiting]
    counts: Counter[str]
    _monotonic: Callable[[], float]

    if TYPE_CHECKING:  # the Balancer's own
        def _ack(self, entry_ids: list[bytes]) -> None:
            ...

    def _give_up(self, entry_id: bytes, request_id: str | None, reply_to: str | None,
                 problem: BaseException | str, *, reply_to_failed: bool = False,
                 fields: dict[bytes, bytes] | None = None) -> None:
        """End a request that cannot be handled (broker.dead_letter) and acknowledge its entry."""
        reason = describe(problem)
        code = "internal"
        if isinstance(problem, ResponseError) and ("WRONGTYPE" in reason or "NOPERM" in reason):
            code, reason = "invalid_request", f"field 'reply_to': events cannot be written there ({reason})"
        source, raw_id = self.ingress.locate(entry_id)  # (entry_id: the entry's ref, broker.consumer)
        delivered = self.dead_letters.give_up(
            source=source, entry_id=raw_id, request_id=request_id, reply_to=reply_to,
            reason=reason, code=code, reply_to_failed=reply_to_failed, fields=fields)
        self.waiting.pop(entry_id, None)
        self.attempts.forget(entry_id)
        self.counts[code if delivered else "dead_letter"] += 1
        if delivered and request_id is not None:
            self.telemetry.finished(request_id, {"event": "error", "code": code, "message": reason})
        self._ack([entry_id])

    def _request_failed(self, w: Waiting, problem: BaseException, *, reply_to_failed: bool = False) -> None:
        """Handling ``w`` failed: retried after a backoff when the failure may pass, else given up."""
        if is_transient(problem) and not self.attempts.failed(w.entry_id, now=self._monotonic()):
            log.warning("request %s: %s; will retry", w.request.id, describe(problem),
                        extra=request_extra(w.request.id))
            return
        # a failure that may pass says nothing against the reply stream: the error may still go there
        self._give_up(w.entry_id, w.request.id, w.request.reply_to, problem,
                      reply_to_failed=reply_to_failed and not is_transient(problem))

    # --- duplicate ids (balancer.request_ids): held in the claim's round trip ---------------------

    def _duplicate_of_waiting(self, w: Waiting, holder: Holder) -> Final | None:
        """A waiting request (never claimed) whose id another entry holds: acknowledged as a retry
        (same reply stream), or its ``duplicate_id`` event, to publish (returned)."""
        del self.waiting[w.entry_id]
        self.counts["duplicate_id"] += 1
        if holder.reply_to == w.request.reply_to:
            self._ack([w.entry_id])  # a retry: the first request's events on this stream answer it
            return None
        event = _duplicate_event(w.request.id, holder)
        self.telemetry.finished(w.request.id, event)
        return Final(w.entry_id, w.request.id, w.request.reply_to, event)

    def _duplicate_of_claimed(self, w: Waiting, holder: Holder, got: Claim | Exception, candidate: str,
                              queued: Any, voided: list[Voided], acks: list[bytes]) -> None:
        """A new request claimed and queued in one round trip whose id another entry holds.

        Its queue entry is taken back by the caller (retract). Where the claim pinned the request to
        ``candidate`` (FIRST_EPOCH), the pin is undone in the same next round trip (``_void``): the
        balancer takes the request over, which fences a group that read the stray entry meanwhile, and
        publishes ``duplicate_id`` on the duplicate's own stream; on the first request's stream (a
        retry) the balancer's ownership is what the first request's own claim takes over later.
        """
        del self.waiting[w.entry_id]
        self.counts["duplicate_id"] += 1
        same = holder.reply_to == w.request.reply_to
        if isinstance(got, Exception):
            # never on the first request's stream: only {p}:dead hears of it
            self._give_up(w.entry_id, None, w.request.reply_to, f"request id {w.request.id!r} is in use by "
                          f"ingress entry {holder.entry_id}, and this request's reply stream failed: {got}")
            return
        pinned = not got.finished and (got.owner, got.epoch) == (candidate, FIRST_EPOCH)
        if same:
            # pinned here, and queued (not 'dup': then the pin is the first request's, running there)
            if pinned and isinstance(queued, list) and queued and queued[0] == b"ok":
                voided.append(Voided(w, candidate, None))
            acks.append(w.entry_id)  # a retry: the first request's events on this stream answer it
        elif pinned:
            event = _duplicate_event(w.request.id, holder)
            self.telemetry.finished(w.request.id, event)
            voided.append(Voided(w, candidate, event))
        else:
            acks.append(w.entry_id)  # finished, or owned by another, on its stream: answered there

    def _void(self, pipe: Batch, voided: list[Voided]) -> list[int | None]:
        """Add to ``pipe``: for each voided claim, the balancer's takeover (fencing the candidate
        group), and the duplicate's error, published under the epoch that takeover gives. Returns the
        handle of each publish (None where there is no error to publish)."""
        ttl_ms = self.settings.result_ttl_s * 1000
        handles: list[int | None] = []
        for v in voided:
            reply, rid = v.waiting.request.reply_to, v.waiting.request.id
            self.scripts.claim_owner(progress=self.keys.progress(reply, rid), reply_stream=reply, group=PUBLISHER,
                                     ttl_ms=ttl_ms, taken_from=v.candidate, taken_from_epoch=FIRST_EPOCH, client=pipe)
            handles.append(None if v.event is None else self.scripts.publish(
                reply_stream=reply, progress=self.keys.progress(reply, rid), publisher=PUBLISHER,
                epoch=FIRST_EPOCH + 1, ttl_ms=ttl_ms, events=pack_events([("f", 0, v.event)]), client=pipe))
        return handles

    def _voided(self, voided: list[Voided], handles: list[int | None], results: list[Any], acks: list[bytes]) -> None:
        """Take in the replies of ``_void``'s publishes (by their handles)."""
        for v, handle in zip(voided, handles):
            published = results[handle] if handle is not None else None
            if isinstance(published, Exception):
                self._give_up(v.waiting.entry_id, None, v.waiting.request.reply_to, published)
                continue
            acks.append(v.waiting.entry_id)

    def _duplicate_final(self, f: Final, holder: Holder) -> Final | None:
        """A final event the balancer decided for an entry whose id another entry holds: what to
        publish instead (``duplicate_id`` on its own stream; an invalid entry's own error), or None
        when the entry is done with (a retry, acknowledged; an invalid entry on the holder's stream,
        where its error would be taken for that request's answer: to ``{p}:dead``)."""
        if f.invalid:
            if holder.reply_to != f.reply_to:
                return f
            self.counts["duplicate_id"] += 1
            self._give_up(f.entry_id, None, f.reply_to, (
                f"request id {f.request_id!r} is in use by ingress entry {holder.entry_id} on the same reply stream, "
                f"and this entry is invalid: {f.fields.get('message', '')}"))
            return None
        self.counts["duplicate_id"] += 1
        self.counts[_outcome(f.fields)] -= 1  # counted when decided (_route): a duplicate instead
        if holder.reply_to == f.reply_to:
            self._ack([f.entry_id])  # a retry: the first request's events on this stream answer it
            return None
        return Final(f.entry_id, f.request_id, f.reply_to, _duplicate_event(f.request_id, holder))


@dataclass(slots=True)
class Voided:
    """A new request's claim undone: it was a duplicate (``event``: its error, None for a retry)."""

    waiting: Waiting
    candidate: str
    event: dict[str, str] | None


def _duplicate_event(request_id: str, holder: Holder) -> dict[str, str]:
    return error_event(request_id, "duplicate_id", (
        f"request id {request_id!r} is in use by another request (ingress entry {holder.entry_id}) "
        "while its result lasts; send this request with another id"))


def _outcome(event: dict[str, str]) -> str:
    """The key of ``Balancer.counts`` a final event of the balancer's is counted under."""
    return event["code"] if event["event"] == "error" else "cancelled"
