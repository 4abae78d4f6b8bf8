"""The pipeline end to end on each kind of Redis: one server and a Redis Cluster (3 masters + 3
replicas; tests/redis_cluster.py). Real balancer and worker processes, the Python clients (sync and
asyncio), the gateway, batch jobs and ``ryzanstein status``/``health``; every URL is the backend's
(``redis+cluster://`` for the cluster). Tests whose single-server form lives elsewhere (test_pipeline,
test_gateway, test_batch, ...) run on the cluster only, to keep the suite's time."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from broker.connection import connect
from broker.embedded import EmbeddedRedis
from broker.keys import INGRESS_GROUP, Keys
from broker.settings import Settings
from producer.async_client import AsyncClient
from producer.client import Client
from tests.integration.conftest import Procs, all_finished, final_events, send_many, wait_for, wait_groups

pytestmark = pytest.mark.integration
STARTUP_S = 120.0  # worker processes import torch: slow on a loaded 2-core CI box


@pytest.fixture(params=["single", "cluster"])
def redis_url(request: pytest.FixtureRequest, redis_url: str) -> str:
    """The single server's URL (flushed), then the session cluster's (flushed)."""
    if request.param == "cluster":
        return str(request.getfixturevalue("cluster_url"))
    return redis_url


@pytest.fixture
def r(redis_url: str) -> Iterator[redis.Redis]:
    client = connect(redis_url, Settings())
    yield client
    client.close()


def test_submit_and_stream_with_both_clients(procs: Procs, r: redis.Redis, keys: Keys, redis_url: str) -> None:
    procs.balancer()
    procs.worker("g1", "--model", "random:tiny")
    wait_groups(r, keys, {"g1"}, timeout=STARTUP_S)
    client = Client(redis_url, prefix=keys.prefix)
    deltas = list(client.stream("hello there", max_tokens=6, temperature=0))
    result = client.generate("hello there", max_tokens=6, temperature=0, timeout=30)
    assert len(deltas) == 6 and "".join(deltas) == result.text  # greedy: the same text twice
    client.close()

    async def both() -> list[str]:
        aclient = AsyncClient(redis_url, prefix=keys.prefix)
        got = [(await aclient.generate(f"p{i}", max_tokens=4, timeout=30)).text for i in range(3)]
        await aclient.close()
        return got

    assert len(asyncio.run(both())) == 3


@pytest.mark.parametrize("redis_url", ["cluster"], indirect=True)  # single server: test_pipeline & co.
def test_requests_on_every_master_answered_exactly_once(procs: Procs, r: redis.Redis, keys: Keys) -> None:
    procs.balancer()
    procs.worker("g1")
    procs.worker("g2")
    wait_groups(r, keys, {"g1", "g2"}, timeout=STARTUP_S)
    ids = send_many(r, keys, 1000, tag="m", stream="1", max_tokens="64")
    wait_for(lambda: all_finished(r, keys, ids), timeout=120, what="1000 results")
    for rid in ids:
        finals = final_events(r, keys.result(rid))
        assert len(finals) == 1 and finals[0][b"text"] == f"echo {rid}".encode(), rid
    assert r.xlen(keys.requests) == 0


def test_cancel_mid_stream(procs: Procs, r: redis.Redis, keys: Keys, redis_url: str) -> None:
    procs.balancer()
    procs.worker("slow", RYZ_ECHO_TOKEN_DELAY_MS="50")
    wait_groups(r, keys, {"slow"}, timeout=STARTUP_S)
    client = Client(redis_url, prefix=keys.prefix)
    handle = client.submit("a long prompt to echo slowly " * 4, max_tokens=200, stream=True)
    wait_for(lambda: len(r.xrange(handle.reply_to)) >= 3, timeout=20, what="tokens to stream")
    client.cancel(handle)
    [final] = wait_for(lambda: final_events(r, handle.reply_to), timeout=10, what="the final event")
    assert final[b"finish_reason"] == b"cancelled"
    assert 0 < int(final[b"completion_tokens"]) < 200
    client.close()


def submit_distinct(r: redis.Redis, keys: Keys, n: int, *, tag: str) -> dict[str, str]:
    """``n`` streamed requests whose prompts share no prefix (the balancer spreads them: no affinity);
    id -> prompt (the echo engine's answer)."""
    prompts = {f"{tag}{i}": f"{i:03d} {tag} " + "x" * 30 for i in range(n)}
    pipe = r.pipeline(transaction=False)
    for rid, prompt in prompts.items():
        pipe.xadd(keys.requests, {"id": rid, "prompt": prompt, "stream": "1", "max_tokens": "64"})
    pipe.execute()
    return prompts


def check_answered_once(r: redis.Redis, keys: Keys, prompts: dict[str, str]) -> int:
    """Every request has one final event with its whole text and its tokens in order, each once;
    returns how many moved to another group on the way (epoch past 1)."""
    moved = 0
    for rid, prompt in prompts.items():
        events = [f for _i, f in r.xrange(keys.result(rid))]
        finals = [f for f in events if f[b"event"] in (b"done", b"error")]
        assert len(finals) == 1 and finals[0][b"text"] == prompt.encode(), (rid, finals)
        tokens = [int(f[b"index"]) for f in events if f[b"event"] == b"token"]
        assert tokens == list(range(len(prompt))), rid  # never a token twice nor a gap
        moved += r.hget(keys.state(keys.result(rid), rid), "epoch") != b"1"
    return moved


@pytest.mark.chaos
def test_killed_group_fails_over(procs: Procs, r: redis.Redis, keys: Keys) -> None:
    procs.balancer()
    workers = {name: procs.worker(name, RYZ_ECHO_TOKEN_DELAY_MS="20") for name in ("g1", "g2")}
    wait_groups(r, keys, {"g1", "g2"}, timeout=STARTUP_S)
    prompts = submit_distinct(r, keys, 60, tag="f")

    def owner_mid_stream() -> str | None:
        """A group streaming some request (the balancer may not know the later-registered group yet
        when the requests come, and route them all to the other: CI saw that; either is a victim)."""
        for rid in prompts:
            owner = r.hget(keys.state(keys.result(rid), rid), "owner")
            if owner in (b"g1", b"g2") and r.xlen(keys.result(rid)) >= 2:
                return owner.decode()
        return None

    victim = wait_for(owner_mid_stream, what="a group mid-stream")
    workers[victim].send_signal(signal.SIGKILL)
    wait_for(lambda: all_finished(r, keys, list(prompts)), timeout=60, what="every request after the failover")
    assert check_answered_once(r, keys, prompts) >= 1


def held_by(r: redis.Redis, keys: Keys, balancer: str) -> int:
    """Ingress entries ``balancer`` has read and not acknowledged (0 before it has read any)."""
    try:
        consumers = r.xinfo_consumers(keys.requests, INGRESS_GROUP)
    except redis.ResponseError:  # no balancer has created the consumer group yet
        return 0
    return sum(int(c["pending"]) for c in consumers if c["name"].decode() == balancer)


@pytest.mark.chaos
@pytest.mark.parametrize("redis_url", ["cluster"], indirect=True)  # single server: chaos/test_balancer_and_redis
def test_killed_balancer_requests_claimed(procs: Procs, r: redis.Redis, keys: Keys) -> None:
    balancers = {name: procs.spawn("balancer", "--name", name) for name in ("b1", "b2")}

    def ingress_group() -> bool:
        try:
            return bool(r.xinfo_groups(keys.requests))
        except redis.ResponseError:  # no stream yet
            return False

    wait_for(ingress_group, timeout=STARTUP_S, what="the balancers' consumer group")
    prompts: dict[str, str] = {}
    for n in range(4):  # no group yet: both balancers read requests and hold them, waiting for one
        prompts |= submit_distinct(r, keys, 10, tag=f"k{n}-")
        time.sleep(0.05)
    wait_for(lambda: sum(held_by(r, keys, name) for name in balancers) == len(prompts), what="the balancers to hold them")
    held = {name: held_by(r, keys, name) for name in balancers}
    victim = max(held, key=lambda name: held[name])  # the other one claims what it held
    balancers[victim].send_signal(signal.SIGKILL)
    procs.worker("g1")
    wait_groups(r, keys, {"g1"}, timeout=STARTUP_S)
    wait_for(lambda: held_by(r, keys, victim) == 0, timeout=30, what=f"{victim}'s requests to be claimed")
    wait_for(lambda: all_finished(r, keys, list(prompts)), timeout=60, what="every request after the claim")
    assert check_answered_once(r, keys, prompts) == 0  # claimed, then dispatched once: never moved
    assert r.xpending(keys.requests, INGRESS_GROUP)["pending"] == 0


@pytest.mark.parametrize("redis_url", ["cluster"], indirect=True)  # single server: test_pipeline & co.
def test_status_and_health(procs: Procs, r: redis.Redis, keys: Keys, subprocess_env: dict[str, str]) -> None:
    shards = {"RYZ_INGRESS_SHARDS": "3"}  # ingress streams on several masters, each read in the same pipelines
    procs.balancer(**shards)
    procs.worker("g1")
    wait_groups(r, keys, {"g1"}, timeout=STARTUP_S)
    run, env = [sys.executable, "-m", "ryzanstein"], {**subprocess_env, **shards}
    status = subprocess.run([*run, "status", "--json"], env=env, capture_output=True, text=True,
                            timeout=30, check=True)
    assert [g["name"] for g in json.loads(status.stdout)["groups"]] == ["g1"]
    assert json.loads(status.stdout)["ingress_depth"] == 0
    health = subprocess.run([*run, "health"], env=env, capture_output=True, text=True, timeout=30,
                            check=False)
    assert health.returncode == 0, health.stdout + health.stderr


@pytest.mark.parametrize("redis_url", ["cluster"], indirect=True)  # single server: test_pipeline & co.
def test_batch_job(procs: Procs, r: redis.Redis, keys: Keys, subprocess_env: dict[str, str], tmp_path: Path,
                   redis_url: str, redis_server: EmbeddedRedis) -> None:
    batch = [sys.executable, "-m", "producer", "batch"]
    source, out = tmp_path / "prompts.jsonl", tmp_path / "results.jsonl"
    prompts = [f"line {i:02d} " + "z" * 10 for i in range(20)]
    source.write_text("".join(json.dumps({"prompt": p, "max_tokens": 64}) + "\n" for p in prompts))
    env = dict(subprocess_env)
    if redis_url.startswith("redis+cluster://"):  # RQ runs on one server: its queue goes there
        refused = subprocess.run([*batch, "submit", str(source), "--out", str(out)], env=env, capture_output=True,
                                 text=True, timeout=60, check=False)
        assert refused.returncode != 0 and "RYZ_BATCH_REDIS_URL" in refused.stderr
        env["RYZ_BATCH_REDIS_URL"] = redis_server.url
    procs.balancer()
    procs.worker("g1")
    submitted = subprocess.run([*batch, "submit", str(source), "--out", str(out)], env=env,
                               capture_output=True, text=True, timeout=60, check=False)
    assert submitted.returncode == 0, submitted.stderr
    wait_groups(r, keys, {"g1"}, timeout=STARTUP_S)
    procs.spawn("producer", "batch", "worker", env=env)
    records = wait_for(lambda: out.exists() and len(out.read_text().splitlines()) == len(prompts)
                       and [json.loads(line) for line in out.read_text().splitlines()], timeout=60,
                       what="the batch output")
    assert sorted(rec["text"] for rec in records) == prompts


@pytest.mark.parametrize("redis_url", ["cluster"], indirect=True)  # single server: test_pipeline & co.
def test_gateway(procs: Procs, r: redis.Redis, keys: Keys) -> None:
    import openai

    procs.balancer()
    procs.worker("g1")
    log = procs.log_dir / f"{len(procs.started):02d}-producer.log"  # the name Procs.spawn gives it
    procs.spawn("producer", "gateway", "--port", "0")
    wait_groups(r, keys, {"g1"}, timeout=STARTUP_S)

    def served() -> str | None:
        for line in log.read_text(errors="replace").splitlines() if log.exists() else []:
            if line.startswith("ryzanstein gateway: serving "):
                return line.split()[3]
        return None

    url = wait_for(served, timeout=STARTUP_S, what="the gateway")
    client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0)
    done = client.completions.create(model="echo", prompt="through the gateway", max_tokens=64)
    assert done.choices[0].text == "through the gateway"
    chunks = client.chat.completions.create(model="echo", messages=[{"role": "user", "content": "hi"}],
                                            max_tokens=64, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices).startswith("user: hi")
    assert [m.id for m in client.models.list()] == ["echo"]


