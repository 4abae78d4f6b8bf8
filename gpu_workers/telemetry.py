"""What a worker group's leader tells operators: Prometheus metrics, probe progress, request log lines.

The group loop calls the recording methods at the points where a request's life changes: admitted
from the queue, a token generated, finished (``done``) or failed (``error``), released to another
owner; and once per heartbeat with the group's load. Latencies are measured from the request's
enqueue time on the Redis clock (``GenerationRequest.enqueued_ms``), so queue time and time to first
token include the balancer, and a request moved to this group after a failover counts its whole wait.

With ``enabled=False`` (no ``--metrics-port``) nothing is recorded; the DEBUG log lines about
requests are written either way when DEBUG is on, with the prompt only when ``log_prompts`` is set.
"""

from __future__ import annotations

import logging
import time
from collections import Counter as Tally
from collections.abc import Callable, Container, Sequence
from dataclasses import dataclass

from prometheus_client import Counter, Gauge, Histogram

from broker.logs import prompt_extra, request_extra
from broker.metrics import (
    BATCH_BUCKETS,
    INTER_TOKEN_BUCKETS,
    LATENCY_BUCKETS,
    NAMESPACE,
    TOKEN_COUNT_BUCKETS,
    BatchHistogram,
    Probe,
    new_registry,
)
from broker.protocol import GenerationRequest
from broker.registry import GroupLoad
from gpu_workers.engine import EngineStats, StepOutput
from gpu_workers.stats_log import StatsLine

log = logging.getLogger("gpu_workers")


@dataclass(slots=True)
class _Timing:
    start_ms: float  # enqueue time on the Redis clock (admission time if unknown)
    admitted_ms: float  # when this group read it from its queue: prefill and inference time start here
    last_token_ms: float | None = None
    first_token_ms: float | None = None


