"""``ryzanstein status`` on a registry written the way worker groups write it."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import redis

from broker.keys import Keys
from broker.registry import GroupLoad, read_groups
from broker.scripts import Scripts
from ryzanstein import status
from ryzanstein.cli import main

CONTRACT_FIELDS = {
    "name",
    "alive",
    "tp",
    "model",
    "kv_dtype",
    "kv_capacity_tokens",
    "kv_used_tokens",
    "running",
    "waiting",
    "queue_depth",
    "heartbeat_age_s",
    "leader_pid",
    "host",
}

LOAD = GroupLoad(
    name="g-alive",
    tp=2,
    model="random:tiny",
    kv_dtype="fp8_e4m3",
    kv_capacity_tokens=4096,
    kv_used_tokens=1024,
    running=3,
    waiting=1,
    queue_depth=5,
    leader_pid=4242,
    host="node-a",
    max_context=2048,
    vocab_size=32000,
    tokens_per_s=123.4,
    rank_weight_bytes=[2_040_109_465, 2_040_109_465],
    rank_kv_bytes=[512 * 2**20, 512 * 2**20],
)


def heartbeat(r: redis.Redis, keys: Keys, load: GroupLoad) -> None:
    """What a live group does every heartbeat."""
    Scripts(r).heartbeat(registry=keys.groups, info=keys.group_info(load.name), group=load.name,
                         fields=load.to_fields())


def stale_heartbeat(r: redis.Redis, keys: Keys, load: GroupLoad, *, age_s: float) -> None:
    """What a group that stopped ``age_s`` seconds ago left behind."""
    secs, micros = r.time()
    then_ms = int(secs * 1000 + micros // 1000 - age_s * 1000)
    fields = load.to_fields()
    r.hset(
        keys.group_info(load.name),
        mapping={**dict(zip(fields[::2], fields[1::2], strict=True)), "heartbeat_ms": then_ms},
    )
    r.zadd(keys.groups, {load.name: then_ms})


@pytest.fixture
def registry(r: redis.Redis, keys: Keys) -> None:
    heartbeat(r, keys, LOAD)
    heartbeat(r, keys, replace(LOAD, name="g-drain", state="draining", leader_pid=7))
    stale_heartbeat(r, keys, replace(LOAD, name="g-dead", leader_pid=99), age_s=10.0)
    for i in range(4):
        r.xadd(keys.requests, {"id": f"q{i}", "prompt": "x"})


def run_status(
    redis_url: str, prefix: str, capsys: pytest.CaptureFixture[str], *args: str
) -> tuple[int, str]:
    code = main(["status", *args, "--redis-url", redis_url, "--prefix", prefix, "--log-level", "WARNING"])
    return code, capsys.readouterr().out


def test_json_lists_alive_and_dead_groups(
    registry: None, redis_url: str, prefix: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out = run_status(redis_url, prefix, capsys, "--json")

    snapshot = json.loads(out)
    groups = {g["name"]: g for g in snapshot["groups"]}
    assert code == 0 and snapshot["ingress_depth"] == 4
    assert set(groups) == {"g-alive", "g-dead", "g-drain"}
    assert all(set(g) >= CONTRACT_FIELDS for g in groups.values())
    alive = groups["g-alive"]
    assert alive["alive"] is True and alive["heartbeat_age_s"] < 3.0
    assert {
        k: alive[k]
        for k in (
            "tp",
            "model",
            "kv_dtype",
            "kv_capacity_tokens",
            "kv_used_tokens",
            "running",
            "waiting",
            "queue_depth",
            "leader_pid",
            "host",
        )
    } == {
        "tp": 2,
        "model": "random:tiny",
        "kv_dtype": "fp8_e4m3",
        "kv_capacity_tokens": 4096,
        "kv_used_tokens": 1024,
        "running": 3,
        "waiting": 1,
        "queue_depth": 5,
        "leader_pid": 4242,
        "host": "node-a",
    }
    assert alive["rank_weight_bytes"] == [2_040_109_465] * 2 and alive["rank_kv_bytes"] == [512 * 2**20] * 2
    assert groups["g-dead"]["alive"] is False and 9.0 <= groups["g-dead"]["heartbeat_age_s"] < 20.0
    assert groups["g-drain"]["alive"] is True and groups["g-drain"]["state"] == "draining"


def test_table_marks_dead_and_draining_groups(
    registry: None, redis_url: str, prefix: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "200")  # a wide terminal: every column
    code, out = run_status(redis_url, prefix, capsys)

    lines = out.splitlines()
    assert code == 0
    assert lines[0].split() == [
        "GROUP", "STATE", "TP", "MODEL", "KV", "DTYPE", "KV", "USED/CAPACITY", "WEIGHTS+KV/RANK", "RUN", "WAIT",
        "QUEUE", "TOK/S", "REQ/S", "HEARTBEAT", "LEADER", "METRICS",
    ]
    rows = {line.split()[0]: line for line in lines[1:4]}
    assert rows["g-alive"].split()[1] == "ready"
    assert rows["g-dead"].split()[1] == "DEAD"
    assert rows["g-drain"].split()[1] == "DRAINING"
    assert "1024/4096 (25%)" in rows["g-alive"] and "4242@node-a" in rows["g-alive"]
    assert rows["g-alive"].split()[7:9] == ["1.9G+512M", "x2"]  # weights + KV cache, alike on both ranks
    column = lines[0].index("MODEL")
    assert all(line[column:].startswith("random:tiny") for line in lines[1:4])  # aligned
    # the dead group's load is not counted in the totals
    assert lines[-2] == "2/3 groups alive (1 draining); running 6, waiting 2, queued 10; 246.8 tok/s"
    assert lines[-1] == "ingress: 4 entries (0 being routed by balancers)"


def test_empty_registry(redis_url: str, prefix: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert run_status(redis_url, prefix, capsys) == (
        0, "no worker groups registered\ningress: 0 entries (0 being routed by balancers)\n")
    code, out = run_status(redis_url, prefix, capsys, "--json")
    assert code == 0
    assert json.loads(out) == {"groups": [], "models": {}, "ingress_depth": 0, "ingress_pending": 0, "balancers": []}


def test_dead_after_is_the_settings_threshold(r: redis.Redis, keys: Keys) -> None:
    stale_heartbeat(r, keys, LOAD, age_s=2.0)

    assert [g.alive for g in read_groups(r, keys, dead_after_s=3.0)] == [True]
    assert [g.alive for g in read_groups(r, keys, dead_after_s=1.0)] == [False]


def test_watch_refreshes_until_ctrl_c(
    registry: None,
    redis_url: str,
    prefix: str,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    sleeps: list[float] = []

    def fake_sleep(seconds: float) -> None:
        sleeps.append(seconds)
        if len(sleeps) == 3:
            raise KeyboardInterrupt

    monkeypatch.setattr(status.time, "sleep", fake_sleep)

    code, out = run_status(redis_url, prefix, capsys, "--json", "--watch", "0.5")

    assert code == 0 and sleeps == [0.5, 0.5, 0.5]
    assert [len(json.loads(line)["groups"]) for line in out.splitlines()] == [3, 3, 3]


def test_watch_survives_a_redis_blip(capsys: pytest.CaptureFixture[str]) -> None:
    calls: list[int] = []

    def step() -> None:
        calls.append(1)
        if len(calls) == 1:
            raise redis.ConnectionError("gone for a moment")
        if len(calls) == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        status.watch(step, 1.0, sleep=lambda _: None)

    assert len(calls) == 3
    assert "redis unavailable: gone for a moment" in capsys.readouterr().err