@pytest.mark.parametrize("redis_url", ["cluster"], indirect=True)
def test_sharded_ingress(procs: Procs, r: redis.Redis, keys: Keys, redis_url: str) -> None:
    shards = 4
    procs.balancer(RYZ_INGRESS_SHARDS=str(shards))
    procs.worker("g1")
    wait_groups(r, keys, {"g1"}, timeout=STARTUP_S)
    client = Client(settings=Settings(redis_url=redis_url, prefix=keys.prefix, ingress_shards=shards))
    handles = [client.submit(f"sharded {i:02d}", max_tokens=64) for i in range(40)]
    assert {h.ingress for h in handles} <= {keys.requests_shard(i) for i in range(shards)}
    assert len({h.ingress for h in handles}) >= 2  # 40 random picks of 4
    assert [client.result(h, timeout=60).text for h in handles] == [f"sharded {i:02d}" for i in range(40)]
    entry = r.xadd(keys.requests_shard(2), {"prompt": "no id, on a shard", "max_tokens": "64"})  # redis-cli's way, on a shard
    r.xadd(keys.requests, {"id": "plain", "prompt": "the shared stream still works"})
    wait_for(lambda: final_events(r, keys.result("plain")), timeout=30, what="the shared stream's request")
    [final] = wait_for(lambda: final_events(r, keys.result(entry.decode())), timeout=30,
                       what="the shard's request without id, answered under its entry id")
    assert final[b"text"] == b"no id, on a shard"
    client.close()
