"""The group loop's work on the engine: start queued requests, step, turn tokens into events, end
requests, publish, and let go of what is done. Part of ``WorkerGroup`` (a mixin: the state it uses
is the group's, declared below).

A request ends exactly once (``_finish``/``_finish_error`` queue its final event); its queue entry
is acknowledged only once that event is written (``_publish``). Requests reach the engine as its
own types (gpu_workers.engine_mapping); one it can never run (``EngineRequestError``,
``RejectionReason.UNSERVABLE``) ends with ``invalid_request`` (the mapping's code for it). An engine that raises otherwise is never fatal: the request it raised on ends
with error ``internal`` (gpu_workers.isolation) and the rest goes on.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

from broker.consumer import StreamConsumer
from broker.errors import EngineFailed
from broker.events import choice_entry, done_event, error_event, token_event
from broker.logs import request_extra
from gpu_workers.engine import Engine, EngineRequest, RejectionReason
from gpu_workers.engine_mapping import engine_sampling, error_code
from gpu_workers.holding import Event, Held, Holding, engine_id, split_engine_id
from gpu_workers.isolation import Isolation
from gpu_workers.keepalive import StepKeepalive
from gpu_workers.load import LoadMeter
from gpu_workers.output import ranked_choices, render_prompt_logprobs
from gpu_workers.publisher import Publisher
from gpu_workers.sampling_params import EngineRequestError
from gpu_workers.telemetry import GroupTelemetry

if TYPE_CHECKING:
    from broker.connection import RedisClock
    from broker.settings import Settings

log = logging.getLogger("gpu_workers.group")


class EngineSteps:
    engine: Engine
    settings: Settings
    name: str
    served_models: list[str]
    clock: RedisClock
    holding: Holding
    held: dict[str, Held]
    isolation: Isolation
    publisher: Publisher
    queue: StreamConsumer
    telemetry: GroupTelemetry
    keepalive: StepKeepalive
    meter: LoadMeter
    completed: int
    fenced: int
    _monotonic: Callable[[], float]

    if TYPE_CHECKING:  # the WorkerGroup's own
        def _undeliverable(self, held: Held) -> None: ...

    @property
    def _running(self) -> set[str]:
        """Ids of the requests in the engine."""
        return self.holding.running

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
        deadline = request.deadline_ms / 1000 if request.deadline_ms is not None else None
        try:
            if not held.choices:
                self.engine.add(EngineRequest(request.id, held.prompt_ids, engine_sampling(request.sampling),
                                              priority=request.priority, deadline=deadline,
                                              output_ids=list(held.output.token_ids)))
            else:
                # One engine request per completion still generating; the first computes the prompt
                # (and its logprobs), the others share its blocks through the prefix cache.
                unfinished = [c for c, o in enumerate(held.choices) if not o.finished]
                leader = engine_id(request.id, unfinished[0])
                for c in unfinished:
                    self.engine.add(EngineRequest(
                        engine_id(request.id, c), held.prompt_ids,
                        engine_sampling(request.sampling.for_choice(c, leader=c == unfinished[0])),
                        priority=request.priority,
                        deadline=deadline, output_ids=list(held.choices[c].token_ids),
                        shares_prefix_with=None if c == unfinished[0] else leader))
        except EngineRequestError as exc:  # one the engine can never run (it could never fit its KV cache)
            for engine_request_id in held.engine_ids():
                self.engine.abort(engine_request_id)
            self._finish_error(held, error_code(RejectionReason.UNSERVABLE), str(exc))
            return
        except Exception as exc:
            log.exception("request %s: the engine refused it", request.id)
            for engine_request_id in held.engine_ids():
                self.engine.abort(engine_request_id)
            self._finish_error(held, error_code(RejectionReason.FAILED), f"the engine failed on this request ({type(exc).__name__})")
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
        for rejection in self.engine.rejected():  # dropped by the engine (a grammar that does not compile)
            # (a completion of several: the request ends with its error, the others are aborted)
            if (dropped := self.held.get(split_engine_id(rejection.request_id)[0])) is not None and not dropped.final:
                self._finish_error(dropped, error_code(rejection.reason), rejection.message)
        self.telemetry.step([out if split_engine_id(out.request_id)[1] is None else
                             dataclasses.replace(out, request_id=split_engine_id(out.request_id)[0])
                             for out in outputs])
        for out in outputs:
            request_id, choice = split_engine_id(out.request_id)
            held = self.held.get(request_id)
            if held is None or held.final or held.output is None:
                continue
            output = held.output if choice is None else held.choices[choice]
            if output.finished:
                continue
            try:
                result = output.push(out.token_id, engine_finish=out.finish_reason, logprobs=out.logprobs)
                if out.prompt_logprobs is not None:
                    held.prompt_logprobs = render_prompt_logprobs(self.engine.tokenizer, held.prompt_ids,
                                                                  out.prompt_logprobs)
            except Exception as exc:
                log.exception("request %s: cannot process token %r", held.request.id, out.token_id)
                self._finish_error(held, "internal", f"output processing failed ({type(exc).__name__})")
                continue
            if held.first_token_ms is None:
                held.first_token_ms = self.clock.now_ms()
            if held.request.stream:
                event = token_event(held.request.id, result.index, result.token_id, result.text, result.logprobs,
                                    choice=choice, finish_reason=result.finish_reason if held.choices else None)
                self._emit(held, ("t", result.index, event))
            if result.finish_reason is None:
                continue
            if choice is not None:
                if out.finish_reason is None:  # a stop string or a limit: the engine still runs it
                    self.engine.abort(out.request_id)
                if not all(o.finished for o in held.choices):
                    continue  # the request ends with its last completion
            if out.finish_reason is not None or choice is not None:  # the engine has let go of it already
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
            for engine_request_id in held.engine_ids():
                self.engine.abort(engine_request_id)
            self.holding.stopped(held)

    def _emit(self, held: Held, event: Event) -> None:
        self.publisher.emit(held, event)

    def _finish(self, held: Held, finish_reason: str) -> None:
        self._stop(held)
        out = held.output
        assert out is not None
        choices = None
        if held.choices:
            # Several completions: the done event carries them all (the request's one final event),
            # ``text`` and the like repeat the first; those still going end with this reason.
            for o in held.choices:
                o.end(finish_reason)
            returned = ranked_choices(held.choices, held.request.sampling.n)
            choices = [choice_entry(i, text=o.text, token_ids=o.token_ids, finish_reason=o.finish_reason or finish_reason,
                                    logprobs=o.logprobs, cumulative_logprob=o.cumulative_logprob)
                       for i, o in enumerate(returned)]
            out = returned[0]
            finish_reason = finish_reason if finish_reason == "cancelled" else out.finish_reason or finish_reason
        event = done_event(
            held.request.id, text=out.text, token_ids=out.token_ids,
            finish_reason=finish_reason,  # type: ignore[arg-type]
            prompt_tokens=out.prompt_len, logprobs=out.logprobs,
            served=held.served(model=held.request.model or self.served_models[0], group=self.name,
                               now_ms=self.clock.now_ms()),
            choices=choices, prompt_logprobs=held.prompt_logprobs,
        )
        self._emit(held, ("f", 0, event))
        held.final = True
        self.telemetry.finished(held.request.id, finish_reason, prompt_tokens=out.prompt_len,
                                completion_tokens=int(event["completion_tokens"]))

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
        self.queue.ack([h.entry_id for h in done])

    def _forget(self, held: Held) -> None:
        self.holding.forget(held)
        self.publisher.discard(held)
