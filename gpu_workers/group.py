"""The worker group's leader loop: queue in, engine steps, events out, heartbeats.

One iteration (``tick``): read new requests from the group queue (blocking only when idle) and
cancellations, end what was cancelled or timed out, move queued requests into the engine (by
priority, up to ``worker_max_batch``), step the engine once, publish every event of the step in one
pipeline, and acknowledge a queue entry only once its final event is written. Publishing goes
through the PUBLISH script, which fences by owner and epoch and drops duplicate token indices, so
re-processing an entry after a crash can never duplicate or fork what a client has seen.

A request that arrives with ``output_ids`` was moved here mid-generation: its output state replays
those tokens (no events) and the engine continues after them, so indices, deltas and the final text
carry on exactly where the previous owner stopped. An engine that raises is never fatal: the request
it raised on ends with error ``internal`` (found by trying the suspects one at a time) and the rest
goes on.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

from redis.exceptions import NoScriptError, ResponseError

from broker.cancellation import Cancellations, applies
from broker.chat import publish_template, template_digest
from broker.connection import TRANSIENT_ERRORS, RedisClock, backoff_delays
from broker.dead_letter import DeadLetters
from broker.errors import EngineFailed
from broker.failures import describe, raise_if_fatal
from broker.keys import QUEUE_GROUP, Keys
from broker.logs import request_extra
from broker.protocol import GenerationRequest, done_event, error_event, limit_problem, token_event
from broker.registry import GroupLoad
from broker.scripts import Scripts
from broker.settings import Settings
from broker.wire import Batch
from gpu_workers.engine import Engine, EngineRequest
from gpu_workers.holding import Event, Held, Holding
from gpu_workers.intake import CONSUMER, QueueIntake
from gpu_workers.isolation import Isolation
from gpu_workers.keepalive import StepKeepalive
from gpu_workers.load import LoadMeter, group_load
from gpu_workers.output import OutputState
from gpu_workers.publisher import Publisher
from gpu_workers.served import default_served_name, foreign_weights
from gpu_workers.telemetry import GroupTelemetry

log = logging.getLogger(__name__)

READ_CHUNK = 512  # most queue entries read at once
TEMPLATE_REPUBLISH_S = 30.0  # how often the chat template is written again (broker.chat)


class WorkerGroup(QueueIntake):
    def __init__(
        self,
        redis: Any,
        engine: Engine,
        *,
        settings: Settings,
        name: str | None = None,
        monotonic: Callable[[], float] = time.monotonic,
        served_models: list[str] | None = None,
        weights: str = "",
    ) -> None:
        """``served_models``: the names requests reach this group by (default: the engine's model's
        default name, gpu_workers.served); ``weights``: their fingerprint ("" when unknown)."""
        self.redis = redis
        self.engine = engine
        self.served_models = served_models or [default_served_name(engine.info.model)]
        self.weights = weights
        template = engine.info.chat_template
        self.chat_template = template_digest(template) if template else ""
        self._next_template_publish = 0.0
        self.settings = settings
        self.keys = Keys(settings.prefix)
        self.name = name or f"{socket.gethostname()}-{os.getpid()}"
        self.scripts = Scripts(redis)
        self.clock = RedisClock(redis.time)
        self._monotonic = monotonic
        self.holding = Holding()
        self.held: dict[str, Held] = self.holding.held  # request id -> what the group holds of it
        self.draining = False
        self.stop_now = threading.Event()  # leave at once; what is held stays in Redis for failover
        self.completed = 0
        self.fenced = 0
        self.meter = LoadMeter(window_start=monotonic())
        self._running = self.holding.running  # ids of the requests in the engine
        self.publisher = Publisher(self.scripts, self.keys, group=self.name, ttl_ms=settings.result_ttl_s * 1000)
        self.isolation = Isolation(self.holding)  # after an engine step raised: one request at a time
        self._cancelled = Cancellations()  # cancel entries read lately
        self._cancel_cursor = b"0-0"
        self._next_heartbeat = 0.0
        self._queue_depth = 0
        self._hurry = False
        self._starting = False
        self.telemetry = GroupTelemetry(
            self.name, enabled=settings.metrics_port is not None, now_ms=lambda: self.clock.now_ms(),
            log_prompts=settings.log_prompts, ready_within_s=settings.dead_after_s,
            live_within_s=settings.liveness_timeout_s, stats_log_interval_s=settings.stats_log_interval_s,
            model_name=self.served_models[0], monotonic=monotonic)  # vLLM's label: the served name
        self._heartbeat_fields: list[str] | None = None  # of the last heartbeat, repeated by keepalive
        self.dead_letters = DeadLetters(redis, self.scripts, self.keys, publisher=self.name,
                                        ttl_ms=settings.result_ttl_s * 1000, on_dead=self.telemetry.dead_lettered)
        self.keepalive = StepKeepalive(self._repeat_heartbeat, interval_s=settings.heartbeat_interval_s,
                                       max_step_s=settings.liveness_timeout_s, monotonic=monotonic,
                                       probe=self.telemetry.probe)

    # --- lifecycle -------------------------------------------------------------------------------

    def register(self) -> None:
        queue = self.keys.group_queue(self.name)
        self._starting = True
        self.heartbeat(force=True)  # alive but not routable yet: nobody fails it over or routes to it
        try:
            self.redis.xgroup_create(queue, QUEUE_GROUP, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        last = self.redis.xrevrange(self.keys.cancel, count=1)
        self._cancel_cursor = last[0][0] if last else b"0-0"
        self._recover(starting=True)
        self.redis.set(self.keys.group_accepting(self.name), "1")
        self._starting = False
        self.heartbeat(force=True)
        log.info("group %s registered (model %s)", self.name, self.engine.info.model)

    def run(self) -> int:
        """Serve until ``drain()`` has finished or handed back everything, then deregister.

        Returns the process exit code (0). A group failed over while it was unresponsive (its queue
        is gone) drops what it held, which has moved, and registers again.
        """
        self.keepalive.start()
        try:
            return self._serve()
        finally:
            self.keepalive.stop()

    def _serve(self) -> int:
        delays = None
        reconnected = rejoin = False
        drain_deadline: float | None = None
        while not self.stop_now.is_set():
            try:
                if rejoin:
                    self._rejoin()
                    rejoin = reconnected = False
                if reconnected:
                    self._recover()
                    reconnected = False
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
                raise_if_fatal(exc)
                if self.draining:
                    # Asked to stop and Redis is gone (under honcho or systemd it may have stopped
                    # first): nothing held was acknowledged, so it all stays pending in Redis, where a
                    # restart of this group recovers it or balancers fail it over. One signal is enough.
                    log.warning("redis unreachable while draining (%s); stopping: %d held requests stay "
                                "in Redis for failover", exc, len(self.held))
                    self.engine.close()
                    return 0
                reconnected = True
                delays = delays or backoff_delays(self.settings)
                delay = next(delays)
                log.warning("redis unavailable (%s); retrying in %.2fs", exc, delay)
                time.sleep(delay)
            except ResponseError as exc:
                raise_if_fatal(exc)
                if "NOGROUP" not in str(exc):
                    problem = describe(exc)  # out of memory, a read-only replica: one line, no traceback
                    if problem is not None:
                        log.warning("%s; retrying", problem.line)
                    else:
                        log.exception("group tick failed; retrying")
                    time.sleep(next(delays := delays or backoff_delays(self.settings)))
                    continue
                if self.draining:
                    log.error("group %s was failed over while draining; nothing left to hand back", self.name)
                    self._drop_all()
                    break
                rejoin = True  # done at the top of the loop, where a Redis error is retried
            except EngineFailed:
                raise  # no heartbeat, no events: the work stays in Redis for failover
            except Exception:
                # Never die: what is not acknowledged is retried, and requests that break the engine
                # end with `internal` (see _step_failed).
                log.exception("group tick failed; retrying")
                time.sleep(next(delays := delays or backoff_delays(self.settings)))
        if self.stop_now.is_set():
            log.warning("group %s stopping now: %d held requests stay in Redis for failover",
                        self.name, len(self.held))
            self.engine.close()
            return 0
        self.deregister()
        return 0

    def drain(self) -> None:
        """Stop taking work; hand back what has not started (queued here or waiting in the engine),
        finish the rest (up to drain_timeout_s), hand back what is left. A second call hands back at
        once; a third stops at once."""
        if self._hurry:
            self.stop_now.set()
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

    def _rejoin(self) -> None:
        """Balancers declared this group dead (it stalled past dead_after_s) and moved its work: all
        it holds belongs to other groups now (its publishes are fenced). Start afresh."""
        log.error("group %s was failed over while unresponsive: dropping %d moved requests, registering again",
                  self.name, len(self.held))
        self._drop_all()
        self.register()

    def _drop_all(self) -> None:
        for rid in list(self._running):
            self.engine.abort(rid)
        self.holding.clear()
        self.publisher.clear()
        self.isolation.clear()

    # --- one iteration ---------------------------------------------------------------------------

    def tick(self) -> None:
        self._read_inputs()
        for held in self.holding.expired(self.clock.now_ms()):
            self._finish_error(held, "timeout", f"deadline of {held.request.timeout_s}s passed")
        self._fill_engine()
        self._step_engine()
        self._publish()
        if not self.held and not self.engine.has_work():
            self._flush_acks()  # going idle: no next read soon to carry them
        self.heartbeat()

    def _read_inputs(self) -> None:
        batch = Batch()
        acks = self.publisher.queue_acks(batch)
        room = min(READ_CHUNK, self.settings.group_max_requests - len(self.held))
        read_queue = not self.draining and room > 0
        idle = not self.held and not self.engine.has_work()
        if read_queue:
            # Idle: block until work arrives, but wake for the next heartbeat.
            until_heartbeat_ms = int((self._next_heartbeat - self._monotonic()) * 1000)
            block = max(1, min(self.settings.worker_block_ms, until_heartbeat_ms)) if idle else None
            batch.xreadgroup(QUEUE_GROUP, CONSUMER, {self.keys.group_queue(self.name): ">"}, count=room, block=block)
        batch.xread({self.keys.cancel: self._cancel_cursor}, count=1000)
        results = self.scripts.wire.execute(batch)
        ack_result, results = (results[0], results[1:]) if acks else (None, results)
        for raw in results:
            if isinstance(raw, Exception):
                raise raw
        for _stream, entries in results[-1] or []:
            for entry_id, fields in entries:
                self._cancel_cursor = entry_id
                self._cancel(fields, entry_id)
        if read_queue:
            for _stream, entries in results[0] or []:
                for entry_id, fields in entries:
                    self._admit_safely(entry_id, fields)
        if isinstance(ack_result, NoScriptError):
            self.scripts.load()  # Redis restarted: the acknowledgements go again with the next read
        elif isinstance(ack_result, Exception):
            raise ack_result
        else:
            del self.publisher.to_ack[:acks]

    def _admit(self, entry_id: bytes, fields: dict[bytes, bytes]) -> None:
        try:
            request = GenerationRequest.from_wire(fields[b"r"])
            epoch = int(fields[b"e"])
            cost = int(fields.get(b"c", b"0"))
        except Exception as exc:  # a malformed queue entry is a bug upstream: never crash on it
            log.exception("malformed queue entry %s", entry_id)
            self._give_up_entry(entry_id, fields, f"malformed queue entry ({type(exc).__name__})")
            return
        if request.id in self.held:
            old = self.held[request.id]
            if old.entry_id == entry_id:
                return
            if old.epoch >= epoch:
                self._ack([entry_id])
                return
            self._stop(old)
            self._forget(old)
            self._ack([old.entry_id])
        held = Held(entry_id=entry_id, request=request, epoch=epoch, cost=cost)
        self.holding.add(held)
        info = self.engine.info
        try:
            held.prompt_ids = (list(request.prompt_ids) if request.prompt_ids is not None
                               else self.engine.tokenizer.encode(request.prompt or ""))
            held.output = OutputState(sampling=request.sampling, prompt_ids=held.prompt_ids,
                                      tokenizer=self.engine.tokenizer, eos_token_ids=info.eos_token_ids,
                                      max_context=info.max_context)
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
        if request.output_ids and not self._replay(held):
            return
        now_ms = self.clock.now_ms()
        if self._cancelled.matches(request.id, request.cancel_token):
            self._finish(held, "cancelled")
        elif request.deadline_ms is not None and now_ms >= request.deadline_ms:
            self._finish_error(held, "timeout", f"deadline of {request.timeout_s}s passed")
        else:
            self.holding.queue(held)

    def _replay(self, held: Held) -> bool:
        """Feed the tokens another group published into the output state, writing nothing: the
        next token gets the next index and the text deltas go on where the client's stream stops.
        False when the request ended (it should have ended with them already)."""
        output = held.output
        assert output is not None
        try:
            for token_id in held.request.output_ids:
                output.push(token_id)
                if output.finished:
                    break
        except Exception as exc:
            log.exception("request %s: cannot continue from its published tokens", held.request.id)
            self._finish_error(held, "internal", f"cannot continue a moved request ({type(exc).__name__})")
            return False
        if output.finish_reason is not None:
            self._finish(held, output.finish_reason)
            return False
        return True

    def _cancel(self, fields: dict[bytes, bytes], entry_id: bytes | None = None) -> None:
        """One cancel entry: the request it names ends, if the entry is its owner's (broker.cancellation)."""
        now_ms = self.clock.now_ms()
        got = self._cancelled.add(fields, now_ms, entry_id=entry_id)
        if got is not None:
            rid, token = got
            held = self.held.get(rid)
            if held is not None and not held.final and applies(held.request.cancel_token, token):
                self._finish(held, "cancelled")
        self._cancelled.prune(now_ms)

    def _fill_engine(self) -> None:
        """Queued requests into the engine by (priority, arrival), up to worker_max_batch running."""
        if self.isolation.active:
            if self._running:
                return  # a suspect is stepping alone
            while self.isolation.active and not self._running:
                suspect = self.isolation.next_suspect()
                if suspect is not None:
                    self._start(suspect)
            if self.isolation.active:
                return
        while len(self._running) < self.settings.worker_max_batch:
            held = self.holding.next_queued()
            if held is None:
                return
            self._start(held)

    def _start(self, held: Held) -> None:
        assert held.output is not None
        request = held.request
        try:
            deadline = request.deadline_ms / 1000 if request.deadline_ms is not None else None
            self.engine.add(EngineRequest(request.id, held.prompt_ids, request.sampling, priority=request.priority,
                                          deadline=deadline, output_ids=list(held.output.token_ids)))
        except Exception as exc:
            log.exception("request %s: the engine refused it", request.id)
            self._finish_error(held, "internal", f"the engine failed on this request ({type(exc).__name__})")
            return
        self.holding.started(held)
        if held.started_ms is None:
            held.started_ms = self.clock.now_ms()

    def _step_engine(self) -> None:
        if not self.engine.has_work():
            return
        started = self._monotonic()
        self.keepalive.step_started()
        try:
            outputs = self.engine.step()
        except EngineFailed:
            raise  # the engine can never step again (a rank died): the whole group stops
        except Exception:
            log.exception("engine step failed with %d requests running", len(self._running))
            self._step_failed()
            return
        finally:
            self.keepalive.step_ended()
        self.meter.step(self._monotonic() - started, len(outputs))
        self.telemetry.step(outputs)
        for out in outputs:
            held = self.held.get(out.request_id)
            if held is None or held.final or held.output is None:
                continue
            try:
                result = held.output.push(out.token_id, engine_finish=out.finish_reason, logprobs=out.logprobs)
            except Exception as exc:
                log.exception("request %s: cannot process token %r", held.request.id, out.token_id)
                self._finish_error(held, "internal", f"output processing failed ({type(exc).__name__})")
                continue
            if held.first_token_ms is None:
                held.first_token_ms = self.clock.now_ms()
            if held.request.stream:
                self._emit(held, ("t", result.index, token_event(held.request.id, result.index, result.token_id,
                                                                 result.text, result.logprobs)))
            if result.finish_reason is not None:
                if out.finish_reason is not None:  # the engine has let go of it already
                    self.holding.stopped(held)
                self._finish(held, result.finish_reason)
        if self.isolation.active:
            # The suspect stepped alone without failing: cleared; it runs with the others afterwards.
            for rid in list(self._running):
                self._stop(self.held[rid])
                self.isolation.passed(self.held[rid])

    def _step_failed(self) -> None:
        """The engine raised in a step: find the request it raised on (gpu_workers.isolation)."""
        running = [self.held[rid] for rid in self._running]
        for held in running:
            self._stop(held)
        blamed = self.isolation.failed(running)
        if blamed is not None:
            self._finish_error(blamed, "internal", "the engine failed while generating this request")
        else:
            log.warning("isolating the request that broke the engine among %d", len(running))

    def _stop(self, held: Held) -> None:
        """Take a request out of the engine (its KV blocks are freed now)."""
        if held.running:
            self.engine.abort(held.request.id)
            self.holding.stopped(held)

    def _emit(self, held: Held, event: Event) -> None:
        self.publisher.emit(held, event)

    def _finish(self, held: Held, finish_reason: str) -> None:
        self._stop(held)
        out = held.output
        assert out is not None
        self._emit(held, ("f", 0, done_event(
            held.request.id, text=out.text, token_ids=out.token_ids,
            finish_reason=finish_reason,  # type: ignore[arg-type]
            prompt_tokens=out.prompt_len, logprobs=out.logprobs,
            served=held.served(model=held.request.model or self.served_models[0], group=self.name,
                               now_ms=self.clock.now_ms()),
        )))
        held.final = True
        self.telemetry.finished(held.request.id, finish_reason, prompt_tokens=out.prompt_len,
                                completion_tokens=len(out.token_ids))

    def _finish_error(self, held: Held, code: str, message: str) -> None:
        self._stop(held)
        self._emit(held, ("f", 0, error_event(held.request.id, code, message)))
        held.final = True
        self.telemetry.failed(held.request.id, code, message)

    def _publish(self) -> None:
        done: list[Held] = []
        for held, status in self.publisher.publish():
            if status == "error":
                self._undeliverable(held)
            if status in ("fenced", "final", "error"):
                # moved to another group, finished already (a re-delivered entry), or undeliverable
                self.fenced += status == "fenced"
                if status != "error":
                    self.telemetry.let_go(held.request.id, status)
                done.append(held)
            elif status == "gap":
                # Never expected (a new owner continues at the published index), but a request must not
                # end without its final event: say so once the tokens before the gap are written.
                log.error("request %s: token gap at publish; ending it", held.request.id,
                          extra=request_extra(held.request.id))
                held.final = False
                self._finish_error(held, "internal", "token index gap at publish")
            elif held.final:
                self.completed += 1
                done.append(held)
        for held in done:
            self._stop(held)
            self._forget(held)
        self._ack([h.entry_id for h in done])

    def _forget(self, held: Held) -> None:
        self.holding.forget(held)
        self.publisher.discard(held)

    def _ack(self, entry_ids: list[bytes]) -> None:
        """Acknowledge (and delete) queue entries with the next read: one round trip less per step."""
        self.publisher.to_ack.extend(entry_ids)

    def _flush_acks(self) -> None:
        self.publisher.flush_acks()

    # --- heartbeat -------------------------------------------------------------------------------

    def load(self) -> GroupLoad:
        now = self._monotonic()
        state = "draining" if self.draining else "starting" if self._starting else "ready"
        load = group_load(self.name, self.engine, self.holding, self.meter, now=now, state=state,
                          queue_depth=self._queue_depth, completed=self.completed, fenced=self.fenced,
                          metrics_port=self.telemetry.port, served_models=self.served_models,
                          weights=self.weights, chat_template=self.chat_template)
        self.meter.reset(now)
        return load

    def heartbeat(self, *, force: bool = False) -> None:
        now = self._monotonic()
        if not force and now < self._next_heartbeat:
            return
        self._next_heartbeat = now + self.settings.heartbeat_interval_s
        if self.engine.info.chat_template and now >= self._next_template_publish:
            # again now and then: a Redis restarted without persistence lost it (the heartbeat is rewritten)
            publish_template(self.redis, self.keys, self.engine.info.chat_template)
            self._next_template_publish = now + TEMPLATE_REPUBLISH_S
        queued = self.redis.xlen(self.keys.group_queue(self.name))
        self._queue_depth = max(0, queued - len(self._running))
        load = self.load()
        self._heartbeat_fields = load.to_fields()
        self.scripts.heartbeat(registry=self.keys.groups, info=self.keys.group_info(self.name), group=self.name,
                               fields=self._heartbeat_fields)
        self.telemetry.heartbeat(load, self.engine.stats(), held=self.held)

    def _repeat_heartbeat(self) -> None:
        """The last heartbeat again, freshly stamped (from the keepalive thread, during a long step)."""
        fields = self._heartbeat_fields
        if fields is not None:
            self.scripts.heartbeat(registry=self.keys.groups, info=self.keys.group_info(self.name), group=self.name,
                                   fields=fields)

    # --- draining --------------------------------------------------------------------------------

    def _close_queue(self) -> None:
        """Take no more work (balancers see the group closed atomically at dispatch); hand back at once
        what has not started, here or in the engine: another group can start it sooner than this one
        finishes."""
        self.redis.delete(self.keys.group_accepting(self.name))
        self.heartbeat(force=True)
        unstarted = [self.held[rid] for rid in self.engine.not_started() if rid in self.held]
        for held in unstarted:
            self._stop(held)
        waiting = self.holding.waiting()
        for held in waiting:
            self._hand_back(held.request, held.epoch, held.entry_id)
            self._forget(held)
        self._flush_acks()
        log.info("group %s draining: finishing %d running requests, handed back %d", self.name,
                 len(self._running), len(waiting))

    def _hand_back_all(self) -> None:
        """Put every request still held, or still queued, back on the ingress stream."""
        queue = self.keys.group_queue(self.name)
        for held in self.holding.values():
            self._stop(held)
            self._hand_back(held.request, held.epoch, held.entry_id)
        self.holding.clear()
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
        self._flush_acks()

    def _hand_back(self, request: GenerationRequest, epoch: int, entry_id: bytes) -> None:
        # XADD first, then ack: a crash in between leaves a duplicate entry, which CLAIM_OWNER's
        # epoch check and the dispatch marker make harmless; the reverse order could lose it.
        self.redis.xadd(self.keys.requests, request.to_ingress(from_owner=self.name, epoch=epoch))
        self._ack([entry_id])
        self.telemetry.let_go(request.id, "handed_back")
        log.info("handed back request %s", request.id, extra=request_extra(request.id, group=self.name))
