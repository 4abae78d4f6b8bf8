"""Connections to Redis that survive blips, the URL resolution order, and the Redis clock."""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, TypedDict, cast

import redis
import redis.asyncio
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisClusterException
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.retry import Retry

from broker import embedded
from broker.errors import ConfigError
from broker.failures import raise_if_fatal
from broker.redis_url import RedisTarget, mask_url, parse_url
from broker.settings import Settings

__all__ = ["TRANSIENT_ERRORS", "RedisClock", "backoff_delays", "connect", "connect_async", "is_cluster", "mask_url",
           "resolve_url", "retry_forever"]

log = logging.getLogger(__name__)

# Errors after which a process waits and retries instead of exiting.
TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (
    RedisConnectionError,
    RedisTimeoutError,
    ConnectionError,
    OSError,
)


def resolve_url(settings: Settings, *, wait_s: float = 0.0) -> str:
    """--redis-url / RYZ_REDIS_URL, else the embedded broker a running ``up``/``broker`` announced.

    ``wait_s`` lets processes started together with the broker (a Procfile) wait for its announcement.
    """
    if settings.redis_url:
        return settings.redis_url
    deadline = time.monotonic() + wait_s
    while True:
        url = embedded.discover(prefix=settings.prefix)
        if url:
            return url
        if time.monotonic() >= deadline:
            raise ConfigError(
                "no Redis to talk to: pass --redis-url (or set RYZ_REDIS_URL), "
                "or start the embedded one with `ryzanstein up` or `ryzanstein broker`"
            )
        time.sleep(0.1)


class _ClientOptions(TypedDict):
    """The options both clients get from the settings (the retry object differs: sync or asyncio)."""

    socket_timeout: float
    socket_connect_timeout: float
    health_check_interval: int
    retry_on_error: list[type[Exception]]


def _options(settings: Settings) -> _ClientOptions:
    return {
        "socket_timeout": settings.socket_timeout_s,
        "socket_connect_timeout": settings.connect_timeout_s,
        "health_check_interval": 30,
        "retry_on_error": [RedisConnectionError, RedisTimeoutError],
    }


def _backoff(settings: Settings) -> ExponentialBackoff:
    return ExponentialBackoff(cap=settings.reconnect_cap_s, base=settings.reconnect_base_s)


def connect(url: str, settings: Settings, *, decode_responses: bool = False) -> redis.Redis:
    """A client for ``url`` that retries blips: any form of ``broker.redis_url`` (redis://, rediss://,
    unix://, redis+cluster://, redis+sentinel://, with user:password).

    A cluster URL gives redis-py's ``RedisCluster``, typed as ``redis.Redis`` (it has the same command
    methods; ``is_cluster`` tells them apart where it matters: Lua loading, the hot path's ``Wire``,
    multi-key commands). It reads the slot map at once: raises redis' ``ConnectionError`` when no
    startup node answers. A sentinel URL gives a client of the master the Sentinels name now.
    """
    target = parse_url(url)
    retry = Retry(_backoff(settings), 3)
    if target.kind == "cluster":
        from redis.cluster import ClusterNode

        from broker.cluster_client import ClusterClient

        nodes = [ClusterNode(host, port) for host, port in target.nodes]  # type: ignore[no-untyped-call]
        try:
            cluster = ClusterClient(startup_nodes=nodes, retry=retry, require_full_coverage=False,
                                   decode_responses=decode_responses, **_credentials(target),
                                   socket_timeout=settings.socket_timeout_s,
                                   socket_connect_timeout=settings.connect_timeout_s)
        except RedisClusterException as exc:  # not a RedisError: made one, for the one-line CLI errors
            raise RedisConnectionError(f"no startup node answers ({exc})") from exc
        return cast("redis.Redis", cluster)
    if target.kind == "sentinel":
        from redis.sentinel import Sentinel

        sentinel = Sentinel(list(target.nodes),  # type: ignore[no-untyped-call]
                            sentinel_kwargs=_sentinel_options(target, settings))
        master: redis.Redis = sentinel.master_for(  # type: ignore[no-untyped-call]
            cast("str", target.service), db=target.db, retry=retry, decode_responses=decode_responses,
            **_credentials(target), **_options(settings))
        return master
    return redis.Redis.from_url(url, decode_responses=decode_responses, retry=retry, **_options(settings))


