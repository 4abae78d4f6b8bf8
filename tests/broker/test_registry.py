"""The worker-group registry: heartbeats in, GroupStatus out, alive or dead by age on the Redis clock."""

from __future__ import annotations

import dataclasses

import pytest
import redis

from broker.keys import Keys
from broker.registry import GroupLoad, GroupStatus, parse_group, read_groups
from broker.scripts import Scripts

HB_MS = 1_700_000_000_000


def load(name: str = "g1", **changes: object) -> GroupLoad:
    base = GroupLoad(
        name=name,
        tp=2,
        model="random:tiny",
        kv_dtype="fp8_e4m3",
        kv_capacity_tokens=4096,
        kv_used_tokens=128,
        running=3,
        waiting=1,
        queue_depth=4,
        leader_pid=4242,
        host="node-a",
        max_context=2048,
        vocab_size=32000,
        completed=17,
        tokens_per_s=123.5,
    )
    return dataclasses.replace(base, **changes)


def info_of(group: GroupLoad, heartbeat_ms: int = HB_MS) -> dict[bytes, bytes]:
    """The info hash as HGETALL returns it after a heartbeat."""
    fields = group.to_fields()
    info = {fields[i].encode(): fields[i + 1].encode() for i in range(0, len(fields), 2)}
    info[b"heartbeat_ms"] = str(heartbeat_ms).encode()
    return info


def test_heartbeat_fields_round_trip() -> None:
    group = load(state="draining", rank_weight_bytes=[2_000_000, 1_999_000], rank_kv_bytes=[4096, 4096],
                 rank_hosts=["node-a", "node-b"])
    status = parse_group(info_of(group), now_ms=HB_MS + 500, dead_after_s=3.0)
    assert status is not None
    assert GroupLoad(**{f.name: getattr(status, f.name) for f in dataclasses.fields(GroupLoad)}) == group
    assert status.heartbeat_ms == HB_MS
    assert status.heartbeat_age_s == pytest.approx(0.5)


def test_heartbeat_of_a_group_without_per_rank_memory() -> None:
    info = info_of(load())
    del info[b"rank_weight_bytes"], info[b"rank_kv_bytes"], info[b"rank_hosts"]  # a build before these fields
    status = parse_group(info, now_ms=HB_MS, dead_after_s=3.0)
    assert status is not None and status.rank_weight_bytes == [] and status.rank_kv_bytes == []
    assert status.rank_hosts == []


def test_a_heartbeat_with_rank_hosts_that_are_not_names_is_refused() -> None:
    info = info_of(load())
    info[b"rank_hosts"] = b"[1, 2]"
    assert parse_group(info, now_ms=HB_MS, dead_after_s=3.0) is None


@pytest.mark.parametrize(
    ("age_ms", "alive"), [(0, True), (1000, True), (3000, True), (3001, False), (60_000, False)]
)
def test_alive_or_dead_by_heartbeat_age(age_ms: int, alive: bool) -> None:
    status = parse_group(info_of(load()), now_ms=HB_MS + age_ms, dead_after_s=3.0)
    assert status is not None
    assert status.alive is alive
    assert status.routable is alive
    assert status.heartbeat_age_s == pytest.approx(age_ms / 1000)


def test_a_heartbeat_from_the_future_has_age_zero() -> None:
    status = parse_group(info_of(load()), now_ms=HB_MS - 5000, dead_after_s=3.0)
    assert status is not None
    assert (status.heartbeat_age_s, status.alive) == (0.0, True)


def test_a_draining_group_is_alive_but_not_routable() -> None:
    status = parse_group(info_of(load(state="draining")), now_ms=HB_MS, dead_after_s=3.0)
    assert status is not None
    assert status.alive and not status.routable


@pytest.mark.parametrize(
    "missing", [b"tp", b"model", b"host", b"heartbeat_ms", b"queue_depth", b"vocab_size", b"leader_pid"]
)
def test_incomplete_info_is_ignored(missing: bytes) -> None:
    info = info_of(load())
    del info[missing]
    assert parse_group(info, now_ms=HB_MS, dead_after_s=3.0) is None


