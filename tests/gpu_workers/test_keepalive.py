"""StepKeepalive: a long engine step keeps the group's heartbeat fresh, for a bounded time only."""

from __future__ import annotations

import threading

import redis
from redis.exceptions import ConnectionError as RedisConnectionError

from broker.settings import Settings
from gpu_workers.echo import EchoEngine
from gpu_workers.engine import StepOutput
from gpu_workers.group import WorkerGroup
from gpu_workers.keepalive import StepKeepalive
from tests.gpu_workers.helpers import FakeMonotonic, enqueue, make_request
from tests.integration.conftest import wait_for


def keepalive(clock: FakeMonotonic, beats: list[float], **kw: float) -> StepKeepalive:
    return StepKeepalive(lambda: beats.append(clock()), interval_s=kw.get("interval_s", 1.0),
                         max_step_s=kw.get("max_step_s", 10.0), monotonic=clock)


def test_beats_every_interval_only_while_a_step_runs() -> None:
    clock, beats = FakeMonotonic(), []
    k = keepalive(clock, beats)
    clock.advance(5)
    assert not k.check()  # no step running: the loop heartbeats by itself
    k.step_started()
    clock.advance(0.5)
    assert not k.check()
    clock.advance(0.6)
    assert k.check() and not k.check()  # one beat per interval
    clock.advance(1.0)
    assert k.check()
    k.step_ended()
    clock.advance(3.0)
    assert not k.check()
    assert len(beats) == 2


def test_a_step_past_max_step_s_stops_beating_so_a_hung_engine_is_failed_over() -> None:
    clock, beats = FakeMonotonic(), []
    k = keepalive(clock, beats, max_step_s=3.0)
    k.step_started()
    for _ in range(6):
        clock.advance(1.0)
        k.check()
    assert beats == [clock.t - 5.0, clock.t - 4.0, clock.t - 3.0]  # at 1, 2 and 3 s into the step


def test_a_redis_error_in_a_beat_is_not_raised() -> None:
    clock = FakeMonotonic()

    def beat() -> None:
        raise RedisConnectionError("down")

    k = StepKeepalive(beat, interval_s=1.0, max_step_s=10.0, monotonic=clock)
    k.step_started()
    clock.advance(1.5)
    assert k.check() is False


class BlockingEngine(EchoEngine):
    """An echo engine whose steps wait until the test lets them go (a long model step)."""

    def __init__(self) -> None:
        super().__init__()
        self.in_step = threading.Event()
        self.release = threading.Event()

    def step(self) -> list[StepOutput]:
        self.in_step.set()
        self.release.wait(30)
        return super().step()


def test_a_group_in_a_long_step_keeps_heartbeating(r: redis.Redis, redis_url: str, prefix: str) -> None:
    settings = Settings(redis_url=redis_url, prefix=prefix, worker_block_ms=1, heartbeat_interval_s=0.1)
    engine = BlockingEngine()
    group = WorkerGroup(r, engine, settings=settings, name="slow")
    group.register()
    enqueue(r, group.keys, "slow", make_request(group.keys, "long", "hi"))
    runner = threading.Thread(target=group.run, daemon=True)
    runner.start()
    try:
        assert engine.in_step.wait(10)
        first = int(r.hget(group.keys.group_info("slow"), "heartbeat_ms"))
        wait_for(lambda: int(r.hget(group.keys.group_info("slow"), "heartbeat_ms")) >= first + 300, timeout=10,
                 what="heartbeats during the step")
    finally:
        engine.release.set()
        group.drain()
        group.drain()
        runner.join(30)
    assert not runner.is_alive()


def test_a_group_in_a_long_step_stays_ready_past_dead_after_s(r: redis.Redis, redis_url: str, prefix: str) -> None:
    # A CPU-starved or large-model step outlasting dead_after_s: the loop has not reached Redis for
    # longer than the ready window, yet the group is working, so /readyz must say ready ("busy").
    settings = Settings(redis_url=redis_url, prefix=prefix, worker_block_ms=1, heartbeat_interval_s=0.1,
                        dead_after_s=0.3)
    engine = BlockingEngine()
    group = WorkerGroup(r, engine, settings=settings, name="slow")
    group.register()
    enqueue(r, group.keys, "slow", make_request(group.keys, "long", "hi"))
    runner = threading.Thread(target=group.run, daemon=True)
    runner.start()
    probe = group.telemetry.probe
    try:
        assert engine.in_step.wait(10)
        wait_for(lambda: probe.check().reason.startswith("busy: one step has run for"), timeout=10,
                 what="the probe to see a step longer than the ready window")
        assert probe.check().ready and probe.check().live
    finally:
        engine.release.set()
        group.drain()
        group.drain()
        runner.join(30)
    assert not runner.is_alive()
