"""``redis+sentinel://`` URLs on a real Sentinel over a master and its replica (tests/redis_cluster.py):
clients, the hot path's ``Wire`` and the pipeline processes follow the master through a failover."""

from __future__ import annotations

import asyncio
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from broker.connection import TRANSIENT_ERRORS, connect, connect_async
from broker.keys import Keys
from broker.scripts import Scripts
from broker.settings import Settings
from broker.wire import Batch
from producer.client import Client
from tests.integration.conftest import Procs, wait_for, wait_groups
from tests.integration.test_backends import STARTUP_S
from tests.redis_cluster import LocalSentinel

pytestmark = pytest.mark.integration


@pytest.fixture
def sentinel() -> Iterator[LocalSentinel]:
    with LocalSentinel() as own:
        yield own


def master_port(client: redis.Redis) -> int:
    return int(client.info("server")["tcp_port"])


def eventually(fn: object, *, timeout: float = 30.0) -> object:
    """``fn()`` once it stops failing for want of a master (a failover in progress)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return fn()  # type: ignore[operator]
        except (*TRANSIENT_ERRORS, redis.ReadOnlyError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def test_sentinel_url_follows_the_master_through_a_failover(sentinel: LocalSentinel) -> None:
    client = connect(sentinel.url, Settings())
    scripts = Scripts(client)
    assert master_port(client) == sentinel.master_port
    client.set("k", "before")
    assert client.wait(1, 2000) == 1
    sentinel.kill_master()
    assert eventually(lambda: master_port(client)) == sentinel.replica_port  # promoted by the Sentinel
    assert client.get("k") == b"before"
    batch = Batch()
    batch.set_nx("n", "after", px=60_000)
    batch.get("k")
    assert eventually(lambda: scripts.wire.execute(batch))[1] == b"before"  # type: ignore[index]

    async def read_async() -> bytes | None:
        aclient = connect_async(sentinel.url, Settings())
        got: bytes | None = await aclient.get("n")
        await aclient.aclose()
        return got

    assert asyncio.run(read_async()) == b"after"
    client.close()


def test_pipeline_on_a_sentinel_url(sentinel: LocalSentinel, keys: Keys, tmp_path: Path,
                                    request: pytest.FixtureRequest) -> None:
    (tmp_path / "logs").mkdir()
    procs = Procs({**os.environ, "RYZ_REDIS_URL": sentinel.url, "RYZ_PREFIX": keys.prefix, "PYTHONUNBUFFERED": "1"},
                  tmp_path / "logs")
    try:
        r = connect(sentinel.url, Settings())
        procs.balancer()
        procs.worker("g1")
        wait_groups(r, keys, {"g1"}, timeout=STARTUP_S)
        client = Client(sentinel.url, prefix=keys.prefix)
        assert client.generate("through the sentinel", max_tokens=64, timeout=30).text == "through the sentinel"
        assert r.wait(1, 2000) == 1
        sentinel.kill_master()
        wait_for(lambda: eventually(lambda: master_port(r)) == sentinel.replica_port, what="the promotion")
        assert client.generate("after the failover", max_tokens=64, timeout=60).text == "after the failover"
        client.close()
        r.close()
    except BaseException:
        print(procs.logs(), file=sys.stderr)
        raise
    finally:
        procs.stop_all()
