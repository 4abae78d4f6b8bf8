"""The status view from registry data: live, dead and draining groups, rates, balancers; time passed in."""

from __future__ import annotations

import json
from dataclasses import replace

import redis

from broker.keys import INGRESS_GROUP, Keys
from broker.registry import GroupLoad, GroupStatus, parse_group
from ryzanstein.status import Snapshot, read_snapshot, render_table, request_rates, status_json

NOW_MS = 1_800_000_000_000
LOAD = GroupLoad(name="g-live", tp=1, model="echo", kv_dtype="none", kv_capacity_tokens=0, kv_used_tokens=0,
                 running=2, waiting=1, queue_depth=3, leader_pid=10, host="node-a", max_context=4096,
                 vocab_size=256, completed=100, tokens_per_s=50.0, metrics_port=9101)


def status_of(load: GroupLoad, *, age_s: float, now_ms: float = NOW_MS) -> GroupStatus:
    """What ``read_groups`` makes of the heartbeat ``load`` wrote ``age_s`` before ``now_ms``."""
    fields = load.to_fields()
    info = {k.encode(): v.encode() for k, v in zip(fields[::2], fields[1::2], strict=True)}
    info[b"heartbeat_ms"] = str(int(now_ms - age_s * 1000)).encode()
    status = parse_group(info, now_ms=now_ms, dead_after_s=3.0)
    assert status is not None
    return status


def three_groups(*, completed: int = 100, leader_pid: int = 10, now_ms: float = NOW_MS) -> list[GroupStatus]:
    return [
        status_of(replace(LOAD, completed=completed, leader_pid=leader_pid), age_s=0.4, now_ms=now_ms),
        status_of(replace(LOAD, name="g-dead", running=7, metrics_port=None), age_s=12.0, now_ms=now_ms),
        status_of(replace(LOAD, name="g-drain", state="draining", kv_capacity_tokens=2048, kv_used_tokens=512,
                          tokens_per_s=10.0), age_s=1.0, now_ms=now_ms),
    ]


def snapshot(groups: list[GroupStatus], *, at_s: float = 100.0) -> Snapshot:
    return Snapshot(groups=groups, ingress_depth=5, ingress_pending=2, balancers=[], taken_at_s=at_s)


def rows(text: str) -> dict[str, list[str]]:
    return {line.split()[0]: line.split() for line in text.splitlines() if line.startswith("g-")}


def test_live_dead_and_draining_groups_render_with_their_health() -> None:
    text = render_table(snapshot(three_groups()), width=200)

    table = rows(text)
    assert table["g-live"][1] == "ready" and table["g-dead"][1] == "DEAD" and table["g-drain"][1] == "DRAINING"
    live_line = next(line for line in text.splitlines() if line.startswith("g-live"))
    dead_line = next(line for line in text.splitlines() if line.startswith("g-dead"))
    assert "0.4s ago" in live_line and "12.0s ago" in dead_line
    assert live_line.endswith("node-a:9101") and dead_line.endswith(" -")  # metrics endpoint, or none
    assert "512/2048 (25%)" in text  # KV use of the group that has a cache; "-" for the echo ones
    assert table["g-live"][5] == "-"
    lines = text.splitlines()
    # totals count live groups only: the dead group's 7 running requests are not being served
    assert lines[-2] == "2/3 groups alive (1 draining); running 4, waiting 2, queued 6; 60.0 tok/s"
    assert lines[-1] == "ingress: 5 entries (2 being routed by balancers)"


def test_request_rates_between_two_snapshots() -> None:
    before = snapshot(three_groups(completed=100), at_s=100.0)
    after = snapshot(three_groups(completed=160, now_ms=NOW_MS + 2000), at_s=102.0)

    rates = request_rates(before, after)

    assert rates == {"g-live": 30.0, "g-dead": 0.0, "g-drain": 0.0}
    text = render_table(after, rates=rates, title="ryzanstein status: prefix 'ryz'", width=200)
    assert text.splitlines()[0] == "ryzanstein status: prefix 'ryz'"
    assert rows(text)["g-live"][11] == "30.0"
    assert text.splitlines()[-2].endswith("; 60.0 tok/s, 30.0 req/s")