def connect_async(url: str, settings: Settings, *, decode_responses: bool = False) -> redis.asyncio.Redis:
    """``connect`` for asyncio: ``redis.asyncio.Redis``, or its ``RedisCluster`` (typed as the former),
    which reads the slot map on its first command."""
    from redis.asyncio.retry import Retry as AsyncRetry

    target = parse_url(url)
    retry = AsyncRetry(_backoff(settings), 3)
    if target.kind == "cluster":
        from redis.asyncio.cluster import ClusterNode

        from broker.cluster_client import AsyncClusterClient

        cluster = AsyncClusterClient(startup_nodes=[ClusterNode(h, p) for h, p in target.nodes], retry=retry,
                               require_full_coverage=False, decode_responses=decode_responses,
                               **_credentials(target), socket_timeout=settings.socket_timeout_s,
                               socket_connect_timeout=settings.connect_timeout_s)
        return cast("redis.asyncio.Redis", cluster)
    if target.kind == "sentinel":
        from redis.asyncio.sentinel import Sentinel as AsyncSentinel

        sentinel = AsyncSentinel(list(target.nodes),  # type: ignore[no-untyped-call]
                                 sentinel_kwargs=_sentinel_options(target, settings))
        master: redis.asyncio.Redis = sentinel.master_for(
            cast("str", target.service), db=target.db, retry=retry, decode_responses=decode_responses,
            **_credentials(target), **_options(settings))
        return master
    return redis.asyncio.Redis.from_url(url, decode_responses=decode_responses, retry=retry, **_options(settings))


def is_cluster(client: object) -> bool:
    """Whether ``client`` (a client or a pipeline, sync or asyncio) talks to a Redis Cluster."""
    from redis.asyncio.cluster import ClusterPipeline as AsyncClusterPipeline
    from redis.asyncio.cluster import RedisCluster as AsyncRedisCluster
    from redis.cluster import ClusterPipeline, RedisCluster

    return isinstance(client, (RedisCluster, ClusterPipeline, AsyncRedisCluster, AsyncClusterPipeline))


def _credentials(target: RedisTarget) -> dict[str, Any]:
    return {"username": target.username, "password": target.password, "ssl": target.tls}


def _sentinel_options(target: RedisTarget, settings: Settings) -> dict[str, Any]:
    return {"socket_timeout": settings.socket_timeout_s, "socket_connect_timeout": settings.connect_timeout_s,
            "ssl": target.tls}


def backoff_delays(settings: Settings) -> Iterator[float]:
    """Jittered exponential delays for a loop that lost Redis; endless."""
    delay = settings.reconnect_base_s
    while True:
        yield delay * (0.5 + random.random() / 2)
        delay = min(delay * 2, settings.reconnect_cap_s)


class RedisClock:
    """Milliseconds on the Redis server's clock, estimated locally (one TIME call per refresh).

    Heartbeats and request deadlines are stamped with Redis' clock, so processes on hosts with
    skewed clocks still agree on ages and deadlines.
    """

    def __init__(self, time_fn: Callable[[], tuple[int, int]], *, refresh_s: float = 30.0,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        self._time_fn = time_fn
        self._monotonic = monotonic
        self._refresh_s = refresh_s
        self._offset_ms = 0.0
        self._synced_at: float | None = None

    def now_ms(self) -> float:
        mono = self._monotonic()
        if self._synced_at is None or mono - self._synced_at >= self._refresh_s:
            try:
                secs, micros = self._time_fn()
                self._offset_ms = secs * 1000.0 + micros / 1000.0 - mono * 1000.0
                self._synced_at = mono
            except TRANSIENT_ERRORS:
                if self._synced_at is None:
                    raise
        return mono * 1000.0 + self._offset_ms


def retry_forever(fn: Callable[[], object], settings: Settings, *, what: str,
                  stop: threading.Event | None = None) -> bool:
    """Call ``fn`` until it gets through a Redis outage (True), or ``stop`` is set first (False).

    Raises ``broker.failures.FatalRedisError`` on what waiting cannot cure (credentials, TLS).
    """
    delays = backoff_delays(settings)
    while stop is None or not stop.is_set():
        try:
            fn()
            return True
        except TRANSIENT_ERRORS as exc:
            raise_if_fatal(exc)
            delay = next(delays)
            log.warning("%s: redis unavailable (%s); retrying in %.2fs", what, exc, delay)
            if stop is not None:
                stop.wait(delay)
            else:
                time.sleep(delay)
    return False


# TIME on the master of the key given: cluster pipelines refuse keyless commands, and on a cluster
# the clock that matters is that of the node stamping the heartbeats (HEARTBEAT, on the registry's).
_TIME_OF_KEY = "return redis.call('TIME')"


def pipe_time(pipe: Any, key: str) -> None:
    """Add TIME to ``pipe`` (sync or asyncio): on a cluster, the clock of ``key``'s master. Read the
    reply with ``time_pair``."""
    if is_cluster(pipe):
        pipe.execute_command("EVAL", _TIME_OF_KEY, 1, key)  # ClusterPipeline.eval is refused
    else:
        pipe.time()


def server_time(client: redis.Redis, key: str) -> tuple[int, int]:
    """TIME as (seconds, microseconds); on a cluster, of ``key``'s master."""
    return time_pair(client.eval(_TIME_OF_KEY, 1, key) if is_cluster(client) else client.time())


def time_pair(raw: Any) -> tuple[int, int]:
    """A TIME reply (redis-py's (int, int), or the script's two strings) as (seconds, microseconds)."""
    secs, micros = raw
    return int(secs), int(micros)
