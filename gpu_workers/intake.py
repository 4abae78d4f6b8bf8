"""A worker group's queue entries coming in, and those it cannot handle: recovered after a restart
(bounded: MAX_DELIVERIES), admitted without ever stopping the loop, or ended (broker.dead_letter).
Part of ``WorkerGroup`` (a mixin: the state it uses is the group's, declared below)."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from broker.connection import TRANSIENT_ERRORS
from broker.dead_letter import DeadLetters, describe
from broker.keys import QUEUE_GROUP, Keys
from broker.protocol import GenerationRequest
from gpu_workers.holding import Held
from gpu_workers.publisher import Publisher

log = logging.getLogger("gpu_workers.group")

CONSUMER = "leader"
# Deliveries of one queue entry (first read, then a re-read at every start and reconnect) before a
# starting group gives it up: an entry that keeps killing the group goes to {p}:dead.
MAX_DELIVERIES = 10


class QueueIntake:
    redis: Any
    keys: Keys
    name: str
    publisher: Publisher
    dead_letters: DeadLetters
    held: dict[str, Held]

    if TYPE_CHECKING:  # the WorkerGroup's own
        def _admit(self, entry_id: bytes, fields: dict[bytes, bytes]) -> None: ...

        def _ack(self, entry_ids: list[bytes]) -> None: ...

        def _stop(self, held: Held) -> None: ...

        def _forget(self, held: Held) -> None: ...

    def _recover(self, *, starting: bool = False) -> None:
        """Admit the entries a previous incarnation of this group read but never finished.

        Also run after every reconnect: a Redis that restarted from an older AOF may have entries
        pending again that this process had finished and acknowledged. A starting group gives up
        the entries delivered more than MAX_DELIVERIES times (they may be what stopped it before).
        """
        queue, cursor, acking = self.keys.group_queue(self.name), "0", set(self.publisher.to_ack)
        while True:
            batch = self.redis.xreadgroup(QUEUE_GROUP, CONSUMER, {queue: cursor}, count=500)
            entries = [e for _s, es in (batch or []) for e in es]
            if not entries:
                return
            deliveries: dict[bytes, int] = {}
            if starting:
                rows = self.redis.xpending_range(queue, QUEUE_GROUP, min=entries[0][0], max=entries[-1][0],
                                                 count=len(entries), consumername=CONSUMER)
                deliveries = {row["message_id"]: int(row["times_delivered"]) for row in rows}
            for entry_id, fields in entries:
                cursor = entry_id
                if entry_id in acking:
                    continue
                if not fields:  # deleted after it was read: nothing left to do
                    self._ack([entry_id])
                elif deliveries.get(entry_id, 0) > MAX_DELIVERIES:
                    self._give_up_entry(entry_id, fields, f"delivered {deliveries[entry_id]} times and never finished")
                else:
                    self._admit_safely(entry_id, fields)
            log.info("group %s recovered %d pending requests", self.name, len(entries))

    def _admit_safely(self, entry_id: bytes, fields: dict[bytes, bytes] | None) -> None:
        """``_admit``, where any failure ends that entry (broker.dead_letter), never the loop."""
        try:
            self._admit(entry_id, fields or {})
        except Exception as exc:
            if isinstance(exc, TRANSIENT_ERRORS):
                raise
            log.exception("cannot admit queue entry %s", entry_id)
            held = next((h for h in self.held.values() if h.entry_id == entry_id), None)
            if held is not None:
                self._stop(held)
                self._forget(held)
            self._give_up_entry(entry_id, fields or {}, describe(exc))

    def _give_up_entry(self, entry_id: bytes, fields: dict[bytes, bytes], reason: str) -> None:
        """End the request of a queue entry that cannot be handled: its error, else {p}:dead."""
        request: GenerationRequest | None
        try:
            request, epoch = GenerationRequest.from_wire(fields[b"r"]), int(fields[b"e"])
        except Exception:  # noqa: BLE001 - not even readable: to {p}:dead as it is
            request, epoch = None, 0
        self.dead_letters.give_up(source=self.keys.group_queue(self.name), entry_id=entry_id,
                                  request_id=request.id if request else None,
                                  reply_to=request.reply_to if request else None, reason=reason, epoch=epoch,
                                  fields=None if request else fields)
        self._ack([entry_id])

    def _undeliverable(self, held: Held) -> None:
        """The reply stream refused the events (of another type, or NOPERM): the error goes to the
        request's default result stream, else the entry to {p}:dead."""
        problem = describe(self.publisher.errors.pop(held.request.id, "publish failed"))
        self.dead_letters.give_up(
            source=self.keys.group_queue(self.name), entry_id=held.entry_id, request_id=held.request.id,
            reply_to=held.request.reply_to, reason=f"events cannot be written to the reply stream ({problem})",
            code="invalid_request", epoch=held.epoch, reply_to_failed=True)
