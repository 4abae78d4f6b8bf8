"""Redis Cluster and Sentinel URLs (broker.redis_url, broker.connection) and the per-node Wire
(broker.wire_cluster), on a real local cluster (tests/redis_cluster.py)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import redis
from redis.cluster import RedisCluster

from broker.cluster_client import command_keys
from broker.connection import connect, connect_async, is_cluster, mask_url, pipe_time
from broker.errors import ConfigError
from broker.keys import key_slot
from broker.redis_url import RedisTarget, parse_url
from broker.scripts import Scripts
from broker.settings import Settings
from broker.wire import Batch
from broker.wire_cluster import ClusterWire
from tests.redis_cluster import LocalCluster


@pytest.mark.parametrize(("url", "target"), [
    ("redis+cluster://10.0.0.1:7000,10.0.0.2:7001",
     RedisTarget("cluster", "", (("10.0.0.1", 7000), ("10.0.0.2", 7001)))),
    ("rediss+cluster://app:s%40cret@h1,[::1]:7002/",
     RedisTarget("cluster", "", (("h1", 6379), ("::1", 7002)), "app", "s@cret", tls=True)),
    ("redis+sentinel://:pw@s1:26380,s2/mymaster/3",
     RedisTarget("sentinel", "", (("s1", 26380), ("s2", 26379)), None, "pw", service="mymaster", db=3)),
    ("rediss+sentinel://s1/mymaster", RedisTarget("sentinel", "", (("s1", 26379),), tls=True, service="mymaster")),
])
def test_parse_cluster_and_sentinel_urls(url: str, target: RedisTarget) -> None:
    got = parse_url(url)
    assert (got.kind, got.nodes, got.username, got.password, got.tls, got.service, got.db) == (
        target.kind, target.nodes, target.username, target.password, target.tls, target.service, target.db)


def test_single_server_urls_pass_through() -> None:
    for url in ("redis://h:1/2", "rediss://u:p@h:1", "unix:///tmp/r.sock"):
        assert parse_url(url) == RedisTarget("single", url)


@pytest.mark.parametrize("url", [
    "redis+cluster://h:1/2",  # cluster mode has db 0 only
    "redis+cluster://h:port",
    "redis+cluster://h:1,,h:2",
    "redis+cluster://u:secret@h:1?ssl=1",
    "redis+sentinel://u:secret@h:1",  # no service name
    "redis+sentinel://h:1/svc/db",
])
def test_bad_urls_are_config_errors_that_hide_the_password(url: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_url(url)
    assert "secret" not in str(err.value)


def test_mask_url_hides_a_cluster_password() -> None:
    assert mask_url("redis+cluster://app:secret@h1:7000,h2:7001") == "redis+cluster://app:***@h1:7000,h2:7001"
    assert mask_url("redis+sentinel://:secret@s1/mymaster/0") == "redis+sentinel://:***@s1/mymaster/0"


def test_connect_gives_a_cluster_client_that_reaches_every_master(cluster_url: str,
                                                                  redis_cluster: LocalCluster) -> None:
    client = connect(cluster_url, Settings())
    assert isinstance(client, RedisCluster) and is_cluster(client)
    names = [f"k{i}" for i in range(30)]
    for name in names:
        client.set(name, name)
    assert {redis_cluster.master_of(n) for n in names} == set(redis_cluster.primaries())
    assert [client.get(n) for n in names] == [n.encode() for n in names]
    client.close()


def test_connect_async_gives_an_asyncio_cluster_client(cluster_url: str) -> None:
    async def roundtrip() -> list[bytes | None]:
        client = connect_async(cluster_url, Settings())
        assert is_cluster(client)
        for i in range(10):
            await client.set(f"a{i}", i)
        got = [await client.get(f"a{i}") for i in range(10)]
        await client.aclose()
        return got

    assert asyncio.run(roundtrip()) == [str(i).encode() for i in range(10)]


def _one_key_per_master(cluster: LocalCluster) -> list[str]:
    keys: dict[int, str] = {}
    i = 0
    while len(keys) < len(cluster.primaries()):
        keys.setdefault(cluster.master_of(f"w{i}"), f"w{i}")
        i += 1
    return list(keys.values())


def test_cluster_wire_sends_each_command_to_its_master_and_keeps_the_batch_order(
        cluster_url: str, redis_cluster: LocalCluster) -> None:
    client = connect(cluster_url, Settings())
    scripts = Scripts(client)
    assert isinstance(scripts.wire, ClusterWire)
    names = _one_key_per_master(redis_cluster)
    for name in names:
        client.xadd(f"{{{name}}}:s", {"f": name})
    batch = Batch()
    handles = []
    for name in names:
        handles.append(batch.set_nx(name, name, px=10_000))
        handles.append(batch.xread({f"{{{name}}}:s": "0"}))
        handles.append(batch.get(name))
    replies = scripts.wire.execute(batch)
    for n, name in enumerate(names):
        ok, read, got = (replies[h] for h in handles[3 * n: 3 * n + 3])
        assert ok is True or ok == b"OK"
        assert read[0][0] == f"{{{name}}}:s".encode() and read[0][1][0][1] == {b"f": name.encode()}
        assert got == name.encode()
    scripts.wire.close()
    client.close()


def test_cluster_wire_follows_moved_and_patches_the_slot_map(cluster_url: str, redis_cluster: LocalCluster) -> None:
    client = connect(cluster_url, Settings())
    wire = ClusterWire(client)  # type: ignore[arg-type]
    client.set("moved-key", "v")
    slot = key_slot("moved-key")
    manager = client.nodes_manager  # type: ignore[attr-defined]
    right = manager.slots_cache[slot][0]
    wrong = next(n for n in manager.get_nodes_by_server_type("primary") if n.name != right.name)
    manager.slots_cache[slot] = [wrong]  # a stale map, as after a failover or a resharding
    batch = Batch()
    batch.get("moved-key")
    assert wire.execute(batch) == [b"v"]
    assert manager.slots_cache[slot][0].name == right.name
    wire.close()
    client.close()


def test_cluster_wire_follows_ask_during_a_slot_migration(cluster_url: str, redis_cluster: LocalCluster) -> None:
    client = connect(cluster_url, Settings())
    wire = ClusterWire(client)  # type: ignore[arg-type]
    key = "ask-key"
    slot = key_slot(key)
    source = redis_cluster.master_of(key)
    target = next(p for p in redis_cluster.primaries() if p != source)
    with redis_cluster.node(source) as src, redis_cluster.node(target) as dst:
        src_id, dst_id = src.cluster("myid"), dst.cluster("myid")
        dst.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", src_id)
        src.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", dst_id)
        try:
            batch = Batch()
            batch.set_nx(key, "moved", px=60_000)  # absent on the source: ASK, then ASKING + SET on the target
            assert wire.execute(batch)[0] in (True, b"OK")
            assert dst.execute_command("ASKING") and dst.get(key) == b"moved"
        finally:
            for node in (src, dst):
                node.execute_command("CLUSTER", "SETSLOT", slot, "STABLE")  # the key left behind: flushed
    wire.close()
    client.close()


def test_cluster_wire_reloads_scripts_on_every_master(cluster_url: str, redis_cluster: LocalCluster) -> None:
    client = connect(cluster_url, Settings())
    scripts = Scripts(client)
    scripts.load()
    for port in redis_cluster.primaries():
        with redis_cluster.node(port) as node:
            assert node.script_exists(scripts._heartbeat.sha) == [True]
    client.close()


def test_a_cross_slot_command_fails_loudly_on_the_cluster(cluster_url: str) -> None:
    client = connect(cluster_url, Settings())
    wire = ClusterWire(client)  # type: ignore[arg-type]
    batch = Batch()
    batch.xread({"{a}:s": "0", "{b}:s": "0"})
    (reply,) = wire.execute(batch)
    assert isinstance(reply, redis.exceptions.ClusterCrossSlotError)
    with pytest.raises(redis.exceptions.RedisClusterException), client.pipeline(transaction=True) as pipe:
        pipe.set("{a}:x", 1)
        pipe.set("{b}:x", 1)
        pipe.execute()
    client.close()


def test_an_unreachable_cluster_is_one_line_without_the_password(tmp_path: object) -> None:
    import subprocess
    import sys

    from tests.redis_cluster import cluster_ports

    ports = cluster_ports(2)  # free: nothing listens there
    url = f"redis+cluster://app:secretpw@127.0.0.1:{ports[0]},127.0.0.1:{ports[1]}"
    done = subprocess.run([sys.executable, "-m", "ryzanstein", "status", "--redis-url", url], capture_output=True,
                          text=True, timeout=60, check=False)
    assert done.returncode == 1
    assert done.stderr.startswith(f"ryzanstein status: cannot reach the Redis Cluster at 127.0.0.1:{ports[0]},")
    assert "secretpw" not in done.stderr + done.stdout and "Traceback" not in done.stderr


def test_the_balancer_reads_the_registry_masters_uptime(cluster_url: str,
                                                                     redis_cluster: LocalCluster) -> None:
    from balancer.service import Balancer
    from broker.keys import Keys

    client = connect(cluster_url, Settings())
    balancer = Balancer(client, settings=Settings(redis_url=cluster_url, prefix="up"), name="b")
    with redis_cluster.node(redis_cluster.master_of(Keys("up").groups)) as registry:
        uptime = float(registry.info("server")["uptime_in_seconds"])
    assert abs(balancer._redis_uptime_s() - uptime) <= 1.0
    client.close()


@pytest.mark.parametrize(("args", "keys"), [
    (("XREADGROUP", "GROUP", "g", "c", "COUNT", 1, "STREAMS", "a", "b", ">", ">"), ["a", "b"]),
    ((b"XREAD", b"BLOCK", 5, b"STREAMS", b"s", b"0"), [b"s"]),
    (("EVAL", "return 1", 2, "k1", "k2", "arg"), ["k1", "k2"]),
    (("evalsha", "abc", "1", b"k"), [b"k"]),
    (("FCALL_RO", "f", 0, "arg"), []),
    (("EVALSHA", "abc", 3, "k"), None),  # more keys than arguments: Redis' own error says so
    (("EVAL", "x", "many"), None),
    (("XREAD", "COUNT", 1), None),
    (("GET", "k"), None),
])
def test_movable_keys_are_read_from_the_command(args: tuple[Any, ...], keys: list[Any] | None) -> None:
    assert command_keys(args) == keys


def test_stream_reads_and_scripts_survive_the_death_of_the_clients_default_node() -> None:
    """redis-py asks its default node for the keys of XREAD/XREADGROUP, and in a pipeline for those of
    EVAL/EVALSHA too: once that node died, every such command failed for ever, its replica promoted or
    not, as nothing on that path reads the slot map again (broker.cluster_client). The commands here
    go to a master that stays up, at once after the kill."""
    with LocalCluster() as cluster:
        client = connect(cluster.url, Settings())
        dead = int(client.get_default_node().port)  # type: ignore[attr-defined]
        key = next(k for k in (f"s{i}" for i in range(100)) if cluster.master_of(k) != dead)  # stays up
        client.xadd(key, {"f": "v"})
        client.xgroup_create(key, "g", id="0")
        sha = client.script_load("return redis.call('XLEN', KEYS[1])")  # type: ignore[no-untyped-call]

        async def scenario() -> Any:
            aclient = connect_async(cluster.url, Settings())
            await aclient.xadd(key, {"f": "w"})  # the slot map read while every node lives
            cluster.kill(dead)
            assert client.xread({key: "0"})[0][1][0][1] == {b"f": b"v"}
            assert client.xreadgroup("g", "c", {key: ">"}, count=1)[0][1][0][1] == {b"f": b"v"}
            assert client.evalsha(sha, 1, key) == 2
            pipe = client.pipeline(transaction=False)
            pipe_time(pipe, key)  # an EVAL: the registry read's clock (broker.registry)
            pipe.execute_command("EVALSHA", sha, 1, key)
            pipe.xreadgroup("g", "c", {key: ">"})
            pipe.xlen(key)
            (secs, _micros), length, (read,), xlen = pipe.execute()
            assert int(secs) > 0 and length == 2 and read[1][0][1] == {b"f": b"w"} and xlen == 2
            aclient.get_default_node = lambda: next(  # type: ignore[method-assign]
                n for n in aclient.get_nodes() if n.port == dead)  # type: ignore[attr-defined]
            got = await aclient.xread({key: "0"})
            assert await aclient.evalsha(sha, 1, key) == 2
            apipe = aclient.pipeline(transaction=False)
            apipe.execute_command("EVALSHA", sha, 1, key)
            apipe.xread({key: "0"})
            assert (await apipe.execute())[0] == 2
            await aclient.aclose()
            return got

        assert len(asyncio.run(scenario())[0][1]) == 2
        client.close()
