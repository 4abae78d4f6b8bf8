"""SIGTERM on a group whose engine holds more than it runs, as real processes: every request it had not
started is handed back at once and answered by another group; it finishes only what it had started.

Group A runs one sequence at a time (``--max-num-seqs 1``), so nearly all of 200 requests wait inside
its engine. Its drain timeout is far longer than the test: A exits once its running request is done,
and what it had not started waits on the ingress stream for group B, started only then.
"""

from __future__ import annotations

import signal

import pytest
import redis

from broker.keys import Keys
from broker.registry import read_groups
from producer.client import Client
from tests.integration.conftest import Procs, wait_for, wait_groups

pytestmark = [pytest.mark.integration, pytest.mark.slow]
N = 200
FAST = {"RYZ_HEARTBEAT_INTERVAL_S": "0.2", "RYZ_DEAD_AFTER_S": "3.0"}
MAX_TOKENS = 8
TINY = ("--model", "random:tiny", "--kv-dtype", "fp32", "--kv-memory", "16MiB")


def owners(r: redis.Redis, keys: Keys, ids: list[str]) -> dict[str, str | None]:
    """Each finished request's owner (the group that wrote its final event); None while unfinished."""
    pipe = r.pipeline(transaction=False)
    for rid in ids:
        pipe.hmget(keys.state(keys.result(rid), rid), ["owner", "final"])
    return {rid: owner.decode() if final and owner else None for rid, (owner, final) in zip(ids, pipe.execute())}


def test_sigterm_hands_back_what_the_engine_had_not_started(procs: Procs, r: redis.Redis, keys: Keys,
                                                             redis_url: str) -> None:
    procs.balancer(**FAST, RYZ_NO_GROUP_WAIT_S="120")  # what is handed back waits for group b
    slow = procs.worker("a", *TINY, "--max-num-seqs", "1", "--max-num-batched-tokens", "16", **FAST,
                        RYZ_DRAIN_TIMEOUT_S="600")
    wait_groups(r, keys, {"a"}, timeout=90)

    with Client(redis_url, prefix=keys.prefix) as client:
        handles = [client.submit(prompt_ids=[5 + i % 100, 9, 13], max_tokens=MAX_TOKENS, temperature=0.0,
                                 request_id=f"d{i}") for i in range(N)]
        ids = [h.id for h in handles]

        def waiting_in_a() -> int:
            return next((g.waiting for g in read_groups(r, keys, dead_after_s=3.0) if g.name == "a"), 0)

        wait_for(lambda: waiting_in_a() >= N // 2, timeout=30, what="requests waiting in group a's engine")
        before = owners(r, keys, ids)
        slow.send_signal(signal.SIGTERM)
        assert slow.wait(timeout=60) == 0  # it finished the one it was running, and left
        by_a = {rid for rid, owner in owners(r, keys, ids).items() if owner == "a"}
        # only what it had finished, plus the one running at the signal (perhaps one more, started
        # between the snapshot and the signal)
        assert len(by_a - {rid for rid, owner in before.items() if owner == "a"}) <= 2
        assert len(by_a) < N // 2

        procs.worker("b", *TINY, **FAST)
        results = [client.result(h, timeout=90) for h in handles]
    assert all(res.finish_reason in ("stop", "length") for res in results)
    after = owners(r, keys, ids)
    assert {rid for rid, owner in after.items() if owner == "a"} == by_a
    assert {rid for rid, owner in after.items() if owner == "b"} == set(ids) - by_a