class GroupTelemetry:
    def __init__(self, group: str, *, enabled: bool, now_ms: Callable[[], float], log_prompts: bool = False,
                 ready_within_s: float, live_within_s: float, stats_log_interval_s: float = 0.0,
                 model_name: str = "", monotonic: Callable[[], float] = time.monotonic) -> None:
        """``model_name``: the label vLLM's dashboards group by (the served model name); every group
        metric also carries ``group``."""
        self.group = group
        self.model_name = model_name
        self._ids = (group, model_name)  # the values of the labels every group metric starts with
        self._preemptions = self._prefix_queries = self._prefix_hits = 0  # engine totals, last heartbeat
        self.stats_line = StatsLine(interval_s=stats_log_interval_s, monotonic=monotonic)
        self.enabled = enabled
        self.log_prompts = log_prompts
        self.port: int | None = None  # of the metrics endpoint, once it serves; published in heartbeats
        self.registry = new_registry()
        self.probe = Probe(ready_within_s=ready_within_s, live_within_s=live_within_s, monotonic=monotonic)
        self._now_ms = now_ms
        self._timings: dict[str, _Timing] = {}
        self._info: tuple[str, ...] | None = None
        ns, reg, g = NAMESPACE, self.registry, ["group", "model_name"]

        def counter(name: str, doc: str, *labels: str) -> Counter:
            return Counter(name, doc, [*g, *labels], namespace=ns, registry=reg)

        def histogram(name: str, doc: str, buckets: Sequence[float]) -> Histogram:
            return Histogram(name, doc, g, namespace=ns, registry=reg, buckets=buckets)

        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(name, doc, g, namespace=ns, registry=reg)

        self.success = counter("request_success", "Requests finished with a done event, by finish reason "
                               "(stop, length, cancelled).", "finished_reason")
        self.failure = counter("request_failure", "Requests this group ended with an error event, by code.", "code")
        self.released = counter("requests_released", "Requests this group let go unfinished: handed_back "
                                "(drain), fenced (moved to another group), final (finished elsewhere), gap.",
                                "reason")
        self.dead_letters = counter("dead_letters", "Queue entries given up: moved to the {p}:dead stream.")
        self.prompt_tokens = counter("prompt_tokens", "Prompt tokens of admitted requests.")
        self.generation_tokens = counter("generation_tokens", "Tokens generated.")
        self.queue_time = histogram("request_queue_time_seconds",
                                    "From enqueue (ingress XADD) until this group admitted the request.",
                                    LATENCY_BUCKETS)
        self.ttft = histogram("time_to_first_token_seconds",
                              "From enqueue until the first generated token.", LATENCY_BUCKETS)
        self.itl = BatchHistogram("inter_token_latency_seconds", "Between two consecutive tokens of one request.",
                                  buckets=INTER_TOKEN_BUCKETS, labels={"group": group, "model_name": model_name},
                                  registry=reg)
        self.e2e = histogram("e2e_request_latency_seconds",
                             "From enqueue until the final event, for requests this group finished.",
                             LATENCY_BUCKETS)
        self.request_prompt_tokens = histogram("request_prompt_tokens", "Prompt length of finished requests.",
                                               TOKEN_COUNT_BUCKETS)
        self.request_generation_tokens = histogram("request_generation_tokens",
                                                   "Completion length of finished requests.", TOKEN_COUNT_BUCKETS)
        self.iteration_tokens = histogram("iteration_tokens",
                                          "Tokens generated per engine step (the decode batch size).",
                                          BATCH_BUCKETS)
        self.prefill_time = histogram("request_prefill_time_seconds",
                                      "From the group's admission of a request until its first token (its "
                                      "prefill, and any wait for KV blocks in the engine).", LATENCY_BUCKETS)
        self.decode_time = histogram("request_decode_time_seconds",
                                     "From a request's first token until its final event.", LATENCY_BUCKETS)
        self.inference_time = histogram("request_inference_time_seconds",
                                        "From the group's admission of a request until its final event "
                                        "(prefill + decode).", LATENCY_BUCKETS)
        self.preemptions = counter("num_preemptions", "Requests the engine preempted (its KV blocks freed, "
                                   "recomputed later) because the KV cache ran out of blocks.")
        self.prefix_queries = counter("prefix_cache_queries", "Prompt tokens looked up in the prefix cache.")
        self.prefix_hits = counter("prefix_cache_hits", "Prompt tokens found in the prefix cache (their KV "
                                   "blocks reused, not computed).")
        self.running = gauge("num_requests_running", "Requests the engine is generating for.")
        self.waiting = gauge("num_requests_waiting", "Requests admitted to the engine, not yet running.")
        self.queue_depth = gauge("group_queue_depth", "Entries on the group's queue not yet read.")
        self.kv_usage = gauge("kv_cache_usage_perc", "Fraction of the KV cache in use (0 to 1).")
        self.kv_capacity = gauge("kv_cache_capacity_tokens", "Tokens the KV cache holds at most.")
        self.prefix_hit_rate = gauge("prefix_cache_hit_rate",
                                     "Fraction of prompt tokens served from the prefix cache (engines that report it).")
        self.group_info = Gauge("group_info", "Always 1; the group's identity in labels.",
                                ["group", "model_name", "model", "tp", "kv_dtype"], namespace=ns, registry=reg)

    # --- requests --------------------------------------------------------------------------------

    def admitted(self, request: GenerationRequest, *, prompt_tokens: int) -> None:
        if log.isEnabledFor(logging.DEBUG):
            log.debug("request admitted: %d prompt tokens, max_tokens %d", prompt_tokens,
                      request.sampling.max_tokens,
                      extra=request_extra(request.id, group=self.group, **prompt_extra(
                          request.prompt, request.prompt_ids, log_prompts=self.log_prompts)))
        self.stats_line.prompt(prompt_tokens)
        if not self.enabled:
            return
        now = self._now_ms()
        start = float(request.enqueued_ms) if request.enqueued_ms > 0 else now
        self._timings[request.id] = _Timing(start, admitted_ms=now)
        self.queue_time.labels(*self._ids).observe(max(0.0, now - start) / 1000.0)
        self.prompt_tokens.labels(*self._ids).inc(prompt_tokens)

    def step(self, outputs: Sequence[StepOutput]) -> None:
        """One engine step produced ``outputs`` (one token per request at most)."""
        self.stats_line.generated(len(outputs))
        if not self.enabled or not outputs:
            return
        now, counted = self._now_ms(), 0
        ttft = self.ttft.labels(*self._ids)
        gaps: Tally[float] = Tally()  # previous token time -> requests; mostly one: the last step
        for out in outputs:
            timing = self._timings.get(out.request_id)
            if timing is None:
                continue  # finished or let go already
            counted += 1
            if timing.last_token_ms is None:
                ttft.observe(max(0.0, now - timing.start_ms) / 1000.0)
                timing.first_token_ms = now
            else:
                gaps[timing.last_token_ms] += 1
            timing.last_token_ms = now
        for last, count in gaps.items():
            self.itl.observe(max(0.0, now - last) / 1000.0, count)
        self.iteration_tokens.labels(*self._ids).observe(len(outputs))
        self.generation_tokens.labels(*self._ids).inc(counted)

    def finished(self, request_id: str, finish_reason: str, *, prompt_tokens: int, completion_tokens: int) -> None:
        """The request's done event was produced."""
        timing = self._timings.pop(request_id, None)
        e2e_s = None if timing is None else max(0.0, self._now_ms() - timing.start_ms) / 1000.0
        if log.isEnabledFor(logging.DEBUG):
            log.debug("request finished: %s, %d prompt + %d completion tokens", finish_reason, prompt_tokens,
                      completion_tokens, extra=request_extra(request_id, group=self.group,
                                                             finish_reason=finish_reason, e2e_s=e2e_s))
        if not self.enabled:
            return
        self.success.labels(*self._ids, finish_reason).inc()
        self.request_prompt_tokens.labels(*self._ids).observe(prompt_tokens)
        self.request_generation_tokens.labels(*self._ids).observe(completion_tokens)
        if e2e_s is not None:
            self.e2e.labels(*self._ids).observe(e2e_s)
        if timing is not None:
            now = self._now_ms()
            self.inference_time.labels(*self._ids).observe(max(0.0, now - timing.admitted_ms) / 1000.0)
            if timing.first_token_ms is not None:
                self.prefill_time.labels(*self._ids).observe(
                    max(0.0, timing.first_token_ms - timing.admitted_ms) / 1000.0)
                self.decode_time.labels(*self._ids).observe(max(0.0, now - timing.first_token_ms) / 1000.0)

    def failed(self, request_id: str, code: str, message: str) -> None:
        """The request's error event was produced."""
        timing = self._timings.pop(request_id, None)
        if log.isEnabledFor(logging.DEBUG):
            log.debug("request failed: %s: %s", code, message,
                      extra=request_extra(request_id, group=self.group, code=code))
        if not self.enabled:
            return
        self.failure.labels(*self._ids, code).inc()
        if timing is not None:
            self.e2e.labels(*self._ids).observe(max(0.0, self._now_ms() - timing.start_ms) / 1000.0)

    def dead_lettered(self) -> None:
        """A queue entry went to the dead-letter stream (broker.dead_letter)."""
        if self.enabled:
            self.dead_letters.labels(self.group).inc()

    def let_go(self, request_id: str, reason: str) -> None:
        """The group stops working on a request it did not finish (``reason``: handed_back, fenced, ...)."""
        self._timings.pop(request_id, None)
        if self.enabled:
            self.released.labels(*self._ids, reason).inc()

    # --- load ------------------------------------------------------------------------------------

    def heartbeat(self, load: GroupLoad, stats: EngineStats, *, held: Container[str]) -> None:
        """A heartbeat was written just now: load gauges, and progress for the probes."""
        self.probe.progress(accepting=load.state == "ready")
        self.stats_line.heartbeat(load, stats)
        if not self.enabled:
            return
        for rid in [rid for rid in self._timings if rid not in held]:
            del self._timings[rid]  # let go on a path that did not report it
        g = self._ids
        self.running.labels(*g).set(load.running)
        self.waiting.labels(*g).set(load.waiting)
        self.queue_depth.labels(*g).set(load.queue_depth)
        self.kv_capacity.labels(*g).set(load.kv_capacity_tokens)
        self.kv_usage.labels(*g).set(load.kv_used_tokens / load.kv_capacity_tokens if load.kv_capacity_tokens > 0
                                     else 0.0)
        if stats.prefix_cache_hit_rate is not None:
            self.prefix_hit_rate.labels(*g).set(stats.prefix_cache_hit_rate)
        # the engine keeps totals since start; counters move by what changed since the last heartbeat
        for counter, total, attr in ((self.preemptions, stats.num_preemptions, "_preemptions"),
                                     (self.prefix_queries, stats.prefix_cache_queries, "_prefix_queries"),
                                     (self.prefix_hits, stats.prefix_cache_hits, "_prefix_hits")):
            counter.labels(*g).inc(max(0, total - getattr(self, attr)))
            setattr(self, attr, max(total, getattr(self, attr)))
        info = (*g, load.model, str(load.tp), load.kv_dtype)
        if info != self._info:
            if self._info is not None:
                self.group_info.remove(*self._info)
            self.group_info.labels(*info).set(1)
            self._info = info
