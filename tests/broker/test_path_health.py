"""Health of the whole request path (broker.path_health): the rule, what is read from a real Redis,
and how the gateway's /health and ``ryzanstein health`` answer with it."""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys

import pytest
import redis
from starlette.testclient import TestClient

from broker.keys import INGRESS_GROUP, Keys
from broker.path_health import PathView, judge, read_path
from broker.registry import GroupLoad, parse_group
from broker.settings import Settings
from producer.gateway.app import create_app
from producer.gateway.config import GatewayConfig

LIMIT_S = 10.0


def _group(name: str = "g1", *, state: str = "ready", alive: bool = True) -> object:
    load = GroupLoad(name=name, tp=1, model="m", kv_dtype="fp8_e4m3", kv_capacity_tokens=0, kv_used_tokens=0,
                     running=0, waiting=0, queue_depth=0, leader_pid=1, host="h", max_context=64, vocab_size=256,
                     state=state)
    info = {k.encode(): v.encode() for k, v in zip(*[iter(load.to_fields())] * 2)}
    info[b"heartbeat_ms"] = b"1000"
    status = parse_group(info, now_ms=1000.0 if alive else 10_000.0, dead_after_s=3.0)
    assert status is not None
    return status


HEALTHY = PathView(groups=[_group()], balancer_age_s=0.5, unread=0, oldest_unread_age_s=None)  # type: ignore[list-item]


def test_a_working_path_is_healthy() -> None:
    health = judge(HEALTHY, balancer_dead_after_s=LIMIT_S)
    assert health.ok and health.reason == "ok" and health.serving == ["g1"] and health.models == ["m"]


@pytest.mark.parametrize(("change", "says"), [
    ({"balancer_age_s": None}, "no balancer is running"),
    ({"balancer_age_s": None, "unread": 3, "oldest_unread_age_s": 1.0}, "no balancer is running (3 requests waiting)"),
    ({"balancer_age_s": LIMIT_S + 1}, "no balancer has read the ingress stream for 11s"),
    # a balancer heartbeats, yet requests wait unread past the limit: nobody reads them
    ({"unread": 2, "oldest_unread_age_s": LIMIT_S + 5}, "2 requests have waited 15s unread by any balancer"),
    ({"groups": []}, "no live worker group"),
    ({"groups": [_group(alive=False)]}, "no live worker group"),
    ({"groups": [_group(state="draining")]}, "no live worker group"),
    ({"groups": [_group(state="loading")]}, "no live worker group (1 loading)"),
])
def test_each_broken_part_makes_the_path_unhealthy(change: dict[str, object], says: str) -> None:
    health = judge(dataclasses.replace(HEALTHY, **change), balancer_dead_after_s=LIMIT_S)  # type: ignore[arg-type]
    assert not health.ok and health.reason == says


def test_a_model_without_a_live_group_makes_the_path_unhealthy() -> None:
    chat = _group("g2")
    chat.served_models = ["chat"]  # type: ignore[attr-defined]
    dead_chat = _group("g3", alive=False)
    dead_chat.served_models = ["chat"]  # type: ignore[attr-defined]
    assert judge(dataclasses.replace(HEALTHY, groups=[_group(), chat, dead_chat]),  # type: ignore[list-item]
                 balancer_dead_after_s=LIMIT_S).ok
    health = judge(dataclasses.replace(HEALTHY, groups=[_group(), dead_chat]),  # type: ignore[list-item]
                   balancer_dead_after_s=LIMIT_S)
    assert not health.ok and health.reason == "no live worker group serves chat" and health.models == ["m"]


def test_requests_waiting_less_than_the_limit_are_not_a_problem() -> None:
    view = dataclasses.replace(HEALTHY, unread=5, oldest_unread_age_s=LIMIT_S - 1)
    assert judge(view, balancer_dead_after_s=LIMIT_S).ok


# --- read from a real Redis ---------------------------------------------------------------------


def _now_ms(r: redis.Redis) -> int:
    secs, micros = r.time()
    return secs * 1000 + micros // 1000


