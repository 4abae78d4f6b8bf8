"""Chaos tests: a real redis-server with AOF (started here, on a free port), real balancer and echo
worker-group processes, and requests that are really mid-stream when something is killed (the echo
engine sleeps RYZ_ECHO_TOKEN_DELAY_MS per step, like a model's decode step).

Every test checks, for every request: exactly one final event, and it is the last; token indices
0..n-1 exactly once, in order; the joined deltas equal the done text; and the completion equals what
a healthy group produces (computed here with the same engine and output code, no Redis).
"""

from __future__ import annotations

import json
import os
import statistics
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import redis

from broker.embedded import EmbeddedRedis
from broker.events import FINAL_EVENTS
from broker.keys import INGRESS_GROUP, Keys
from broker.protocol import SamplingParams
from broker.registry import GroupStatus, read_groups
from gpu_workers.echo import EchoEngine
from gpu_workers.engine import EngineRequest
from gpu_workers.engine_mapping import engine_sampling
from gpu_workers.output import OutputState
from tests.integration.conftest import Procs, wait_for

TOKEN_DELAY_MS = 25  # per engine step: a 60-token request streams for ~2 s


@dataclass(frozen=True, slots=True)
class Job:
    id: str
    prompt: str
    max_tokens: int
    stop: tuple[str, ...] = ()
    stream: bool = True
    priority: int = 0


def workload(n: int, *, tag: str) -> list[Job]:
    """Streamed requests of 40-70 bytes with multi-byte characters (deltas must never split one), stop
    strings (held back, then cut) and max_tokens limits, so that cuts at migration land everywhere."""
    jobs = []
    for i in range(n):
        prompt = f"{tag} request {i:04d}: grüße, ünïcode ✓ tökens " + "abcdefghij"[: i % 10] + " and the end"
        stop = ("the e",) if i % 3 == 0 else ()
        max_tokens = 30 + i % 25 if i % 4 == 0 else 200
        jobs.append(Job(f"{tag}-{i}", prompt, max_tokens, stop))
    return jobs


def healthy(job: Job) -> dict[str, Any]:
    """What a healthy echo group answers: the engine and output code without Redis or processes."""
    engine = EchoEngine()
    prompt_ids = engine.tokenizer.encode(job.prompt)
    sampling = SamplingParams(max_tokens=job.max_tokens, stop=job.stop, temperature=0.0)
    out = OutputState(sampling=sampling, prompt_ids=prompt_ids, tokenizer=engine.tokenizer,
                      eos_token_ids=engine.info.eos_token_ids, max_context=engine.info.max_context)
    engine.add(EngineRequest(job.id, prompt_ids, engine_sampling(sampling)))
    while out.finish_reason is None:
        (step,) = engine.step()
        out.push(step.token_id, engine_finish=step.finish_reason)
    return {"text": out.text, "token_ids": out.token_ids, "finish_reason": out.finish_reason}


def submit(r: redis.Redis, keys: Keys, jobs: list[Job]) -> None:
    pipe = r.pipeline(transaction=False)
    for job in jobs:
        fields = {"id": job.id, "prompt": job.prompt, "max_tokens": job.max_tokens, "temperature": 0,
                  "stream": int(job.stream), "priority": job.priority}
        if job.stop:
            fields["stop"] = json.dumps(list(job.stop))
        pipe.xadd(keys.requests, fields)
    pipe.execute()


def events(r: redis.Redis, keys: Keys, rid: str) -> list[tuple[int, dict[str, str]]]:
    """(entry ms on the Redis clock, fields) of every event on the request's reply stream."""
    return [(int(eid.split(b"-")[0]), {k.decode(): v.decode() for k, v in f.items()})
            for eid, f in r.xrange(keys.result(rid))]


def finished(r: redis.Redis, keys: Keys, ids: list[str]) -> int:
    pipe = r.pipeline(transaction=False)
    for rid in ids:
        pipe.hexists(keys.state(keys.result(rid), rid), "final")
    return sum(pipe.execute())


def check_stream(r: redis.Redis, keys: Keys, job: Job) -> dict[str, str]:
    """The per-request invariants; returns the final event."""
    evs = [e for _ms, e in events(r, keys, job.id)]
    finals = [e for e in evs if e["event"] in FINAL_EVENTS]
    assert len(finals) == 1 and evs[-1] is finals[0], (job.id, evs[-3:])
    final = finals[0]
    tokens = [e for e in evs if e["event"] == "token"]
    assert [int(t["index"]) for t in tokens] == list(range(len(tokens))), job.id
    if final["event"] == "done" and job.stream:
        assert "".join(t["text"] for t in tokens) == final["text"], job.id
        assert [int(t["token_id"]) for t in tokens] == json.loads(final["token_ids"]), job.id
    return final


