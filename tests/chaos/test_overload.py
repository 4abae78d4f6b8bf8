"""Offered three times what the groups can serve: overloaded errors come at once, what is accepted
keeps a bounded latency, and queues and memory stay bounded."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from tests.chaos.conftest import Chaos, Job, check_completion, check_stream, events, summary

pytestmark = [pytest.mark.chaos, pytest.mark.integration, pytest.mark.slow]

GROUPS = 2
ENGINE_BATCH = 16  # RYZ_WORKER_MAX_BATCH: requests a group runs at once
GROUP_BOUND = 48  # RYZ_GROUP_MAX_REQUESTS: dispatched and not finished, per group
DELAY_MS = 10  # per engine step
PROMPT_TOKENS = 24
OFFERED_S = 5.0


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def test_three_times_capacity(chaos: Chaos) -> None:
    env = {"RYZ_ECHO_TOKEN_DELAY_MS": str(DELAY_MS), "RYZ_WORKER_MAX_BATCH": str(ENGINE_BATCH),
           "RYZ_GROUP_MAX_REQUESTS": str(GROUP_BOUND)}
    chaos.start(balancers=1, groups=GROUPS, **env)
    # An upper bound on capacity (it ignores everything but the engine's sleep): 3x of it is at least 3x.
    capacity = GROUPS * ENGINE_BATCH / (PROMPT_TOKENS * DELAY_MS / 1000)
    rate = 3 * capacity
    sent_ms: dict[str, int] = {}
    jobs: dict[str, Job] = {}
    samples: list[dict[str, float]] = []
    queues = [chaos.keys.group_queue(f"g{n + 1}") for n in range(GROUPS)]
    start = time.monotonic()
    n = 0
    while (elapsed := time.monotonic() - start) < OFFERED_S:
        due = int(elapsed * rate) - n
        pipe = chaos.r.pipeline(transaction=False)
        batch = []
        for _ in range(max(0, due)):
            job = Job(f"load-{n}", f"load request {n:06d} ok!"[:PROMPT_TOKENS].ljust(PROMPT_TOKENS, "."), 200,
                      stream=False, priority=-1 if n % 2 else 0)
            batch.append(job)
            pipe.xadd(chaos.keys.requests, {"id": job.id, "prompt": job.prompt, "max_tokens": job.max_tokens,
                                            "temperature": 0, "priority": job.priority})
            n += 1
        for xadd in [*queues, chaos.keys.requests]:
            pipe.xlen(xadd)
        pipe.info("memory")
        *ids, q1, q2, ingress, memory = pipe.execute()
        for job, entry_id in zip(batch, ids):
            jobs[job.id] = job
            sent_ms[job.id] = int(entry_id.split(b"-")[0])
        samples.append({"queue": max(q1, q2), "ingress": ingress, "redis_mb": memory["used_memory"] / 2**20,
                        "rss_mb": max(rss_mb(p.pid) for p in chaos.procs.started)})
        time.sleep(0.05)
    chaos.wait_finished(list(jobs.values()), timeout=90)

    accepted_ms, overloaded_ms = [], []
    accepted_by_priority = {0: 0, -1: 0}
    for rid, job in jobs.items():
        final = check_stream(chaos.r, chaos.keys, job)
        final_ms = events(chaos.r, chaos.keys, rid)[-1][0]
        if final["event"] == "error":
            assert final["code"] == "overloaded", final
            overloaded_ms.append(float(final_ms - sent_ms[rid]))
        else:
            check_completion(chaos.r, chaos.keys, job)
            accepted_ms.append(float(final_ms - sent_ms[rid]))
            accepted_by_priority[job.priority] += 1
    per_priority = len(jobs) / 2
    chaos.record(
        offered_per_s=round(rate), capacity_bound_per_s=round(capacity), requests=len(jobs),
        overloaded=len(overloaded_ms), overloaded_latency_ms=summary(overloaded_ms),
        accepted_latency_ms=summary(accepted_ms),
        accepted_share_by_priority={str(p): round(c / per_priority, 2) for p, c in accepted_by_priority.items()},
        max_group_queue=max(s["queue"] for s in samples), max_ingress=max(s["ingress"] for s in samples),
        max_redis_mb=round(max(s["redis_mb"] for s in samples), 1),
        max_process_rss_mb=round(max(s["rss_mb"] for s in samples), 1),
    )
    m = chaos.measured
    assert len(overloaded_ms) >= 0.4 * len(jobs)  # about 2/3 cannot be served
    # refused at once, not after waiting for room (that takes seconds: the accepted p99 below); 750 ms
    # leaves room for a busy box (259 ms seen with the suite's other worker running beside this test)
    assert m["overloaded_latency_ms"]["p99"] <= 750
    # Accepted: at most GROUP_BOUND / ENGINE_BATCH rounds of ~0.3-0.6 s in the queue, then one running
    # (1.5-2.5 s measured on a busy 2-CPU box). Unbounded queues would have reached ~10 s by the end.
    assert m["accepted_latency_ms"]["p99"] <= 4000
    assert accepted_by_priority[-1] > accepted_by_priority[0]  # the higher priority gets the room first
    assert m["max_group_queue"] <= GROUP_BOUND
    assert m["max_ingress"] <= 500
    assert m["max_redis_mb"] <= 64 and m["max_process_rss_mb"] <= 300
    print(json.dumps(m))
