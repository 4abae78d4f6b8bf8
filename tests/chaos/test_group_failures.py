"""A worker group dies (SIGKILL) or hangs (SIGSTOP) with requests mid-stream: they move and continue.

Killing a non-leader rank of a tensor-parallel group (TP=2): test_tensor_parallel_rank.py.
"""

from __future__ import annotations

import json
import signal
import statistics
import time

import pytest

from tests.chaos.conftest import (
    Chaos,
    check_completion,
    events,
    groups,
    healthy,
    redis_ms,
    state,
    submit,
    summary,
    workload,
)
from tests.integration.conftest import wait_for

pytestmark = [pytest.mark.chaos, pytest.mark.integration, pytest.mark.slow]

DETECTION_LIMIT_S = 5.0


def streaming_on(chaos: Chaos, group: str, ids: list[str], *, tokens: int) -> bool:
    """Some request owned by ``group`` has streamed at least ``tokens`` tokens."""
    return any(state(chaos.r, chaos.keys, rid).get("owner") == group
               and int(state(chaos.r, chaos.keys, rid).get("next", 0)) >= tokens for rid in ids)


def moved_after(chaos: Chaos, ids: list[str], victim: str, since_ms: int) -> tuple[list[str], list[float]]:
    """Requests that moved off ``victim`` mid-stream, and for each the time from ``since_ms`` to its next
    token (Redis clock: the entry ids of the reply stream)."""
    moved, gaps = [], []
    for rid in ids:
        evs = events(chaos.r, chaos.keys, rid)
        if int(state(chaos.r, chaos.keys, rid).get("epoch", 1)) < 2:
            continue
        before = [e for ms, e in evs if ms <= since_ms and e["event"] == "token"]
        after = [ms for ms, e in evs if ms > since_ms and e["event"] == "token"]
        if before and after:
            moved.append(rid)
            gaps.append(float(after[0] - since_ms))
    return moved, gaps


def test_group_leader_sigkill_mid_stream(chaos: Chaos) -> None:
    chaos.start(groups=3)
    jobs = workload(240, tag="kill")
    ids = [j.id for j in jobs]
    submit(chaos.r, chaos.keys, jobs)
    wait_for(lambda: streaming_on(chaos, "g1", ids, tokens=8), what="g1 to be mid-stream")
    victim = chaos.procs.started[1]  # g1 (started right after the balancer)
    in_flight = 240 - sum(1 for rid in ids if "final" in state(chaos.r, chaos.keys, rid))
    killed_at = time.monotonic()
    victim.send_signal(signal.SIGKILL)
    killed_ms = redis_ms(chaos.r)
    wait_for(lambda: not chaos.r.exists(chaos.keys.group_accepting("g1")), timeout=10, what="failover of g1")
    detection_s = time.monotonic() - killed_at
    chaos.wait_finished(jobs)
    for job in jobs:
        check_completion(chaos.r, chaos.keys, job)
    moved, gaps = moved_after(chaos, ids, "g1", killed_ms)
    chaos.record(in_flight_at_kill=in_flight, detection_s=round(detection_s, 3), moved_mid_stream=len(moved),
                 kill_to_next_token_ms=summary(gaps))
    assert in_flight >= 200
    assert detection_s <= DETECTION_LIMIT_S
    assert len(moved) >= 20  # g1 held about a third of them, mid-stream
    assert max(gaps) <= DETECTION_LIMIT_S * 1000 + 2000
    assert groups(chaos.r, chaos.keys)["g1"].alive is False


