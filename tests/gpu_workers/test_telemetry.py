"""A worker group's metrics and request log lines, driven tick by tick with the Redis clock passed in."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import pytest
import redis

from broker.keys import Keys
from broker.registry import read_groups
from broker.settings import Settings
from gpu_workers.echo import EchoEngine
from gpu_workers.group import WorkerGroup
from tests.gpu_workers.helpers import (
    FakeClock,
    FakeMonotonic,
    enqueue,
    events,
    finals,
    make_request,
    run_until,
    take_over,
)

T0 = 1_700_000_000_000
MakeGroup = Callable[..., WorkerGroup]


@pytest.fixture
def make_group(r: redis.Redis, redis_url: str, prefix: str, mono: FakeMonotonic) -> MakeGroup:
    def make(name: str = "g1", *, metrics: bool = True, **overrides: Any) -> WorkerGroup:
        settings = Settings(redis_url=redis_url, prefix=prefix, worker_block_ms=1,
                            metrics_port=0 if metrics else None, **overrides)
        group = WorkerGroup(r, EchoEngine(), settings=settings, name=name, monotonic=mono)
        group.clock = FakeClock(T0 + 250)  # type: ignore[assignment]
        group.register()
        return group

    return make


def sample(group: WorkerGroup, name: str, **labels: str) -> float | None:
    return group.telemetry.registry.get_sample_value(
        name, {"group": group.name, "model_name": group.telemetry.model_name, **labels})


def tick(group: WorkerGroup, *, after_ms: float = 0.0) -> None:
    group.clock.ms += after_ms  # type: ignore[attr-defined]
    group.tick()


def test_latencies_counts_and_outcomes_follow_the_requests(
        r: redis.Redis, keys: Keys, make_group: MakeGroup) -> None:
    group = make_group()
    enqueue(r, keys, "g1", make_request(keys, "a", "abc", enqueued_ms=T0))  # 3 tokens, ends with stop
    enqueue(r, keys, "g1", make_request(keys, "b", "abcdefgh", max_tokens=2, enqueued_ms=T0))  # length
    enqueue(r, keys, "g1", make_request(keys, "bad", prompt_ids=[1, 300], enqueued_ms=T0))  # outside vocab

    tick(group)  # admitted 250 ms after enqueue; first tokens of a and b in the same step
    tick(group, after_ms=100)  # second tokens; b reaches max_tokens
    tick(group, after_ms=100)  # a's last token
    run_until(group.tick, lambda: not group.held)

    assert sample(group, "ryz_request_queue_time_seconds_count") == 3
    assert sample(group, "ryz_request_queue_time_seconds_sum") == pytest.approx(0.75)
    assert sample(group, "ryz_time_to_first_token_seconds_count") == 2
    assert sample(group, "ryz_time_to_first_token_seconds_sum") == pytest.approx(0.5)
    assert sample(group, "ryz_inter_token_latency_seconds_count") == 3
    assert sample(group, "ryz_inter_token_latency_seconds_sum") == pytest.approx(0.3)
    assert sample(group, "ryz_e2e_request_latency_seconds_count") == 3
    assert sample(group, "ryz_e2e_request_latency_seconds_sum") == pytest.approx(0.25 + 0.35 + 0.45)
    # from admission (T0 + 250): both first tokens in that tick; b ends 100 ms later, a 200 ms later
    assert sample(group, "ryz_request_prefill_time_seconds_count") == 2
    assert sample(group, "ryz_request_prefill_time_seconds_sum") == pytest.approx(0.0)
    assert sample(group, "ryz_request_decode_time_seconds_sum") == pytest.approx(0.1 + 0.2)
    assert sample(group, "ryz_request_inference_time_seconds_count") == 2
    assert sample(group, "ryz_request_inference_time_seconds_sum") == pytest.approx(0.1 + 0.2)
    assert sample(group, "ryz_request_success_total", finished_reason="stop") == 1
    assert sample(group, "ryz_request_success_total", finished_reason="length") == 1
    assert sample(group, "ryz_request_failure_total", code="invalid_request") == 1
    assert sample(group, "ryz_prompt_tokens_total") == 3 + 8 + 2
    assert sample(group, "ryz_generation_tokens_total") == 5
    assert sample(group, "ryz_request_generation_tokens_sum") == 5
    assert sample(group, "ryz_iteration_tokens_count") == 3
    assert sample(group, "ryz_iteration_tokens_sum") == 5
    assert sample(group, "ryz_iteration_tokens_bucket", le="1.0") == 1  # the last step had one request
    assert [f["event"] for s in ("a", "b", "bad") for f in finals(events(r, keys.result(s)))] == [
        "done", "done", "error"]


def test_heartbeat_sets_load_gauges_and_readiness(
        r: redis.Redis, keys: Keys, make_group: MakeGroup, mono: FakeMonotonic) -> None:
    group = make_group()
    enqueue(r, keys, "g1", make_request(keys, "a", "abcdef"))
    enqueue(r, keys, "g1", make_request(keys, "b", "abcdef"))
    tick(group)
    group.heartbeat(force=True)

    assert sample(group, "ryz_num_requests_running") == 2
    assert sample(group, "ryz_num_requests_waiting") == 0
    assert sample(group, "ryz_kv_cache_usage_perc") == 0.0  # echo has no KV cache
    assert sample(group, "ryz_prefix_cache_hit_rate") is None  # nor a prefix cache: not reported
    assert group.telemetry.registry.get_sample_value(
        "ryz_group_info", {"group": "g1", "model_name": "echo", "model": "echo", "tp": "1", "kv_dtype": "none"}) == 1
    assert group.telemetry.probe.check().ready
    mono.advance(group.settings.dead_after_s + 0.5)  # no heartbeat since: balancers would give it up
    assert not group.telemetry.probe.check().ready and group.telemetry.probe.check().live

    run_until(group.tick, lambda: not group.held)
    group.heartbeat(force=True)
    assert sample(group, "ryz_num_requests_running") == 0
    group.drain()
    group.heartbeat(force=True)
    assert group.telemetry.probe.check().reason == "draining"


def test_requests_let_go_are_counted_by_reason(
        r: redis.Redis, keys: Keys, make_group: MakeGroup) -> None:
    group = make_group(worker_max_batch=1)
    moved = make_request(keys, "moved", "a long prompt to be moved")
    epoch = enqueue(r, keys, "g1", moved)
    enqueue(r, keys, "g1", make_request(keys, "queued", "waits in the queue"))
    tick(group)
    take_over(r, keys, moved, to="g2", frm="g1", epoch=epoch)
    tick(group)  # the next publish is fenced
    assert sample(group, "ryz_requests_released_total", reason="fenced") == 1
    group.drain()
    group.drain()
    group.run()  # hands "queued" back
    assert sample(group, "ryz_requests_released_total", reason="handed_back") == 1
    assert sample(group, "ryz_request_success_total", finished_reason="stop") is None


def test_without_a_metrics_port_nothing_is_recorded(
        r: redis.Redis, keys: Keys, make_group: MakeGroup) -> None:
    group = make_group(metrics=False)
    enqueue(r, keys, "g1", make_request(keys, "a", "abc", enqueued_ms=T0))
    run_until(group.tick, lambda: bool(finals(events(r, keys.result("a")))))
    group.heartbeat(force=True)
    assert sample(group, "ryz_request_success_total", finished_reason="stop") is None
    assert sample(group, "ryz_num_requests_running") is None
    assert group.telemetry.probe.check().ready  # probes work either way
    (status,) = read_groups(r, keys, dead_after_s=3.0)
    assert status.metrics_port is None


def test_the_metrics_port_is_published_in_the_heartbeat(
        r: redis.Redis, keys: Keys, make_group: MakeGroup) -> None:
    group = make_group()
    group.telemetry.port = 45678
    group.heartbeat(force=True)
    (status,) = read_groups(r, keys, dead_after_s=3.0)
    assert status.metrics_port == 45678


SECRET = "my card number is 4111"


@pytest.mark.parametrize("log_prompts", [False, True])
def test_request_log_lines_carry_the_request_id_and_prompts_only_when_asked(
        r: redis.Redis, keys: Keys, make_group: MakeGroup, caplog: pytest.LogCaptureFixture,
        log_prompts: bool) -> None:
    group = make_group(log_prompts=log_prompts)
    caplog.set_level(logging.DEBUG)
    enqueue(r, keys, "g1", make_request(keys, "req-1", SECRET))
    enqueue(r, keys, "g1", make_request(keys, "req-2", prompt_ids=[1, 300]))
    run_until(group.tick, lambda: all(finals(events(r, keys.result(rid))) for rid in ("req-1", "req-2")))

    about = {rid: [rec for rec in caplog.records
                   if rid in rec.getMessage() or getattr(rec, "request_id", None) == rid]
             for rid in ("req-1", "req-2")}
    assert [rec.getMessage() for rec in about["req-1"]] == [
        "request admitted: 22 prompt tokens, max_tokens 64",
        "request finished: stop, 22 prompt + 22 completion tokens"]
    assert [rec.getMessage().split(":")[0] for rec in about["req-2"]] == ["request admitted", "request failed"]
    assert all(getattr(rec, "request_id", None) == rid for rid, recs in about.items() for rec in recs)
    everything = " ".join(f"{rec.getMessage()} {vars(rec)}" for rec in caplog.records)
    assert (SECRET in everything) is log_prompts


def test_preemption_and_prefix_cache_counters_follow_the_engine_totals() -> None:
    from broker.registry import GroupLoad
    from gpu_workers.engine import EngineStats
    from gpu_workers.telemetry import GroupTelemetry

    telemetry = GroupTelemetry("g1", enabled=True, now_ms=lambda: 0.0, ready_within_s=3, live_within_s=60,
                               model_name="llama-3")
    load = GroupLoad(name="g1", tp=1, model="/models/llama-3", kv_dtype="fp8_e4m3", kv_capacity_tokens=16,
                     kv_used_tokens=0, running=0, waiting=0, queue_depth=0, leader_pid=1, host="h", max_context=8,
                     vocab_size=9)

    def value(name: str) -> float | None:
        return telemetry.registry.get_sample_value(name, {"group": "g1", "model_name": "llama-3"})

    telemetry.heartbeat(load, EngineStats(0, 0, num_preemptions=3, prefix_cache_queries=100, prefix_cache_hits=40),
                        held=())
    telemetry.heartbeat(load, EngineStats(0, 0, num_preemptions=5, prefix_cache_queries=160, prefix_cache_hits=70),
                        held=())
    assert (value("ryz_num_preemptions_total"), value("ryz_prefix_cache_queries_total"),
            value("ryz_prefix_cache_hits_total")) == (5, 160, 70)


def test_a_busy_group_logs_its_stats_line_at_info(r: redis.Redis, keys: Keys, make_group: MakeGroup,
                                                   mono: FakeMonotonic, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="gpu_workers.stats")
    group = make_group(stats_log_interval_s=10.0, metrics=False)  # logged with or without metrics
    enqueue(r, keys, "g1", make_request(keys, "a", "abcd", enqueued_ms=T0))
    run_until(group.tick, lambda: bool(finals(events(r, keys.result("a")))))
    mono.advance(10.0)
    group.heartbeat(force=True)
    (line,) = [rec.getMessage() for rec in caplog.records if rec.name == "gpu_workers.stats"]
    assert line.startswith("running 0, waiting 0, queued 0; prompt 0.4 tok/s, generation 0.4 tok/s;")