def test_no_rate_across_a_restart_or_without_elapsed_time() -> None:
    before = snapshot(three_groups(completed=100), at_s=100.0)
    restarted = snapshot(three_groups(completed=5, leader_pid=11), at_s=102.0)

    assert "g-live" not in request_rates(before, restarted)
    assert request_rates(before, replace(before, taken_at_s=100.0)) == {}
    assert rows(render_table(restarted, rates=request_rates(before, restarted), width=200))["g-live"][11] == "-"


def test_json_keeps_the_contract_fields_and_adds_rates_and_endpoints() -> None:
    before = snapshot(three_groups(completed=100), at_s=100.0)
    after = snapshot(three_groups(completed=160), at_s=102.0)

    out = json.loads(json.dumps(status_json(after, request_rates(before, after))))

    groups = {g["name"]: g for g in out["groups"]}
    assert groups["g-live"]["requests_per_s"] == 30.0 and groups["g-live"]["metrics_port"] == 9101
    assert groups["g-dead"]["alive"] is False and groups["g-dead"]["metrics_port"] is None
    assert groups["g-drain"]["state"] == "draining" and groups["g-drain"]["alive"] is True
    assert (out["ingress_depth"], out["ingress_pending"], out["balancers"]) == (5, 2, [])


def test_snapshot_lists_balancers_and_what_they_hold(r: redis.Redis, keys: Keys) -> None:
    r.xgroup_create(keys.requests, INGRESS_GROUP, id="0", mkstream=True)
    for i in range(3):
        r.xadd(keys.requests, {"id": f"q{i}", "prompt": "x"})
    r.xreadgroup(INGRESS_GROUP, "bal-1", {keys.requests: ">"}, count=2)
    r.xreadgroup(INGRESS_GROUP, "bal-2", {keys.requests: ">"}, count=1)
    r.xack(keys.requests, INGRESS_GROUP, r.xinfo_consumers(keys.requests, INGRESS_GROUP)[1]["name"] and
           r.xpending_range(keys.requests, INGRESS_GROUP, "-", "+", 10, consumername="bal-2")[0]["message_id"])
    secs, micros = r.time()
    now_ms = secs * 1000 + micros // 1000
    r.zadd(keys.balancers, {"bal-1": now_ms - 500, "bal-2": now_ms - 300})  # both heartbeat: alive

    snap = read_snapshot(r, keys, dead_after_s=3.0, now_s=7.0, shards=1)

    assert (snap.ingress_depth, snap.ingress_pending, snap.taken_at_s) == (3, 2, 7.0)
    assert [(b.name, b.pending) for b in snap.balancers] == [("bal-1", 2), ("bal-2", 0)]
    assert 0.0 <= snap.balancers[0].idle_s < 5.0 and 0.3 <= snap.balancers[0].heartbeat_age_s < 5.0  # type: ignore[operator]
    text = render_table(snap)
    assert "no worker groups registered" in text
    assert [line.split()[:3] for line in text.splitlines() if line.startswith("bal-")] == [
        ["bal-1", "routing", "2"], ["bal-2", "reading", "0"]]


def test_an_idle_balancer_says_idle_and_a_stopped_one_gone() -> None:
    from ryzanstein.status import BalancerInfo

    # Redis' idle time of a balancer whose blocking reads return nothing grows, though it reads all along
    idle = BalancerInfo("bal-idle", pending=0, idle_s=26.6, heartbeat_age_s=0.4)
    gone = BalancerInfo("bal-gone", pending=3, idle_s=40.0, heartbeat_age_s=None)
    stale = BalancerInfo("bal-stale", pending=0, idle_s=40.0, heartbeat_age_s=30.0)
    text = render_table(Snapshot(groups=[], ingress_depth=0, ingress_pending=0, balancers=[idle, gone, stale],
                                 taken_at_s=0.0))
    states = {line.split()[0]: line.split()[1:] for line in text.splitlines() if line.startswith("bal-")}
    assert states == {"bal-idle": ["idle", "0", "0.4s", "ago"], "bal-gone": ["GONE", "3", "-"],
                      "bal-stale": ["GONE", "0", "30.0s", "ago"]}
    assert "26.6" not in text