def test_group_sigstop_then_sigcont_is_fenced_and_rejoins(chaos: Chaos) -> None:
    chaos.start(groups=3)
    jobs = workload(240, tag="stop")
    ids = [j.id for j in jobs]
    submit(chaos.r, chaos.keys, jobs)
    wait_for(lambda: streaming_on(chaos, "g1", ids, tokens=8), what="g1 to be mid-stream")
    victim = chaos.procs.started[1]
    stopped_at = time.monotonic()
    victim.send_signal(signal.SIGSTOP)
    stopped_ms = redis_ms(chaos.r)
    try:
        wait_for(lambda: not chaos.r.exists(chaos.keys.group_accepting("g1")), timeout=10, what="failover of g1")
        detection_s = time.monotonic() - stopped_at
        # stopped 6 s (not 10: enough to be failed over and have its requests go on elsewhere)
        time.sleep(max(0.0, 6.0 - (time.monotonic() - stopped_at)))
    finally:
        victim.send_signal(signal.SIGCONT)
    woke_ms = redis_ms(chaos.r)
    chaos.wait_finished(jobs)
    # the woken group registers again and takes new work; what it held is no longer its to publish
    chaos.wait_groups({"g1"})
    # (its heartbeat forgets the 6 s step it was stopped in once it has been idle for a heartbeat)
    wait_for(lambda: groups(chaos.r, chaos.keys)["g1"].latency_ewma_ms < 100, what="g1's latency to settle")
    for job in jobs:
        # one final, last: nothing after it, although g1 still held many of them when it woke
        check_completion(chaos.r, chaos.keys, job)
        if state(chaos.r, chaos.keys, job.id).get("epoch") != "1":
            assert state(chaos.r, chaos.keys, job.id)["owner"] != "g1"
    moved, gaps = moved_after(chaos, ids, "g1", stopped_ms)
    later = workload(30, tag="after")
    submit(chaos.r, chaos.keys, later)
    chaos.wait_finished(later)
    for job in later:
        check_completion(chaos.r, chaos.keys, job)
    fenced = groups(chaos.r, chaos.keys)["g1"].fenced
    chaos.record(detection_s=round(detection_s, 3), stopped_s=round((woke_ms - stopped_ms) / 1000, 1),
                 moved_mid_stream=len(moved), kill_to_next_token_ms=summary(gaps), fenced_publishes=fenced,
                 served_after_rejoin=sum(state(chaos.r, chaos.keys, j.id)["owner"] == "g1" for j in later))
    assert detection_s <= DETECTION_LIMIT_S
    assert len(moved) >= 20
    assert statistics.median(gaps) <= DETECTION_LIMIT_S * 1000 + 2000
    assert chaos.measured["served_after_rejoin"] > 0


def test_requests_with_several_completions_move_mid_stream_and_end_once(chaos: Chaos) -> None:
    """n=3, streamed: a group SIGKILLed mid-stream; each completion continues elsewhere after the
    tokens its stream carried (per-completion indices), and each request ends with one done event."""
    chaos.start(groups=2)
    jobs = workload(40, tag="choices")
    pipe = chaos.r.pipeline(transaction=False)
    for job in jobs:
        pipe.xadd(chaos.keys.requests, {"id": job.id, "prompt": job.prompt, "max_tokens": job.max_tokens,
                                        "temperature": 0, "stream": 1, "n": 3,
                                        **({"stop": json.dumps(list(job.stop))} if job.stop else {})})
    pipe.execute()
    ids = [j.id for j in jobs]
    wait_for(lambda: any(state(chaos.r, chaos.keys, rid).get("owner") == "g1"
                         and int(state(chaos.r, chaos.keys, rid).get("next:0", 0)) >= 8 for rid in ids),
             what="g1 to be mid-stream")
    killed_ms = redis_ms(chaos.r)
    chaos.procs.started[1].send_signal(signal.SIGKILL)  # g1
    chaos.wait_finished(jobs)
    moved = 0
    for job in jobs:
        evs = events(chaos.r, chaos.keys, job.id)
        finals = [e for _ms, e in evs if e["event"] in ("done", "error")]
        assert len(finals) == 1 and evs[-1][1] is finals[0] and finals[0]["event"] == "done", job.id
        want = healthy(job)
        choices = json.loads(finals[0]["choices"])
        assert [(c["text"], c["token_ids"], c["finish_reason"]) for c in choices] == [
            (want["text"], want["token_ids"], want["finish_reason"])] * 3, job.id
        for c in range(3):
            tokens = [e for _ms, e in evs if e["event"] == "token" and e["choice"] == str(c)]
            assert [int(t["index"]) for t in tokens] == list(range(len(tokens))), job.id
            assert "".join(t["text"] for t in tokens) == want["text"], job.id
        if int(state(chaos.r, chaos.keys, job.id).get("epoch", 1)) >= 2 and any(
                ms <= killed_ms for ms, e in evs if e["event"] == "token") and any(
                ms > killed_ms for ms, e in evs if e["event"] == "token"):
            moved += 1
    chaos.record(moved_mid_stream=moved)
    assert moved >= 1
