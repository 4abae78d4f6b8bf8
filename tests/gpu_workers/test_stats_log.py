"""The periodic INFO stats line of a group leader (time passed in)."""

from __future__ import annotations

import dataclasses
import logging

import pytest

from broker.registry import GroupLoad
from gpu_workers.engine import EngineStats
from gpu_workers.stats_log import StatsLine
from tests.gpu_workers.helpers import FakeMonotonic

IDLE = GroupLoad(name="g", tp=1, model="m", kv_dtype="fp8_e4m3", kv_capacity_tokens=1000, kv_used_tokens=0,
                 running=0, waiting=0, queue_depth=0, leader_pid=1, host="h", max_context=64, vocab_size=9)
BUSY = dataclasses.replace(IDLE, running=3, waiting=1, queue_depth=2, kv_used_tokens=250)


def test_a_line_every_interval_while_busy_one_when_idle_then_quiet(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="gpu_workers.stats")
    mono = FakeMonotonic()
    line = StatsLine(interval_s=10.0, monotonic=mono)
    line.prompt(500)
    line.generated(120)
    mono.advance(5.0)
    assert line.heartbeat(BUSY, EngineStats(3, 1, prefix_cache_hit_rate=0.4)) is None  # not due yet
    mono.advance(5.0)
    assert line.heartbeat(BUSY, EngineStats(3, 1, prefix_cache_hit_rate=0.4)) == (
        "running 3, waiting 1, queued 2; prompt 50.0 tok/s, generation 12.0 tok/s; KV cache 25.0% used; "
        "prefix cache hit 40.0%")
    mono.advance(10.0)
    assert line.heartbeat(IDLE, EngineStats(0, 0)).startswith("running 0, waiting 0, queued 0; prompt 0.0 tok/s")
    mono.advance(10.0)
    assert line.heartbeat(IDLE, EngineStats(0, 0)) is None  # stays idle: silent
    assert len(caplog.records) == 2 and caplog.records[0].levelno == logging.INFO


def test_zero_interval_never_logs() -> None:
    mono = FakeMonotonic()
    line = StatsLine(interval_s=0.0, monotonic=mono)
    line.generated(5)
    mono.advance(100)
    assert line.heartbeat(BUSY, EngineStats(3, 1)) is None
