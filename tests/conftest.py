"""Shared fixtures: one real redis-server per test session (per pytest-xdist worker under `make test`;
our embedded launcher), flushed per test."""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator

import pytest
import redis

from broker.embedded import EmbeddedRedis
from broker.keys import Keys
from broker.settings import Settings
from tests import test_lint
from tests.gpu_workers.helpers import FakeMonotonic
from tests.redis_cluster import LocalCluster


def pytest_collection_finish(session: pytest.Session) -> None:
    """mypy's test, when selected, starts mypy now: it runs beside the tests before it (tests/test_lint.py)."""
    # Under pytest-xdist every worker collects every test: none starts mypy early, its test starts it.
    if "PYTEST_XDIST_WORKER" not in os.environ and any(item.nodeid == test_lint.MYPY_TEST for item in session.items):
        test_lint.start_mypy()


def pytest_sessionfinish(session: pytest.Session) -> None:
    test_lint.stop_mypy()


@pytest.fixture(scope="session")
def redis_server() -> Iterator[EmbeddedRedis]:
    """A real redis-server on a free loopback port, for the whole session."""
    with EmbeddedRedis() as server:
        yield server


@pytest.fixture
def redis_url(redis_server: EmbeddedRedis) -> Iterator[str]:
    client = redis.Redis.from_url(redis_server.url)
    client.flushall()
    client.close()
    yield redis_server.url


@pytest.fixture
def r(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


@pytest.fixture
def prefix() -> str:
    """A fresh key prefix per test, so leftovers of one test never leak into another."""
    return f"t{uuid.uuid4().hex[:8]}"


@pytest.fixture
def keys(prefix: str) -> Keys:
    return Keys(prefix)


@pytest.fixture
def settings(redis_url: str, prefix: str) -> Settings:
    return Settings(redis_url=redis_url, prefix=prefix)


@pytest.fixture
def subprocess_env(redis_url: str, prefix: str) -> dict[str, str]:
    """Environment for ryzanstein child processes pointed at the test server."""
    env = dict(os.environ)
    env.update(RYZ_REDIS_URL=redis_url, RYZ_PREFIX=prefix, PYTHONUNBUFFERED="1")
    return env


@pytest.fixture
def mono() -> FakeMonotonic:
    """A monotonic clock that moves only when a test advances it."""
    return FakeMonotonic()


@pytest.fixture(scope="session")
def redis7_server() -> Iterator[EmbeddedRedis]:
    """The system redis-server (7.x on this project's machines) for the whole session."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("no redis-server on PATH")
    with EmbeddedRedis(binary=binary) as server:
        yield server


@pytest.fixture(params=["bundled", "system"])
def any_redis(request: pytest.FixtureRequest) -> Iterator[redis.Redis]:
    """A flushed client of the bundled redis-server (6.2), then of the system one (7): behaviour
    that differs between versions (XAUTOCLAIM of deleted entries, ACL) is tested on both."""
    server = request.getfixturevalue("redis_server" if request.param == "bundled" else "redis7_server")
    client = redis.Redis.from_url(server.url)
    client.flushall()
    yield client
    client.close()


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[LocalCluster]:
    """A real Redis Cluster (3 masters + 3 replicas, system redis-server 7) for the whole session;
    tests that kill a node start a ``LocalCluster`` of their own."""
    if shutil.which("redis-server") is None or shutil.which("redis-cli") is None:
        pytest.skip("no redis-server / redis-cli on PATH")
    with LocalCluster() as cluster:
        yield cluster


@pytest.fixture
def cluster_url(redis_cluster: LocalCluster) -> str:
    """The ``redis+cluster://`` URL of the session's cluster, every master flushed."""
    redis_cluster.flush()
    return redis_cluster.url