@pytest.mark.parametrize(
    ("field", "value"),
    [(b"tp", b"two"), (b"running", b""), (b"heartbeat_ms", b"1.5e12"), (b"tokens_per_s", b"fast")],
)
def test_malformed_info_is_ignored(field: bytes, value: bytes) -> None:
    info = info_of(load())
    info[field] = value
    assert parse_group(info, now_ms=HB_MS, dead_after_s=3.0) is None


def test_optional_and_unknown_fields() -> None:
    info = info_of(load())
    for optional in (b"state", b"tokens_per_s"):
        del info[optional]
    info[b"future_field"] = b"x"
    info[b"alive"] = b"0"  # a reader computes these; a writer cannot fake them
    info[b"heartbeat_age_s"] = b"999"
    status = parse_group(info, now_ms=HB_MS, dead_after_s=3.0)
    assert status is not None
    assert (status.state, status.tokens_per_s) == ("ready", 0.0)
    assert (status.alive, status.heartbeat_age_s) == (True, 0.0)


def test_status_json_has_the_contract_fields() -> None:
    status = parse_group(info_of(load()), now_ms=HB_MS + 1500, dead_after_s=3.0)
    assert status is not None
    out = status.to_json()
    contract = {
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
    assert contract <= out.keys()
    assert (out["name"], out["alive"], out["tp"], out["heartbeat_age_s"]) == ("g1", True, 2, 1.5)


# --- read_groups on a real Redis --------------------------------------------------------------------------


def heartbeat(r: redis.Redis, keys: Keys, group: GroupLoad) -> int:
    return int(
        Scripts(r).heartbeat(
            registry=keys.groups, info=keys.group_info(group.name), group=group.name, fields=group.to_fields()
        )
    )


def test_read_groups_alive_dead_and_incomplete(r: redis.Redis, keys: Keys) -> None:
    heartbeat(r, keys, load("b-alive"))
    # A group whose last heartbeat was 10 s ago on the server's clock.
    secs, micros = r.time()
    old_ms = secs * 1000 + micros // 1000 - 10_000
    r.hset(keys.group_info("a-dead"), mapping=info_of(load("a-dead"), heartbeat_ms=old_ms))
    r.zadd(keys.groups, {"a-dead": old_ms})
    # Registered, but its info hash is gone (being removed) or half-written.
    r.zadd(keys.groups, {"c-gone": old_ms, "d-partial": old_ms})
    r.hset(keys.group_info("d-partial"), mapping={"tp": "1", "heartbeat_ms": str(old_ms)})

    groups = read_groups(r, keys, dead_after_s=3.0)
    assert [g.name for g in groups] == ["a-dead", "b-alive"]
    dead, alive = groups
    assert isinstance(dead, GroupStatus)
    assert not dead.alive and dead.heartbeat_age_s == pytest.approx(10.0, abs=1.0)
    assert alive.alive and alive.heartbeat_age_s < 1.0
    assert (alive.running, alive.kv_dtype, alive.tokens_per_s) == (3, "fp8_e4m3", 123.5)


def test_dead_after_is_a_parameter(r: redis.Redis, keys: Keys) -> None:
    secs, micros = r.time()
    ms = secs * 1000 + micros // 1000 - 2_000
    r.hset(keys.group_info("g"), mapping=info_of(load("g"), heartbeat_ms=ms))
    r.zadd(keys.groups, {"g": ms})
    assert [g.alive for g in read_groups(r, keys, dead_after_s=60.0)] == [True]
    assert [g.alive for g in read_groups(r, keys, dead_after_s=1.0)] == [False]


def test_read_groups_of_an_empty_registry(r: redis.Redis, keys: Keys) -> None:
    assert read_groups(r, keys, dead_after_s=3.0) == []


def test_read_groups_sees_only_its_prefix(r: redis.Redis, keys: Keys) -> None:
    heartbeat(r, keys, load("mine"))
    heartbeat(r, Keys(keys.prefix + "x"), load("theirs"))
    assert [g.name for g in read_groups(r, keys, dead_after_s=3.0)] == ["mine"]
