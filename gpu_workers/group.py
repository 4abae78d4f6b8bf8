"""The worker group's leader loop: queue in, engine steps, events out, heartbeats.

One iteration (``tick``): read new requests from the group queue (blocking only when idle) and
cancellations, step the engine once, publish every event of the step in one pipeline, and
acknowledge a queue entry only in the pipeline that writes its final event. Publishing goes through
the PUBLISH script, which fences by owner and epoch and drops duplicate token indices, so
re-processing an entry after a crash can never duplicate or fork what a client has seen.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from redis.exceptions import ResponseError

from broker.connection import TRANSIENT_ERRORS, RedisClock, backoff_delays
from broker.keys import QUEUE_GROUP, Keys
from broker.logs import request_extra
from broker.protocol import GenerationRequest, done_event, error_event, limit_problem, token_event
from broker.registry import GroupLoad
from broker.scripts import Scripts, pack_events, publish_result
from broker.settings import Settings
from gpu_workers.engine import Engine, EngineRequest
from gpu_workers.output import OutputState
from gpu_workers.telemetry import GroupTelemetry

log = logging.getLogger(__name__)

CONSUMER = "leader"
Event = tuple[str, int, dict[str, str]]  # (kind 't'/'f', token index, fields) for PUBLISH


@dataclass(slots=True)
class Held:
    """A request this group has read from its queue and not yet finished."""

    entry_id: bytes
    request: GenerationRequest
    epoch: int
    output: OutputState
    events: list[Event] = field(default_factory=list)  # produced, not yet published
    final: bool = False


class WorkerGroup:
    def __init__(
        self,
        redis: Any,
        engine: Engine,
        *,
        settings: Settings,
        name: str | None = None,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.redis = redis
        self.engine = engine
        self.settings = settings
        self.keys = Keys(settings.prefix)
        self.name = name or f"{socket.gethostname()}-{os.getpid()}"
        self.scripts = Scripts(redis)
        self.clock = RedisClock(redis.time)
        self._monotonic = monotonic
        self.held: dict[str, Held] = {}
        self.draining = False
        self.stop_now = threading.Event()
        self.completed = 0
        self._cancelled: dict[str, float] = {}  # request id -> when seen (Redis ms)
        self._cancel_cursor = b"0-0"
        self._next_heartbeat = 0.0
        self._queue_depth = 0
        self._tokens_ewma = 0.0
        self._last_step_t = monotonic()
        self._hurry = False
        self._to_ack: list[bytes] = []  # finished entries, acknowledged with the next read
        self.telemetry = GroupTelemetry(
            self.name, enabled=settings.metrics_port is not None, now_ms=lambda: self.clock.now_ms(),
            log_prompts=settings.log_prompts, ready_within_s=settings.dead_after_s,
            live_within_s=settings.liveness_timeout_s, monotonic=monotonic)

    # --- lifecycle -------------------------------------------------------------------------------

    def register(self) -> None:
        queue = self.keys.group_queue(self.name)
        try:
            self.redis.xgroup_create(queue, QUEUE_GROUP, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        last = self.redis.xrevrange(self.keys.cancel, count=1)
        self._cancel_cursor = last[0][0] if last else b"0-0"
        self._recover()
        self.redis.set(self.keys.group_accepting(self.name), "1")
        self.heartbeat(force=True)
        log.info("group %s registered (model %s)", self.name, self.engine.info.model)

    def _recover(self) -> None:
        """Admit the entries a previous incarnation of this group read but never finished."""
        queue, cursor = self.keys.group_queue(self.name), "0"
        while True:
            batch = self.redis.xreadgroup(QUEUE_GROUP, CONSUMER, {queue: cursor}, count=500)
            entries = [e for _s, es in (batch or []) for e in es]
            if not entries:
                return
            for entry_id, fields in entries:
                cursor = entry_id
                if fields:
                    self._admit(entry_id, fields)
                else:  # deleted after it was read: nothing left to do
                    self._ack([entry_id])
            log.info("group %s recovered %d pending requests", self.name, len(entries))

    def run(self) -> int:
        """Serve until ``drain()`` has finished or handed back everything, then deregister.

        Returns the process exit code: 0 after a drain, 3 when the group found itself failed over.
        """
        delays = None
        drain_deadline: float | None = None
        while not self.stop_now.is_set():
            try:
                if self.draining and drain_deadline is None:
                    drain_deadline = self._monotonic() + self.settings.drain_timeout_s
                    self._close_queue()
                if drain_deadline is not None and (
                    not self.held or self._hurry or self._monotonic() >= drain_deadline
                ):
                    self._hand_back_all()
                    break
                self.tick()
                delays = None
            except TRANSIENT_ERRORS as exc:
                if drain_deadline is not None and (self._hurry or self._monotonic() >= drain_deadline):
                    # Nothing held was acknowledged, so it all stays pending in Redis: a restart of
                    # this group recovers it, or balancers fail it over.
                    log.error("redis unreachable while draining (%s); exiting without hand-back", exc)
                    self.engine.close()
                    return 0
                delays = delays or backoff_delays(self.settings)
                delay = next(delays)
                log.warning("redis unavailable (%s); retrying in %.2fs", exc, delay)
                time.sleep(delay)
            except ResponseError as exc:
                if "NOGROUP" not in str(exc):
                    raise
                # Balancers declared this group dead (it stalled past dead_after_s) and moved its
                # work: everything it still holds is fenced. Exit so that a fresh start re-registers.
                log.error("group %s was failed over while unresponsive; exiting", self.name)
                self.engine.close()
                return 3
        self.deregister()
        return 0

    def drain(self) -> None:
        """Stop taking work; finish what is held (up to drain_timeout_s), hand back the rest.

        A second call hands back at once.
        """
        if self.draining:
            self._hurry = True
        self.draining = True

    def deregister(self) -> None:
        try:
            self._flush_acks()
            pipe = self.redis.pipeline(transaction=False)
            pipe.zrem(self.keys.groups, self.name)
            pipe.delete(self.keys.group_info(self.name), self.keys.group_accepting(self.name))
            pipe.execute()
            log.info("group %s deregistered", self.name)
        except TRANSIENT_ERRORS as exc:
            log.warning("could not deregister (%s); the group will show as dead", exc)
        self.engine.close()

    # --- one iteration ---------------------------------------------------------------------------

    def tick(self) -> None:
        self._read_inputs()
        now_ms = self.clock.now_ms()
        self._apply_cancels_and_deadlines(now_ms)
        self._step_engine()
        self._publish()
        if not self.held and not self.engine.has_work():
            self._flush_acks()  # going idle: no next read soon to carry them
        self.heartbeat()

    def _read_inputs(self) -> None:
        pipe = self.redis.pipeline(transaction=False)
        acks = len(self._to_ack)
        self._queue_acks(pipe)
        room = self.settings.worker_max_batch - len(self.held)
        read_queue = not self.draining and room > 0
        idle = not self.held and not self.engine.has_work()
        if read_queue:
            # Idle: block until work arrives, but wake for the next heartbeat.
            until_heartbeat_ms = int((self._next_heartbeat - self._monotonic()) * 1000)
            block = max(1, min(self.settings.worker_block_ms, until_heartbeat_ms)) if idle else None
            pipe.xreadgroup(QUEUE_GROUP, CONSUMER, {self.keys.group_queue(self.name): ">"}, count=room, block=block)
        pipe.xread({self.keys.cancel: self._cancel_cursor}, count=1000)
        results = pipe.execute()
        del self._to_ack[:acks]
        results = results[2:] if acks else results
        cancels = results[-1]
        for _stream, entries in cancels or []:
            for entry_id, fields in entries:
                self._cancel_cursor = entry_id
                rid = fields.get(b"id")
                if rid:
                    self._cancelled[rid.decode("utf-8", "replace")] = self.clock.now_ms()
        if read_queue:
            for _stream, entries in results[0] or []:
                for entry_id, fields in entries:
                    self._admit(entry_id, fields)

    def _admit(self, entry_id: bytes, fields: dict[bytes, bytes]) -> None:
        try:
            request = GenerationRequest.from_wire(fields[b"r"])
            epoch = int(fields[b"e"])
        except Exception:  # a malformed queue entry is a bug upstream; drop it loudly, never crash
            log.exception("dropping malformed queue entry %s", entry_id)
            self._ack([entry_id])
            return
        if request.id in self.held:
            old = self.held[request.id]
            if old.entry_id == entry_id:
                return
            if old.epoch >= epoch:
                self._ack([entry_id])
                return
            self.engine.abort(request.id)
            self._ack([old.entry_id])
        info = self.engine.info
        prompt_ids = list(request.prompt_ids) if request.prompt_ids is not None else self.engine.tokenizer.encode(request.prompt or "")
        output = OutputState(
            sampling=request.sampling,
            prompt_ids=prompt_ids,
            tokenizer=self.engine.tokenizer,
            eos_token_ids=info.eos_token_ids,
            max_context=info.max_context,
        )
        held = Held(entry_id=entry_id, request=request, epoch=epoch, output=output)
        self.held[request.id] = held
        self.telemetry.admitted(request, prompt_tokens=len(prompt_ids))
        problem = limit_problem(prompt_ids, request.sampling.max_tokens, vocab_size=info.vocab_size,
                                max_context=info.max_context)
        if problem is not None:
            self._finish_error(held, "invalid_request", problem)
            return
        self.engine.add(
            EngineRequest(request.id, prompt_ids, request.sampling, priority=request.priority)
        )

    def _apply_cancels_and_deadlines(self, now_ms: float) -> None:
        for rid, held in list(self.held.items()):
            if held.final:
                continue
            if rid in self._cancelled:
                self.engine.abort(rid)
                self._finish(held, "cancelled")
            elif held.request.deadline_ms is not None and now_ms >= held.request.deadline_ms:
                self.engine.abort(rid)
                self._finish_error(held, "timeout", f"deadline of {held.request.timeout_s}s passed")
        horizon = now_ms - 600_000  # remember cancellations for 10 minutes
        if self._cancelled and next(iter(self._cancelled.values())) < horizon:
            self._cancelled = {k: v for k, v in self._cancelled.items() if v >= horizon}

    def _step_engine(self) -> None:
        if not self.engine.has_work():
            return
        outputs = self.engine.step()
        self.telemetry.step(outputs)
        now = self._monotonic()
        elapsed = max(now - self._last_step_t, 1e-6)
        self._last_step_t = now
        self._tokens_ewma = 0.9 * self._tokens_ewma + 0.1 * (len(outputs) / elapsed)
        for out in outputs:
            held = self.held.get(out.request_id)
            if held is None or held.final:
                continue
            result = held.output.push(out.token_id, engine_finish=out.finish_reason)
            if held.request.stream:
                held.events.append(("t", result.index, token_event(held.request.id, result.index, result.token_id, result.text)))
            if result.finish_reason is not None:
                if out.finish_reason is None:
                    self.engine.abort(held.request.id)
                self._finish(held, result.finish_reason)

    def _finish(self, held: Held, finish_reason: str) -> None:
        out = held.output
        held.events.append(("f", 0, done_event(
            held.request.id, text=out.text, token_ids=out.token_ids,
            finish_reason=finish_reason,  # type: ignore[arg-type]
            prompt_tokens=out.prompt_len,
        )))
        held.final = True
        self.telemetry.finished(held.request.id, finish_reason, prompt_tokens=out.prompt_len,
                                completion_tokens=len(out.token_ids))

    def _finish_error(self, held: Held, code: str, message: str) -> None:
        held.events.append(("f", 0, error_event(held.request.id, code, message)))
        held.final = True
        self.telemetry.failed(held.request.id, code, message)

    def _publish(self) -> None:
        batch = [h for h in self.held.values() if h.events]
        if not batch:
            return
        ttl_ms = self.settings.result_ttl_s * 1000

        def publish(pipe: Any) -> None:
            for held in batch:
                reply = held.request.reply_to
                self.scripts.publish(
                    keys=[reply, self.keys.state(reply, held.request.id)],
                    args=[self.name, held.epoch, ttl_ms, pack_events(held.events)],
                    client=pipe,
                )

        _, results = self.scripts.execute(publish)
        for raw in results:
            if isinstance(raw, TRANSIENT_ERRORS):
                raise raw  # nothing cleared: the events go out again (publishing is idempotent)
        done: list[Held] = []
        for held, raw in zip(batch, results):
            held.events.clear()
            if isinstance(raw, Exception):
                # e.g. reply_to names a key of another type: nothing can be delivered there
                log.error("request %s: cannot publish to %r: %s", held.request.id, held.request.reply_to, raw,
                          extra=request_extra(held.request.id))
                done.append(held)
                continue
            status = publish_result(raw).status
            if status in ("fenced", "final"):
                # moved to another group, or finished already (a re-delivered entry): not ours now
                self.engine.abort(held.request.id)
                self.telemetry.let_go(held.request.id, status)
                done.append(held)
            elif status == "gap":
                log.error("request %s: token gap at publish; ending it", held.request.id,
                          extra=request_extra(held.request.id))
                self.telemetry.let_go(held.request.id, "gap")
                self.engine.abort(held.request.id)
                done.append(held)
            elif held.final:
                self.completed += 1
                done.append(held)
        for held in done:
            del self.held[held.request.id]
        self._ack([h.entry_id for h in done])

    def _ack(self, entry_ids: list[bytes]) -> None:
        """Acknowledge (and delete) queue entries with the next read: one round trip less per step."""
        self._to_ack.extend(entry_ids)

    def _queue_acks(self, pipe: Any) -> None:
        if self._to_ack:
            queue = self.keys.group_queue(self.name)
            pipe.xack(queue, QUEUE_GROUP, *self._to_ack)
            pipe.xdel(queue, *self._to_ack)

    def _flush_acks(self) -> None:
        if self._to_ack:
            pipe = self.redis.pipeline(transaction=False)
            self._queue_acks(pipe)
            pipe.execute()
            self._to_ack.clear()

    # --- heartbeat -------------------------------------------------------------------------------

    def load(self) -> GroupLoad:
        stats = self.engine.stats()
        info = self.engine.info
        return GroupLoad(
            name=self.name,
            tp=info.tp,
            model=info.model,
            kv_dtype=info.kv_dtype,
            kv_capacity_tokens=stats.kv_capacity_tokens,
            kv_used_tokens=stats.kv_used_tokens,
            running=stats.running,
            waiting=stats.waiting,
            queue_depth=self._queue_depth,
            leader_pid=os.getpid(),
            host=socket.gethostname(),
            max_context=info.max_context,
            vocab_size=info.vocab_size,
            state="draining" if self.draining else "ready",
            completed=self.completed,
            tokens_per_s=round(self._tokens_ewma, 1),
            metrics_port=self.telemetry.port,
            rank_weight_bytes=list(info.rank_weight_bytes),
            rank_kv_bytes=list(info.rank_kv_bytes),
        )

    def heartbeat(self, *, force: bool = False) -> None:
        now = self._monotonic()
        if not force and now < self._next_heartbeat:
            return
        self._next_heartbeat = now + self.settings.heartbeat_interval_s
        queued = self.redis.xlen(self.keys.group_queue(self.name))
        self._queue_depth = max(0, queued - len(self.held))
        load = self.load()
        self.scripts.heartbeat(
            keys=[self.keys.groups, self.keys.group_info(self.name)],
            args=[self.name, *load.to_fields()],
        )
        self.telemetry.heartbeat(load, self.engine.stats(), held=self.held)

    # --- draining --------------------------------------------------------------------------------

    def _close_queue(self) -> None:
        """Take no more work: balancers see the group closed atomically at dispatch."""
        self.redis.delete(self.keys.group_accepting(self.name))
        self.heartbeat(force=True)
        log.info("group %s draining: finishing %d held requests", self.name, len(self.held))

    def _hand_back_all(self) -> None:
        """Put every request still held, or still queued, back on the ingress stream."""
        queue = self.keys.group_queue(self.name)
        for held in list(self.held.values()):
            self.engine.abort(held.request.id)
            self._hand_back(held.request, held.epoch, held.entry_id)
        self.held.clear()
        while True:
            batch = self.redis.xreadgroup(QUEUE_GROUP, CONSUMER, {queue: ">"}, count=500)
            entries = [e for _s, es in (batch or []) for e in es]
            if not entries:
                break
            for entry_id, fields in entries:
                try:
                    request, epoch = GenerationRequest.from_wire(fields[b"r"]), int(fields[b"e"])
                except Exception:
                    log.exception("dropping malformed queue entry %s", entry_id)
                    self._ack([entry_id])
                    continue
                self._hand_back(request, epoch, entry_id)
            self._flush_acks()

    def _hand_back(self, request: GenerationRequest, epoch: int, entry_id: bytes) -> None:
        # XADD first, then ack: a crash in between leaves a duplicate entry, which CLAIM_OWNER's
        # epoch check and the dispatch marker make harmless; the reverse order could lose it.
        self.redis.xadd(self.keys.requests, request.to_ingress(from_owner=self.name, epoch=epoch))
        self._ack([entry_id])
        self.telemetry.let_go(request.id, "handed_back")
        log.info("handed back request %s", request.id, extra=request_extra(request.id, group=self.name))
