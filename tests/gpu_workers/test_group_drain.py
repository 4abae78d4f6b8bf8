"""Draining a group whose engine holds more than it can start: random:tiny on the real test Redis.

One tick with 200 requests starts only what the engine's first step can take (max_num_batched_tokens:
128 of them at the defaults, 16 at the smaller limits used here to keep the test fast); the rest
wait inside the engine. SIGTERM's drain must hand back every request not started, at once,
not keep it for up to drain_timeout_s.
"""

from __future__ import annotations

from typing import Any

import pytest
import redis

from broker.keys import Keys
from broker.settings import Settings
from broker.validation import parse_request
from gpu_workers.group import WorkerGroup
from gpu_workers.llm_engine import LlamaEngine, LlamaEngineOptions
from gpu_workers.model.presets import materialize
from tests.gpu_workers.helpers import (
    FakeMonotonic,
    assert_one_clean_completion,
    enqueue,
    events,
    make_request,
    pending,
)

N = 200
MAX_TOKENS = 3


@pytest.fixture(scope="module")
def tiny_engine() -> LlamaEngine:
    return LlamaEngine(materialize("tiny"), name="random:tiny",
                       options=LlamaEngineOptions(kv_dtype="fp32", kv_memory="8MiB", max_num_seqs=32,
                                                          max_num_batched_tokens=64))


def handed_back(r: redis.Redis, keys: Keys, prefix: str) -> list[Any]:
    return [parse_request(fields, entry_id=eid.decode(), prefix=prefix, max_request_bytes=1 << 20,
                          signing_key=r.get(keys.signing_key))
            for eid, fields in r.xrange(keys.requests)]


def test_drain_hands_back_at_once_what_waits_in_the_engine(
        r: redis.Redis, keys: Keys, prefix: str, redis_url: str, mono: FakeMonotonic,
        tiny_engine: LlamaEngine) -> None:
    settings = Settings(redis_url=redis_url, prefix=prefix, worker_block_ms=1, drain_timeout_s=30.0)
    group = WorkerGroup(r, tiny_engine, settings=settings, name="g1", monotonic=mono)
    group.register()
    requests = [make_request(keys, f"r{i}", prompt_ids=[1 + i % 200, 7, 9, 11], max_tokens=MAX_TOKENS)
                for i in range(N)]
    for request in requests:
        enqueue(r, keys, "g1", request)
    group.tick()
    stats = tiny_engine.stats()
    assert stats.running + stats.waiting == N and 0 < stats.running < N  # the engine could not start all
    started = {s.request_id for s in tiny_engine.scheduler.running}
    assert len(started) == stats.running

    ticks: list[set[str]] = []
    real_tick = group.tick

    def observed_tick() -> None:
        ticks.append({q.id for q in handed_back(r, keys, prefix)})
        real_tick()

    group.tick = observed_tick  # type: ignore[method-assign]
    group.drain()
    group.run()

    not_started = {request.id for request in requests} - started
    assert ticks and ticks[0] == not_started  # all of them before the first draining tick
    back = handed_back(r, keys, prefix)
    assert len(back) == len(not_started) and all(q.takeover_from == "g1" for q in back)
    for request in requests:
        if request.id in started:
            assert_one_clean_completion(events(r, request.reply_to))
        else:
            assert events(r, request.reply_to) == []  # the next owner answers it
    assert not tiny_engine.has_work()
    assert r.xlen(keys.group_queue("g1")) == 0 and pending(r, keys, "g1") == 0