def _register(r: redis.Redis, keys: Keys, name: str = "g1") -> None:
    load = _group(name)
    beat_ms = _now_ms(r) + 3_600_000  # stays alive for the whole test
    fields = dict(zip(*[iter(GroupLoad.to_fields(load))] * 2))  # type: ignore[arg-type]
    r.hset(keys.group_info(name), mapping={**fields, "heartbeat_ms": beat_ms})
    r.zadd(keys.groups, {name: beat_ms})


def test_read_path_sees_balancers_and_unread_requests(r: redis.Redis, keys: Keys) -> None:
    view = read_path(r, keys, dead_after_s=3.0, shards=1)
    assert (view.groups, view.balancer_age_s, view.unread, view.oldest_unread_age_s) == ([], None, 0, None)

    now = _now_ms(r)
    # no consumer group yet (no balancer ever started): every entry is unread
    r.xadd(keys.requests, {"id": "a"}, id=f"{now - 20_000}-0")
    view = read_path(r, keys, dead_after_s=3.0, shards=1)
    assert view.unread == 1 and 19.0 < view.oldest_unread_age_s < 30.0  # type: ignore[operator]

    # a balancer read the first entry; a second one arrived since and waits
    r.xgroup_create(keys.requests, INGRESS_GROUP, id="0")
    r.xreadgroup(INGRESS_GROUP, "b1", {keys.requests: ">"}, count=1)
    r.xadd(keys.requests, {"id": "b"}, id=f"{now - 12_000}-0")
    r.zadd(keys.balancers, {"b1": now - 4_000})
    _register(r, keys)
    view = read_path(r, keys, dead_after_s=3.0, shards=1)
    assert [g.name for g in view.groups] == ["g1"]
    assert 4.0 <= view.balancer_age_s < 10.0  # type: ignore[operator]
    assert view.unread == 1 and 12.0 <= view.oldest_unread_age_s < 20.0  # type: ignore[operator]
    assert judge(view, balancer_dead_after_s=LIMIT_S).reason == "1 requests have waited 12s unread by any balancer"

    r.xreadgroup(INGRESS_GROUP, "b1", {keys.requests: ">"})  # read at last
    r.zadd(keys.balancers, {"b1": _now_ms(r)})
    view = read_path(r, keys, dead_after_s=3.0, shards=1)
    assert (view.unread, view.oldest_unread_age_s) == (0, None)
    assert judge(view, balancer_dead_after_s=LIMIT_S).ok


# --- the gateway's /health and `ryzanstein health` ------------------------------------------------


def test_gateway_health_fails_without_a_balancer(r: redis.Redis, keys: Keys, settings: Settings,
                                                 redis_url: str) -> None:
    _register(r, keys)
    with TestClient(create_app(settings, redis_url, GatewayConfig())) as http:
        answer = http.get("/health")
        assert answer.status_code == 503
        assert answer.json()["status"] == "unavailable" and answer.json()["reason"] == "no balancer is running"
        r.zadd(keys.balancers, {"b1": _now_ms(r)})
        answer = http.get("/health")
        assert answer.status_code == 200
        assert answer.json() == {"status": "ok", "reason": "ok", "groups": 1, "models": ["m"], "in_flight": 0}
        r.zadd(keys.balancers, {"b1": _now_ms(r) - 60_000})  # its last read was a minute ago
        answer = http.get("/health")
        assert answer.status_code == 503
        assert answer.json()["reason"] == "no balancer has read the ingress stream for 60s"


def test_health_command_fails_without_a_balancer(r: redis.Redis, keys: Keys, subprocess_env: dict[str, str]) -> None:
    _register(r, keys)

    def health() -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "ryzanstein", "health"], env=subprocess_env,
                              capture_output=True, text=True, timeout=60, check=False,
                              cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))))

    done = health()
    assert done.returncode == 1
    assert done.stdout.strip() == "unhealthy: no balancer is running (1 of 1 groups alive and taking work)"
    r.zadd(keys.balancers, {"b1": _now_ms(r)})
    done = health()
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.startswith("ok: 1 of 1 groups alive and taking work")