def check_completion(r: redis.Redis, keys: Keys, job: Job) -> dict[str, str]:
    final = check_stream(r, keys, job)
    assert final["event"] == "done", (job.id, final)
    want = healthy(job)
    got = {"text": final["text"], "token_ids": json.loads(final["token_ids"]),
           "finish_reason": final["finish_reason"]}
    assert got == want, job.id
    return final


def state(r: redis.Redis, keys: Keys, rid: str) -> dict[str, str]:
    return {k.decode(): v.decode() for k, v in r.hgetall(keys.state(keys.result(rid), rid)).items()}


def redis_ms(r: redis.Redis) -> int:
    secs, micros = r.time()
    return secs * 1000 + micros // 1000


def groups(r: redis.Redis, keys: Keys) -> dict[str, GroupStatus]:
    return {g.name: g for g in read_groups(r, keys, dead_after_s=3.0)}


def summary(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    return {"n": len(values), "min": round(ordered[0], 1), "median": round(statistics.median(ordered), 1),
            "p99": round(ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))], 1),
            "max": round(ordered[-1], 1)}


@dataclass
class Chaos:
    """One stack on its own redis-server: processes, clients, and what the test measured."""

    server: EmbeddedRedis
    r: redis.Redis
    keys: Keys
    procs: Procs
    data_dir: Path
    measured: dict[str, Any] = field(default_factory=dict)

    def start(self, *, balancers: int = 1, groups: int = 3, **env: str) -> None:
        for _ in range(balancers):
            self.procs.balancer(**env)
        for n in range(groups):
            self.procs.worker(f"g{n + 1}", **env)
        self.wait_groups({f"g{n + 1}" for n in range(groups)})

    def wait_groups(self, names: set[str], *, timeout: float = 30.0) -> None:
        wait_for(lambda: names <= {g.name for g in groups(self.r, self.keys).values() if g.routable},
                 timeout=timeout, what=f"groups {sorted(names)}")
        time.sleep(0.5)  # balancers see them at their next registry refresh (every 0.25 s)

    def wait_finished(self, jobs: list[Job], *, timeout: float = 60.0) -> None:
        ids = [j.id for j in jobs]
        wait_for(lambda: finished(self.r, self.keys, ids) == len(ids), timeout=timeout,
                 what=f"{len(ids)} requests to finish")

    def restart_redis(self, *, down_s: float) -> None:
        """SIGKILL the server, keep it down ``down_s``, start it again from its AOF on the same port."""
        port = self.server.port
        self.server.kill()
        time.sleep(down_s)
        self.server = EmbeddedRedis(port=port, appendonly=True, appendfsync="always",
                                    data_dir=str(self.data_dir)).start(timeout_s=30)

    def pending_of(self, consumer: str) -> int:
        """Ingress entries ``consumer`` (a balancer) has read and not acknowledged."""
        try:
            consumers = self.r.xinfo_consumers(self.keys.requests, INGRESS_GROUP)
        except redis.ResponseError:  # no balancer has created the consumer group yet
            return 0
        for c in consumers:
            if c["name"].decode() == consumer:
                return int(c["pending"])
        return 0

    def record(self, **values: Any) -> None:
        """Measurements: printed (pytest -s) and written to $RYZ_CHAOS_REPORT if set."""
        self.measured.update(values)


@pytest.fixture
def chaos(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Chaos]:
    data_dir = tmp_path / "redis"
    data_dir.mkdir()
    server = EmbeddedRedis(appendonly=True, appendfsync="always", data_dir=str(data_dir)).start()
    prefix = f"c{uuid.uuid4().hex[:8]}"
    env = dict(os.environ)
    env.update(RYZ_REDIS_URL=server.url, RYZ_PREFIX=prefix, PYTHONUNBUFFERED="1",
               RYZ_ECHO_TOKEN_DELAY_MS=str(TOKEN_DELAY_MS))
    log_dir = tmp_path / "logs"
    log_dir.mkdir()
    client = redis.Redis.from_url(server.url, retry_on_error=[redis.ConnectionError])
    state = Chaos(server, client, Keys(prefix), Procs(env, log_dir), data_dir)
    try:
        yield state
    finally:
        state.procs.stop_all()
        report = getattr(request.node, "rep_call", None)
        if report is not None and report.failed:
            print(state.procs.logs())
        if state.measured:
            line = json.dumps({"test": request.node.name, **state.measured})
            print(f"\nCHAOS {line}")
            out = os.environ.get("RYZ_CHAOS_REPORT")
            if out:
                with open(out, "a") as f:
                    f.write(line + "\n")
        client.close()
        state.server.stop()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()
    setattr(item, f"rep_{report.when}", report)