def test_the_table_fits_80_columns_and_uses_more_when_there_are_more() -> None:
    long = [status_of(replace(LOAD, name="worker-0.pool-a", model="/models/Llama-3.1-8B-Instruct", served_models=["Llama-3.1-8B-Instruct"],
                              state=state, rank_weight_bytes=[2 << 30] * 2, rank_kv_bytes=[1 << 30] * 2,
                              kv_capacity_tokens=524288, kv_used_tokens=131072, host="a-long-node-name-17"),
                      age_s=0.4) for state in ("ready", "draining")]
    loading = status_of(replace(LOAD, name="worker-1.pool-a", model="/models/Llama-3.1-8B-Instruct", served_models=["Llama-3.1-8B-Instruct"],
                                state="loading", phase="KV allocation", kv_capacity_tokens=0), age_s=0.2)
    snap = snapshot([*long, loading])
    narrow = render_table(snap, width=80)
    assert max(map(len, narrow.splitlines())) <= 80, narrow
    header = narrow.splitlines()[0].split()
    assert header[:2] == ["GROUP", "STATE"] and {"RUN", "WAIT", "QUEUE", "KV"} <= set(header)
    table = rows(narrow.replace("worker-", "g-"))
    assert table["g-0.pool-a"][2] == "Llama-3.1-8B-Instruct"  # the served name, not the path
    assert "25%" in table["g-0.pool-a"]
    assert table["g-1.pool-a"][1] == "loading:KV"  # a loading group is listed, with its phase
    assert "(1 draining, 1 loading)" in narrow
    wide = render_table(snap, width=240)
    assert "WEIGHTS+KV/RANK" in wide and "131072/524288 (25%)" in wide
    assert max(map(len, wide.splitlines())) > 80


def test_groups_are_shown_by_served_model_with_their_names_and_versions() -> None:
    groups = [
        status_of(replace(LOAD, name="g-b1", model="/srv/models/chat-v2", served_models=["chat", "chat-latest"],
                          weights="w2"), age_s=0.1),
        status_of(replace(LOAD, name="g-a1", model="random:tiny", served_models=["random:tiny"], weights="t"),
                  age_s=0.1),
        status_of(replace(LOAD, name="g-a0", model="/srv/models/chat-v1", served_models=["chat"], weights="w1"),
                  age_s=9.0),
    ]
    text = render_table(snapshot(groups), width=200)
    table = [line.split() for line in text.splitlines() if line.startswith("g-")]
    assert [(row[0], row[3]) for row in table] == [("g-a0", "chat"), ("g-b1", "chat"), ("g-a1", "random:tiny")]
    assert "/srv/models" not in text
    assert "  chat: 1/2 groups alive, aliases chat-latest, 2 weights versions" in text.splitlines()
    assert "  random:tiny: 1/1 groups alive" in text.splitlines()
    out = json.loads(json.dumps(status_json(snapshot(groups))))
    assert out["models"] == {
        "chat": {"groups": ["g-a0", "g-b1"], "aliases": ["chat-latest"], "alive": 1, "weights": ["w1", "w2"]},
        "random:tiny": {"groups": ["g-a1"], "aliases": [], "alive": 1, "weights": ["t"]}}
    assert {g["name"]: g["model"] for g in out["groups"]}["g-b1"] == "/srv/models/chat-v2"  # the key kept as it was
    assert {g["name"]: g["served_models"] for g in out["groups"]}["g-b1"] == ["chat", "chat-latest"]


