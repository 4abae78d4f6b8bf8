"""The worker group's leader loop: queue in, engine steps, events out, heartbeats.

One iteration (``tick``): read new requests from the group queue (blocking only when idle) and
cancellations, end what was cancelled or timed out, move queued requests into the engine (by
priority, up to ``worker_max_batch``), step the engine once, publish every event of the step in one
pipeline, and acknowledge a queue entry only once its final event is written. Publishing goes
through the PUBLISH script, which fences by owner and epoch and drops duplicate token indices, so
re-processing an entry after a crash can never duplicate or fork what a client has seen.

The parts: the queue consumer (broker.consumer: reads, cancels, acknowledgements, the retry loop),
admission of queue entries (gpu_workers.intake), the work on the engine (gpu_workers.steps), what
the group holds (gpu_workers.holding). This module is the loop, the group's lifecycle
(``GroupState``) and its heartbeat.
"""

from __future__ import annotations

import enum
import logging
import os
import socket
import time
from collections.abc import Callable

from redis import Redis
from redis.exceptions import ResponseError

from broker.cancellation import Cancel, applies
from broker.chat import publish_template, template_digest
from broker.connection import TRANSIENT_ERRORS, RedisClock, server_time
from broker.consumer import Next, StreamConsumer, serve
from broker.dead_letter import DeadLetters
from broker.errors import EngineFailed
from broker.keys import QUEUE_GROUP, Keys
from broker.logs import request_extra
from broker.lua import queue_entry
from broker.protocol import GenerationRequest
from broker.registry import GroupLoad
from broker.scripts import Scripts
from broker.settings import Settings
from broker.signing import SigningKey
from broker.sources import tenant_cancels
from broker.tokenizers import publish_tokenizer, tokenizer_digest
from broker.wire import Batch
from gpu_workers.engine import Engine
from gpu_workers.hf_tokenizer import tokenizer_spec
from gpu_workers.holding import Held, Holding
from gpu_workers.intake import CONSUMER, QueueIntake
from gpu_workers.isolation import Isolation
from gpu_workers.keepalive import StepKeepalive
from gpu_workers.load import LoadMeter, group_load
from gpu_workers.publisher import Publisher
from gpu_workers.served import default_served_name
from gpu_workers.steps import EngineSteps
from gpu_workers.telemetry import GroupTelemetry

__all__ = ["CONSUMER", "GroupState", "WorkerGroup"]

log = logging.getLogger(__name__)

READ_CHUNK = 512  # most queue entries read at once
TEMPLATE_REPUBLISH_S = 30.0  # how often the chat template is written again (broker.chat)


class GroupState(enum.IntEnum):
    """Where a group is in its life (as rq's WorkerStatus), in order: it only moves on, except that a
    group failed over while it stalled starts again (``register``). Signals move it: the first
    drains, the second hands back, the third stops."""

    STARTING = 0  # registering and recovering its queue: alive, not routable yet
    READY = 1  # taking work
    DRAINING = 2  # takes no more work; finishes what runs (up to drain_timeout_s), hands back the rest
    HANDING_BACK = 3  # hands back everything it holds at once, then deregisters
    STOPPING = 4  # leaves at once; what it holds stays in Redis, where balancers fail it over

    @property
    def heartbeat(self) -> str:
        """The state its heartbeat shows (broker.registry)."""
        return "starting" if self is GroupState.STARTING else "ready" if self is GroupState.READY else "draining"