def test_tenants_streams_count_as_waiting_but_their_entry_ids_age_nothing(
        r: redis.Redis, keys: Keys, subprocess_env: dict[str, str]) -> None:
    """alice's unread entries are counted (the health line names her); an entry id she chose far in
    the past (after deleting her stream) makes no one think the path broken; bob's stream, never
    made, is empty."""
    _register(r, keys)
    r.sadd(keys.tenants, "alice", "bob")
    r.zadd(keys.balancers, {"b1": _now_ms(r)})
    r.xadd(keys.tenant_requests("alice"), {"id": "old"}, id="1-0")  # no consumer group: all unread
    r.xgroup_create(keys.tenant_requests("alice"), INGRESS_GROUP, id="0")
    r.xadd(keys.tenant_requests("alice"), {"id": "new"})
    view = read_path(r, keys, dead_after_s=3.0, shards=1)
    assert (view.unread, view.oldest_unread_age_s, view.tenants) == (0, None, {"alice": 2, "bob": 0})
    assert judge(view, balancer_dead_after_s=LIMIT_S).ok
    r.zadd(keys.balancers, {"b1": _now_ms(r) - 60_000})
    assert judge(read_path(r, keys, dead_after_s=3.0, shards=1), balancer_dead_after_s=LIMIT_S).reason == (
        "no balancer has read the ingress stream for 60s (2 requests waiting)")
    r.zadd(keys.balancers, {"b1": _now_ms(r)})
    done = subprocess.run([sys.executable, "-m", "ryzanstein", "health"], env=subprocess_env,
                          capture_output=True, text=True, timeout=60, check=False,
                          cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.strip().endswith("; unread on tenants' streams: alice 2")


def test_shards_and_removed_tenants_count(r: redis.Redis, keys: Keys, settings: Settings, redis_url: str,
                                          subprocess_env: dict[str, str]) -> None:
    """A request waiting unread on an ingress shard (``RYZ_INGRESS_SHARDS``) counts, in the number
    waiting and in the age, as on ``{p}:requests``; a removed tenant's stream (still read by
    balancers) counts in the number waiting. The gateway and ``ryzanstein health`` read the shards
    their settings name."""
    _register(r, keys)
    r.zadd(keys.balancers, {"b1": _now_ms(r)})
    now = _now_ms(r)
    r.xadd(keys.requests_shard(1), {"id": "s"}, id=f"{now - 20_000}-0")  # no consumer group: unread
    r.sadd(keys.tenants_removed, "carol")
    r.xadd(keys.tenant_requests("carol"), {"id": "c"})
    view = read_path(r, keys, dead_after_s=3.0, shards=2)
    assert view.unread == 1 and 19.0 < view.oldest_unread_age_s < 30.0  # type: ignore[operator]
    assert view.tenants == {"carol": 1}
    assert judge(view, balancer_dead_after_s=LIMIT_S).reason == "1 requests have waited 20s unread by any balancer"
    assert read_path(r, keys, dead_after_s=3.0, shards=1).unread == 0  # a stack without shards has no such stream

    with TestClient(create_app(settings.model_copy(update={"ingress_shards": 2}), redis_url, GatewayConfig())) as http:
        answer = http.get("/health")
    waited = re.compile(r"^1 requests have waited [0-9]+s unread by any balancer")  # (20 s and counting)
    assert answer.status_code == 503 and waited.match(answer.json()["reason"]), answer.json()
    done = subprocess.run([sys.executable, "-m", "ryzanstein", "health"], env={**subprocess_env, "RYZ_INGRESS_SHARDS": "2"},
                          capture_output=True, text=True, timeout=60, check=False,
                          cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
    assert done.returncode == 1 and waited.match(done.stdout.removeprefix("unhealthy: ")), done.stdout
    assert done.stdout.rstrip().endswith("unread on tenants' streams: carol 1")