def test_status_counts_every_tenants_stream(r: redis.Redis, keys: Keys) -> None:
    """Depth, pending and unread per tenant, in the totals and each balancer's count too; the table lists the busiest tenants
    (TENANTS_SHOWN of them), --json all; a tenant whose stream does not exist counts as empty."""
    from ryzanstein.status import TENANTS_SHOWN

    tenants = [f"t{n:02d}" for n in range(TENANTS_SHOWN + 2)]
    r.sadd(keys.tenants, *tenants)
    r.xadd(keys.requests, {"id": "s", "prompt": "x"})
    for n, tenant in enumerate(tenants[1:], start=1):  # t01 one entry ... t11 eleven; t00 none
        stream = keys.tenant_requests(tenant)
        r.xgroup_create(stream, INGRESS_GROUP, id="0", mkstream=True)
        for i in range(n):
            r.xadd(stream, {"id": f"{tenant}-{i}", "prompt": "x"})
    r.xgroup_create(keys.requests, INGRESS_GROUP, id="0")
    r.xreadgroup(INGRESS_GROUP, "bal-1", {keys.requests: ">"}, count=1)
    r.xreadgroup(INGRESS_GROUP, "bal-1", {keys.tenant_requests("t11"): ">"}, count=3)

    snap = read_snapshot(r, keys, dead_after_s=3.0, now_s=0.0, shards=1)

    assert (snap.ingress_depth, snap.ingress_pending) == (1 + sum(range(1, len(tenants))), 4)
    assert [(b.name, b.pending) for b in snap.balancers] == [("bal-1", 4)]  # of every stream
    out = status_json(snap)["tenants"]
    assert out["t11"] == {"depth": 11, "pending": 3, "unread": 8} and out["t00"] == {"depth": 0, "pending": 0, "unread": 0}
    assert len(out) == len(tenants)
    lines = render_table(snap).splitlines()
    shown = [line.split()[1] for line in lines if line.startswith("  tenant ")]
    assert shown == [f"t{n:02d}:" for n in range(len(tenants) - 1, 1, -1)]  # busiest first, t01 left out
    assert lines[-1] == "  ... and 1 more tenants with entries (--json lists all)"


def test_status_counts_the_shards_and_removed_tenants(r: redis.Redis, keys: Keys) -> None:
    """Entries on the ingress shards (``RYZ_INGRESS_SHARDS``) and on a removed tenant's stream (still
    read by balancers) count in the totals and in each balancer's pending; the tenants listed are
    the current ones."""
    r.xgroup_create(keys.requests, INGRESS_GROUP, id="0", mkstream=True)
    r.xadd(keys.requests, {"id": "q", "prompt": "x"})
    r.xreadgroup(INGRESS_GROUP, "bal-1", {keys.requests: ">"})
    r.xgroup_create(keys.requests_shard(0), INGRESS_GROUP, id="0", mkstream=True)
    for i in range(3):
        r.xadd(keys.requests_shard(0), {"id": f"s{i}", "prompt": "x"})
    r.xadd(keys.requests_shard(2), {"id": "late", "prompt": "x"})  # no consumer group yet
    r.xreadgroup(INGRESS_GROUP, "bal-1", {keys.requests_shard(0): ">"}, count=2)
    r.sadd(keys.tenants, "alice")
    r.sadd(keys.tenants_removed, "carol")
    r.xadd(keys.tenant_requests("carol"), {"id": "c", "prompt": "x"})

    snap = read_snapshot(r, keys, dead_after_s=3.0, now_s=0.0, shards=3)

    assert (snap.ingress_depth, snap.ingress_pending) == (1 + 3 + 1 + 1, 1 + 2)
    assert [(b.name, b.pending) for b in snap.balancers] == [("bal-1", 1 + 2)]
    assert [t.tenant for t in snap.tenants] == ["alice"]
    # read without the shards, as a status command without the setting would
    assert read_snapshot(r, keys, dead_after_s=3.0, now_s=0.0, shards=1).ingress_depth == 1 + 1
