"""A worker group's queue entries coming in: admitted (tokenized, checked, queued for the engine)
without ever stopping the loop, recovered after a restart (bounded: MAX_DELIVERIES), or ended when
they cannot be handled (broker.dead_letter). Part of ``WorkerGroup`` (a mixin: the state it uses is
the group's, declared below).

A request that arrives with ``output_ids`` was moved here mid-generation: its output state replays
those tokens (no events) and the engine continues after them, so indices, deltas and the final text
carry on exactly where the previous owner stopped.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from broker.connection import TRANSIENT_ERRORS, RedisClock
from broker.consumer import StreamConsumer
from broker.dead_letter import DeadLetters, describe
from broker.keys import Keys
from broker.lua import ForgedEntry, queue_entry
from broker.protocol import limit_problem
from broker.signing import SigningKey
from gpu_workers.engine import Engine
from gpu_workers.holding import Held, Holding
from gpu_workers.output import OutputState
from gpu_workers.publisher import Publisher
from gpu_workers.served import foreign_weights
from gpu_workers.telemetry import GroupTelemetry

log = logging.getLogger("gpu_workers.group")

CONSUMER = "leader"
# Deliveries of one queue entry (first read, then a re-read at every start and reconnect) before a
# starting group gives it up: an entry that keeps killing the group goes to {p}:dead.
MAX_DELIVERIES = 10


class QueueIntake:
    keys: Keys
    name: str
    engine: Engine
    weights: str
    clock: RedisClock
    queue: StreamConsumer
    signing: SigningKey  # checks the signatures of queue entries (broker.lua.queue_entry)
    publisher: Publisher
    dead_letters: DeadLetters
    telemetry: GroupTelemetry
    holding: Holding
    held: dict[str, Held]

    if TYPE_CHECKING:  # the WorkerGroup's own
        def _stop(self, held: Held) -> None: ...

        def _forget(self, held: Held) -> None: ...

        def _finish(self, held: Held, finish_reason: str) -> None: ...

        def _finish_error(self, held: Held, code: str, message: str) -> None: ...

    def _recover(self, *, starting: bool = False) -> None:
        """Admit the entries a previous incarnation of this group read but never finished.

        Also run after every reconnect: a Redis that restarted from an older AOF may have entries
        pending again that this process had finished and acknowledged. A starting group gives up
        the entries delivered more than MAX_DELIVERIES times (they may be what stopped it before).
        """
        for entries in self.queue.own_pending():
            for entry_id, fields, deliveries in entries:
                if not fields:  # deleted after it was read: nothing left to do
                    self.queue.ack([entry_id])
                elif starting and deliveries > MAX_DELIVERIES:
                    self._give_up_entry(entry_id, fields, f"delivered {deliveries} times and never finished")
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

    def _admit(self, entry_id: bytes, fields: dict[bytes, bytes]) -> None:
        try:
            entry = queue_entry(fields, signing=self.signing)
        except ForgedEntry as exc:  # written by a client: none of its fields is trusted, nothing published
            self.dead_letters.give_up(source=self.keys.group_queue(self.name), entry_id=entry_id, request_id=None,
                                      reply_to=None, reason=str(exc), fields=fields)
            self.queue.ack([entry_id])
            return
        except Exception as exc:  # a malformed queue entry is a bug upstream: never crash on it
            log.exception("malformed queue entry %s", entry_id)
            self._give_up_entry(entry_id, fields, f"malformed queue entry ({type(exc).__name__})")
            return
        request = entry.request
        if request.id in self.held:
            old = self.held[request.id]
            if old.entry_id == entry_id:
                return
            if old.epoch >= entry.epoch:
                self.queue.ack([entry_id])
                return
            self._stop(old)
            self._forget(old)
            self.queue.ack([old.entry_id])
        held = Held(entry_id=entry_id, request=request, epoch=entry.epoch, cost=entry.cost)
        self.holding.add(held)
        info = self.engine.info
        try:
            held.prompt_ids = (list(request.prompt_ids) if request.prompt_ids is not None
                               else self.engine.tokenizer.encode(request.prompt or ""))
            held.choices = [OutputState(sampling=request.sampling, prompt_ids=held.prompt_ids,
                                        tokenizer=self.engine.tokenizer, eos_token_ids=info.eos_token_ids,
                                        max_context=info.max_context)
                            for _ in range(request.sampling.num_sequences)]
            held.output = held.choices[0]
            if len(held.choices) == 1:
                held.choices = []
        except Exception as exc:
            log.exception("request %s: cannot tokenize its prompt", request.id)
            self._finish_error(held, "internal", f"the prompt could not be tokenized ({type(exc).__name__})")
            return
        self.telemetry.admitted(request, prompt_tokens=len(held.prompt_ids))
        problem = limit_problem(held.prompt_ids, request.sampling.needed_tokens, vocab_size=info.vocab_size,
                                max_context=info.max_context, logit_bias=request.sampling.logit_bias)
        if problem is not None:
            self._finish_error(held, "invalid_request", problem)
            return
        if (problem := foreign_weights(request, self.weights)) is not None:
            self._finish_error(held, "unavailable", problem)
            return
        if (request.output_ids or request.choice_output_ids) and not self._replay(held):
            return
        now_ms = self.clock.now_ms()
        if self.queue.cancels.matches(request.id, request.cancel_token, request.tenant):
            self._finish(held, "cancelled")
        elif request.deadline_ms is not None and now_ms >= request.deadline_ms:
            self._finish_error(held, "timeout", f"deadline of {request.timeout_s}s passed")
        else:
            self.holding.queue(held)

    def _replay(self, held: Held) -> bool:
        """Feed the tokens another group published into the output state, writing nothing: the
        next token gets the next index and the text deltas go on where the client's stream stops.
        False when the request ended (it should have ended with them already)."""
        assert held.output is not None
        request = held.request
        # (a request with several completions continues each from its own tokens)
        replays = list(zip(held.choices, request.choice_output_ids)) if held.choices else [
            (held.output, request.output_ids)]
        try:
            for output, token_ids in replays:
                for token_id in token_ids:
                    output.push(token_id)
                    if output.finished:
                        break
        except Exception as exc:
            log.exception("request %s: cannot continue from its published tokens", held.request.id)
            self._finish_error(held, "internal", f"cannot continue a moved request ({type(exc).__name__})")
            return False
        outputs = held.choices or [held.output]
        if all(o.finished for o in outputs):
            self._finish(held, outputs[0].finish_reason or "stop")
            return False
        return True

    def _give_up_entry(self, entry_id: bytes, fields: dict[bytes, bytes], reason: str) -> None:
        """End the request of a queue entry that cannot be handled: its error, else {p}:dead."""
        try:
            entry = queue_entry(fields, signing=None)  # (its publish is fenced by the request's state)
        except Exception:  # noqa: BLE001 - not even readable: to {p}:dead as it is
            entry = None
        self.dead_letters.give_up(source=self.keys.group_queue(self.name), entry_id=entry_id,
                                  request_id=entry.request.id if entry else None,
                                  reply_to=entry.request.reply_to if entry else None, reason=reason,
                                  epoch=entry.epoch if entry else 0, fields=None if entry else fields)
        self.queue.ack([entry_id])

    def _undeliverable(self, held: Held) -> None:
        """The reply stream refused the events (of another type, or NOPERM): the error goes to the
        request's default result stream, else the entry to {p}:dead."""
        problem = describe(self.publisher.errors.pop(held.request.id, "publish failed"))
        self.dead_letters.give_up(
            source=self.keys.group_queue(self.name), entry_id=held.entry_id, request_id=held.request.id,
            reply_to=held.request.reply_to, reason=f"events cannot be written to the reply stream ({problem})",
            code="invalid_request", epoch=held.epoch, reply_to_failed=True)
