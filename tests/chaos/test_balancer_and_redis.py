"""A balancer is SIGKILLed holding requests; redis-server is SIGKILLed and restarted from its AOF."""

from __future__ import annotations

import signal
import time

import pytest

from broker.keys import INGRESS_GROUP
from tests.chaos.conftest import (
    Chaos,
    check_completion,
    events,
    groups,
    redis_ms,
    state,
    submit,
    workload,
)
from tests.integration.conftest import wait_for

pytestmark = [pytest.mark.chaos, pytest.mark.integration, pytest.mark.slow]


def test_balancer_sigkill_holding_requests(chaos: Chaos) -> None:
    for name in ("b1", "b2"):
        chaos.procs.spawn("balancer", "--name", name)
    jobs = workload(240, tag="bal")
    # No group yet: both balancers read requests and hold them, waiting for one.
    for n in range(0, 240, 40):
        submit(chaos.r, chaos.keys, jobs[n:n + 40])
        time.sleep(0.05)
    wait_for(lambda: chaos.pending_of("b1") + chaos.pending_of("b2") == 240, what="both balancers to hold them")
    held = {name: chaos.pending_of(name) for name in ("b1", "b2")}
    victim = max(held, key=lambda name: held[name])
    assert held[victim] > 0
    killed_at = time.monotonic()
    chaos.procs.started[0 if victim == "b1" else 1].send_signal(signal.SIGKILL)
    for n in (1, 2, 3):
        chaos.procs.worker(f"g{n}")
    wait_for(lambda: chaos.pending_of(victim) == 0, timeout=10, what=f"{victim}'s requests to be claimed")
    detection_s = time.monotonic() - killed_at
    chaos.wait_finished(jobs)
    for job in jobs:
        check_completion(chaos.r, chaos.keys, job)
        assert state(chaos.r, chaos.keys, job.id)["epoch"] == "1"  # claimed, then dispatched once
    assert chaos.r.xlen(chaos.keys.requests) == 0
    assert chaos.r.xpending(chaos.keys.requests, INGRESS_GROUP)["pending"] == 0
    chaos.record(held_by_victim=held[victim], detection_s=round(detection_s, 3))
    assert detection_s <= 5.0


def test_redis_restart_with_aof_mid_stream(chaos: Chaos) -> None:
    chaos.start(balancers=2, groups=3)
    jobs = workload(240, tag="aof")
    submit(chaos.r, chaos.keys, jobs)
    wait_for(lambda: sum(int(state(chaos.r, chaos.keys, j.id).get("next", 0)) for j in jobs) > 1000,
             what="requests to be mid-stream")
    before = {j.id: [e["event"] for _ms, e in events(chaos.r, chaos.keys, j.id)] for j in jobs}
    streaming = sum(1 for evs in before.values() if "token" in evs and "done" not in evs)
    assert streaming >= 200
    # Down for longer than dead_after_s: every heartbeat is stale when it comes back, yet no group
    # may be failed over for it (they had no way to heartbeat).
    chaos.restart_redis(down_s=4.0)
    restarted_ms = redis_ms(chaos.r)
    chaos.wait_finished(jobs)
    for job in jobs:
        check_completion(chaos.r, chaos.keys, job)
        assert state(chaos.r, chaos.keys, job.id)["epoch"] == "1", job.id  # never failed over
    first_after = min(ms for j in jobs for ms, e in events(chaos.r, chaos.keys, j.id) if ms > restarted_ms)
    later = workload(30, tag="later")
    submit(chaos.r, chaos.keys, later)
    chaos.wait_finished(later)
    for job in later:
        check_completion(chaos.r, chaos.keys, job)
    alive = {name: g.alive for name, g in groups(chaos.r, chaos.keys).items()}
    chaos.record(streaming_at_kill=streaming, recovery_s=round((first_after - restarted_ms) / 1000, 3))
    assert alive == {"g1": True, "g2": True, "g3": True}
    assert all(p.poll() is None for p in chaos.procs.started)  # every process survived
    assert (first_after - restarted_ms) / 1000 <= 5.0
