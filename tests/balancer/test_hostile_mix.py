"""Random hostile entries mixed with good ones (issue "Shared use without trust"): every good request
gets exactly one final event, its own answer, and the balancer's CPU per entry stays bounded.

The hostile kinds cover the issue's cases: binary junk, garbage msgpack, oversize fields, every
pipeline key kind as ``reply_to`` (the state of a good request included), existing keys of other
types as ``reply_to``, duplicate ids, cancels of good ids without their token, and ingress entries
deleted (XDEL) after a balancer read them. Hypothesis picks the mix and the order; the pipeline
(a balancer and an echo worker group) runs in-process on the real Redis (6.2 and 7).
"""

from __future__ import annotations

import time
import uuid
from typing import Any

import msgpack
import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from balancer.service import Balancer
from broker.keys import INGRESS_GROUP, Keys
from broker.settings import Settings
from gpu_workers.echo import EchoEngine
from gpu_workers.group import WorkerGroup
from tests.gpu_workers.helpers import FakeMonotonic, events, finals

MAX_REQUEST_BYTES = 4096
CPU_PER_ENTRY_S = 0.05  # balancer CPU per ingress entry, generous for a loaded 2-core machine

HOSTILE_KINDS = ["junk", "payload", "oversize", "pipeline_key", "good_state", "other_result", "wrong_type",
                 "duplicate", "cancel", "deleted"]

plans = st.lists(
    st.one_of(
        st.tuples(st.just("good"), st.text(alphabet="abcdefghij ", min_size=1, max_size=12),
                  st.integers(1, 6), st.booleans()),
        st.tuples(st.sampled_from(HOSTILE_KINDS), st.binary(max_size=40), st.integers(0, 50), st.booleans()),
    ),
    min_size=1, max_size=14,
).filter(lambda plan: any(step[0] == "good" for step in plan))


def hostile(r: redis.Redis, keys: Keys, kind: str, blob: bytes, n: int, flag: bool, good: list[str]) -> None:
    """Send one hostile entry (or cancel, or XDEL) of ``kind``."""
    target = good[n % len(good)] if good else "nobody"
    if kind == "junk":
        r.xadd(keys.requests, {blob or b"\xff": blob, b"id": blob[:8], b"prompt": b"\xc3"})
    elif kind == "payload":
        r.xadd(keys.requests, {"payload": blob if flag else msgpack.packb({"id": n, "prompt": [blob]})})
    elif kind == "oversize":
        r.xadd(keys.requests, {"id": f"big{n}", "prompt": "x" * (MAX_REQUEST_BYTES * (2 + n))})
    elif kind == "pipeline_key":
        key = [keys.requests, keys.cancel, keys.dead, keys.groups, keys.group_queue("g1"),
               keys.group_accepting("g1"), keys.request_id(target), keys.balancers][n % 8]
        r.xadd(keys.requests, {"id": f"h{n}", "prompt": "hi", "reply_to": key})
    elif kind == "good_state":
        key = [keys.state, keys.generated, keys.generated_text][n % 3](keys.result(target), target)
        r.xadd(keys.requests, {"id": f"h{n}", "prompt": "hi", "max_tokens": "2", "reply_to": key})
    elif kind == "other_result":
        r.xadd(keys.requests, {"id": f"h{n}", "prompt": "hi", "reply_to": keys.result(target)})
    elif kind == "wrong_type":
        key = f"app:{uuid.uuid4().hex[:8]}"  # a key of its own: another step may make app:<n> of the other type
        r.set(key, "v") if flag else r.hset(key, "f", "v")
        r.xadd(keys.requests, {"id": f"w{uuid.uuid4().hex[:6]}", "prompt": "hi", "reply_to": key})
    elif kind == "duplicate":
        fields = {"id": target, "prompt": "stolen", "max_tokens": "1"}
        r.xadd(keys.requests, {**fields, **({"reply_to": f"app:dup{n}"} if flag else {})})
    elif kind == "cancel":
        r.xadd(keys.cancel, {"id": target, **({"token": blob.hex()} if flag else {})})
    elif kind == "deleted":
        entry = r.xadd(keys.requests, {"id": f"del{n}", "prompt": "gone"})
        r.xreadgroup(INGRESS_GROUP, "crashed", {keys.requests: ">"}, count=1000)  # a balancer read, then died
        r.xdel(keys.requests, entry)


@pytest.fixture
def r(any_redis: redis.Redis) -> redis.Redis:
    return any_redis


@pytest.mark.slow  # about 10 s for both servers (idle blocking reads end on Redis's 100 ms clock)
@settings(max_examples=8, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(plan=plans)
def test_good_requests_are_answered_exactly_once_among_hostile_ones(r: redis.Redis, plan: list[Any]) -> None:
    keys = Keys(f"h{uuid.uuid4().hex[:8]}")
    mono = FakeMonotonic()
    config = Settings(prefix=keys.prefix, balancer_block_ms=1, worker_block_ms=1, claim_idle_ms=0,
                      max_request_bytes=MAX_REQUEST_BYTES)
    balancer = Balancer(r, settings=config, name="b1", monotonic=mono, redis_uptime_s=lambda: 1e9)
    balancer.setup()
    group = WorkerGroup(r, EchoEngine(), settings=config, name="g1", monotonic=mono)
    group.register()
    balancer.refresh_groups()

    good: dict[str, str] = {}  # id -> expected text (echo: the prompt's first max_tokens characters)
    for kind, data, n, flag in plan:
        if kind == "good":
            rid = f"good-{uuid.uuid4().hex[:8]}"
            fields = {"id": rid, "prompt": data, "max_tokens": str(n), "cancel_token": uuid.uuid4().hex}
            r.xadd(keys.requests, {**fields, **({"stream": "1"} if flag else {})})
            good[rid] = data[:n]
        else:
            hostile(r, keys, kind, data, n, flag, list(good))

    cpu = 0.0
    ticks = 0
    while not all(finals(events(r, keys.result(rid))) for rid in good) and ticks < 300:
        started = time.process_time()
        balancer.tick()
        cpu += time.process_time() - started
        group.tick()
        mono.advance(0.05)
        ticks += 1
    balancer.tick()  # and once more: nothing may come after the final events
    group.tick()

    for rid, text in good.items():
        evs = [e for e in events(r, keys.result(rid)) if e["id"] == rid]
        [final] = finals(evs)
        assert final["event"] == "done" and final["text"] == text, evs
    balancer.flush_acks()
    assert not balancer.waiting and len(balancer.attempts) == 0  # nothing left to spin on
    assert r.xpending(keys.requests, INGRESS_GROUP)["pending"] == 0 or _only_crashed_pending(r, keys)
    assert cpu <= CPU_PER_ENTRY_S * (len(plan) + 5), f"{cpu:.3f}s of balancer CPU for {len(plan)} entries"


def _only_crashed_pending(r: redis.Redis, keys: Keys) -> bool:
    """Entries the 'crashed' consumer read stay pending until claimed: none may be ours."""
    rows = r.xpending_range(keys.requests, INGRESS_GROUP, "-", "+", 1000)
    return all(row["consumer"] == b"crashed" for row in rows)