class WorkerGroup(QueueIntake, EngineSteps):
    def __init__(
        self,
        redis: Redis,
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
        self._tokenizer_spec = tokenizer_spec(engine.tokenizer)  # published with the template
        self.tokenizer_digest = tokenizer_digest(self._tokenizer_spec) if self._tokenizer_spec else ""
        self.settings = settings
        self.keys = Keys(settings.prefix)
        self.name = name or f"{socket.gethostname()}-{os.getpid()}"
        self.state = GroupState.READY
        self.scripts = Scripts(redis)
        self.clock = RedisClock(lambda: server_time(redis, self.keys.groups))
        self._monotonic = monotonic
        self.queue = StreamConsumer(
            redis, self.scripts, stream=self.keys.group_queue(self.name), group=QUEUE_GROUP, consumer=CONSUMER,
            cancel_stream=self.keys.cancel, cancel_horizon_ms=int(settings.cancel_horizon_s * 1000),
            clock=self.clock, ack=self._write_acks)
        self.signing = SigningKey(redis, self.keys, monotonic=monotonic)  # queue entries' and hand-backs' key
        self.holding = Holding()
        self.held: dict[str, Held] = self.holding.held  # request id -> what the group holds of it
        self.completed = 0
        self.fenced = 0
        self.meter = LoadMeter(window_start=monotonic())
        self.publisher = Publisher(self.scripts, self.keys, group=self.name, ttl_ms=settings.result_ttl_s * 1000)
        self.isolation = Isolation(self.holding)  # after an engine step raised: one request at a time
        self.telemetry = GroupTelemetry(
            self.name, enabled=settings.metrics_port is not None, now_ms=lambda: self.clock.now_ms(),
            log_prompts=settings.log_prompts, ready_within_s=settings.dead_after_s,
            live_within_s=settings.liveness_timeout_s, stats_log_interval_s=settings.stats_log_interval_s,
            model_name=self.served_models[0], monotonic=monotonic)  # vLLM's label: the served name
        self.dead_letters = DeadLetters(redis, self.scripts, self.keys, publisher=self.name,
                                        ttl_ms=settings.result_ttl_s * 1000, on_dead=self.telemetry.dead_lettered)
        self.keepalive = StepKeepalive(self._repeat_heartbeat, interval_s=settings.heartbeat_interval_s,
                                       max_step_s=settings.liveness_timeout_s, monotonic=monotonic,
                                       probe=self.telemetry.probe)
        # the heartbeat's own: when the next is due, and the last one's fields (keepalive repeats them)
        self._next_heartbeat = 0.0
        self._next_template_publish = 0.0
        self._heartbeat_fields: list[str] | None = None
        self._queue_depth = 0

    # --- lifecycle -------------------------------------------------------------------------------

    def register(self) -> None:
        if self.state < GroupState.DRAINING:
            self.state = GroupState.STARTING
        self.heartbeat(force=True)  # alive but not routable yet: nobody fails it over or routes to it
        self.queue.create_group()
        self._recover(starting=True)
        self.redis.set(self.keys.group_accepting(self.name), "1")
        if self.state is GroupState.STARTING:
            self.state = GroupState.READY
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
        redo: list[Callable[[], None]] = []  # done first in the next iteration (where errors are retried)
        drain_deadline: float | None = None
        left_to_failover = False

        def iteration() -> bool:
            nonlocal drain_deadline
            while redo:
                redo[0]()
                redo.pop(0)
            if self.state >= GroupState.DRAINING and drain_deadline is None:
                drain_deadline = self._monotonic() + self.settings.drain_timeout_s
                self._close_queue()
            if drain_deadline is not None and (not self.held or self.state >= GroupState.HANDING_BACK
                                               or self._monotonic() >= drain_deadline):
                self._hand_back_all()
                return False
            self.tick()
            return True

        def on_lost(exc: BaseException) -> Next:
            nonlocal left_to_failover
            if self.state >= GroupState.DRAINING:
                # Asked to stop and Redis is gone (under honcho or systemd it may have stopped first):
                # nothing held was acknowledged, so it all stays pending in Redis, where a restart of
                # this group recovers it or balancers fail it over. One signal is enough.
                log.warning("redis unreachable while draining (%s); stopping: %d held requests stay "
                            "in Redis for failover", exc, len(self.held))
                left_to_failover = True
                return Next.LEAVE
            if not redo:  # (a pending rejoin recovers too)
                redo.append(self._recover)
            return Next.BACKOFF

        def on_nogroup(_exc: ResponseError) -> Next:
            if self.state >= GroupState.DRAINING:
                log.error("group %s was failed over while draining; nothing left to hand back", self.name)
                self._drop_all()
                return Next.LEAVE
            redo[:] = [self._rejoin]  # registers again, which recovers too
            return Next.RETRY

        serve(iteration, settings=self.settings, what="group", wait=time.sleep, on_lost=on_lost,
              on_nogroup=on_nogroup, stopped=lambda: self.state is GroupState.STOPPING, passthrough=(EngineFailed,))
        if left_to_failover:
            self.engine.close()
        elif self.state is GroupState.STOPPING:
            log.warning("group %s stopping now: %d held requests stay in Redis for failover",
                        self.name, len(self.held))
            self.engine.close()
        else:
            self.deregister()
        return 0

    def drain(self) -> None:
        """Stop taking work; hand back what has not started (queued here or waiting in the engine),
        finish the rest (up to drain_timeout_s), hand back what is left. A second call hands back at
        once; a third stops at once."""
        if self.state >= GroupState.HANDING_BACK:
            self.state = GroupState.STOPPING
        elif self.state is GroupState.DRAINING:
            self.state = GroupState.HANDING_BACK
        else:
            self.state = GroupState.DRAINING

    def deregister(self) -> None:
        try:
            self.queue.flush_acks()
            pipe = self.redis.pipeline(transaction=False)
            pipe.zrem(self.keys.groups, self.name)
            pipe.delete(self.keys.group_info(self.name))  # one key per DEL: the two are in different slots
            pipe.delete(self.keys.group_accepting(self.name))
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
        for held in self.holding.values():
            if held.running:
                for engine_request_id in held.engine_ids():
                    self.engine.abort(engine_request_id)
        self.holding.clear()
        self.publisher.clear()
        self.queue.drop_acks()
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
        room = min(READ_CHUNK, self.settings.group_max_requests - len(self.held))
        read_queue = self.state < GroupState.DRAINING and room > 0
        idle = not self.held and not self.engine.has_work()
        # Idle: block until work arrives, but wake for the next heartbeat.
        until_heartbeat_ms = int((self._next_heartbeat - self._monotonic()) * 1000)
        block = max(1, min(self.settings.worker_block_ms, until_heartbeat_ms)) if idle else None

        def build(batch: Batch) -> int | None:
            if not read_queue:
                return None
            return batch.xreadgroup(QUEUE_GROUP, CONSUMER, {self.queue.stream: ">"}, count=room, block=block)

        got = self.queue.read(build)
        for cancel in got.cancels:
            self._cancel(cancel)
        if read_queue:
            for _stream, entries in got.replies[0] or []:
                for entry_id, fields in entries:
                    self._admit_safely(entry_id, fields)
        got.check()

    def _cancel(self, cancel: Cancel) -> None:
        """A cancel entry read: the request it names ends, if the entry is its owner's (broker.cancellation)."""
        held = self.held.get(cancel.request_id)
        if held is not None and not held.final and applies(held.request.cancel_token, cancel.token,
                                                           tenant=held.request.tenant, cancel_tenant=cancel.tenant):
            self._finish(held, "cancelled")

    def _write_acks(self, batch: Batch, _queue: str, entry_ids: list[bytes]) -> None:
        """Acknowledge (and delete) finished queue entries, taking their cost off the token counter (ACK)."""
        self.scripts.ack(queue=self.queue.stream, queue_tokens=self.keys.group_queue_tokens(self.name),
                         consumer_group=QUEUE_GROUP, entry_ids=entry_ids, client=batch)

    def _flush_acks(self) -> None:
        self.queue.flush_acks()

    # --- heartbeat -------------------------------------------------------------------------------

    def load(self) -> GroupLoad:
        now = self._monotonic()
        load = group_load(self.name, self.engine, self.holding, self.meter, now=now, state=self.state.heartbeat,
                          queue_depth=self._queue_depth, completed=self.completed, fenced=self.fenced,
                          metrics_port=self.telemetry.port, served_models=self.served_models,
                          weights=self.weights, chat_template=self.chat_template,
                          tokenizer=self.tokenizer_digest)
        self.meter.reset(now)
        return load

    def heartbeat(self, *, force: bool = False) -> None:
        now = self._monotonic()
        if not force and now < self._next_heartbeat:
            return
        self._next_heartbeat = now + self.settings.heartbeat_interval_s
        if now >= self._next_template_publish:
            # again now and then: a Redis restarted without persistence lost them (the heartbeat is rewritten)
            if self.engine.info.chat_template:
                publish_template(self.redis, self.keys, self.engine.info.chat_template)
            if self._tokenizer_spec:
                publish_tokenizer(self.redis, self.keys, self._tokenizer_spec)
            self._next_template_publish = now + TEMPLATE_REPUBLISH_S
        self.queue.set_streams([], tenant_cancels(self.redis, self.keys))  # tenants' cancels (broker.sources)
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
        not_started = set(self.engine.not_started())
        unstarted = [h for h in self.held.values() if h.running and not h.final
                     and all(eid in not_started for eid in h.engine_ids(unfinished=True))]
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
        for held in self.holding.values():
            self._stop(held)
            self._hand_back(held.request, held.epoch, held.entry_id)
        self.holding.clear()
        for entries in self.queue.new_entries(count=500):
            for entry_id, fields in entries:
                try:
                    entry = queue_entry(fields, signing=self.signing)
                except Exception:
                    log.exception("dropping malformed queue entry %s", entry_id)
                    self.queue.ack([entry_id])
                    continue
                self._hand_back(entry.request, entry.epoch, entry_id)
            self._flush_acks()
        self._flush_acks()

    def _hand_back(self, request: GenerationRequest, epoch: int, entry_id: bytes) -> None:
        # XADD first, then ack: a crash in between leaves a duplicate entry, which CLAIM_OWNER's
        # epoch check and the dispatch marker make harmless; the reverse order could lose it.
        signing_key = self.signing.get()  # signed: no client can forge a hand-back
        self.redis.xadd(self.keys.requests, request.to_ingress(from_owner=self.name, epoch=epoch,
                                                               signing_key=signing_key))
        self.queue.ack([entry_id])
        self.telemetry.let_go(request.id, "handed_back")
        log.info("handed back request %s", request.id, extra=request_extra(request.id, group=self.name))
