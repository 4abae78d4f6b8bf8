"""A balancer's requests that cannot be handled (broker.dead_letter), and duplicate ids
(balancer.request_ids). Part of ``Balancer`` (a mixin: the state it uses is the balancer's)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from redis.exceptions import ResponseError

from balancer.pending import Final, Waiting
from balancer.request_ids import hold_ids
from broker.dead_letter import Attempts, DeadLetters, describe, is_transient
from broker.events import error_event
from broker.keys import Keys
from broker.logs import request_extra
from broker.scripts import Scripts
from broker.settings import Settings

if TYPE_CHECKING:
    from collections import Counter

    from balancer.telemetry import BalancerTelemetry

log = logging.getLogger("balancer.service")


class PoisonHandling:
    redis: Any
    settings: Settings
    keys: Keys
    scripts: Scripts
    telemetry: BalancerTelemetry
    dead_letters: DeadLetters
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
        delivered = self.dead_letters.give_up(
            source=self.keys.requests, entry_id=entry_id, request_id=request_id, reply_to=reply_to,
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

    def _hold_for_refused(self, refused: list[Final]) -> list[Final]:
        """Entries that failed validation hold their ids too (a later request with the id gets
        ``duplicate_id``, not silence). One whose id another request holds on the same reply stream
        goes to ``{p}:dead`` instead: its error there would be taken for that request's answer, and
        would end that request's state."""
        if not refused:
            return refused
        holders = hold_ids(self.scripts.wire, self.keys, [(f.entry_id, f.request_id, f.reply_to) for f in refused],
                           ttl_ms=self.settings.result_ttl_s * 1000)
        kept: list[Final] = []
        for f, holder in zip(refused, holders):
            if holder is None or holder.entry_id == f.entry_id.decode() or holder.reply_to != f.reply_to:
                kept.append(f)
                continue
            self.counts["duplicate_id"] += 1
            self._give_up(f.entry_id, None, f.reply_to, (
                f"request id {f.request_id!r} is in use by ingress entry {holder.entry_id} on the same reply stream, "
                f"and this entry is invalid: {f.fields.get('message', '')}"))
        return kept

    def _refuse_duplicates(self, admitted: list[Waiting]) -> list[Final]:
        """Hold the ids of new requests; the final events of those whose id is in use (request_ids)."""
        new = [w for w in admitted if not w.moved]
        holders = hold_ids(self.scripts.wire, self.keys, [(w.entry_id, w.request.id, w.request.reply_to) for w in new],
                           ttl_ms=self.settings.result_ttl_s * 1000)
        finals: list[Final] = []
        for w, holder in zip(new, holders):
            if holder is None or holder.entry_id == w.entry_id.decode():
                continue
            del self.waiting[w.entry_id]
            self.counts["duplicate_id"] += 1
            if holder.reply_to == w.request.reply_to:
                self._ack([w.entry_id])  # a retry: the first request's events on this stream answer it
                continue
            event = error_event(w.request.id, "duplicate_id", (
                f"request id {w.request.id!r} is in use by another request (ingress entry {holder.entry_id}) "
                "while its result lasts; send this request with another id"))
            self.telemetry.finished(w.request.id, event)
            finals.append(Final(w.entry_id, w.request.id, w.request.reply_to, event))
        return finals
