"""Connections to Redis that survive blips, the URL resolution order, and the Redis clock."""

from __future__ import annotations

import logging
import random
import re
import threading
import time
from collections.abc import Callable, Iterator
from typing import TypedDict

import redis
import redis.asyncio
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.retry import Retry

from broker import embedded
from broker.errors import ConfigError
from broker.failures import raise_if_fatal
from broker.settings import Settings

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


def mask_url(url: str) -> str:
    """``url`` with its password shown as ``***``, for logs and terminals (never print a secret).

    ``redis://user:secret@host:6379/0`` -> ``redis://user:***@host:6379/0``; a URL without a password
    is returned as it is. Works for every scheme accepted (``rediss://``, ``unix://``, ``redis+cluster://``
    with several hosts); a ``password=`` query option is masked too.
    """
    masked = re.sub(r"^([a-z+]+://[^/@:]*:)[^@/]*@", r"\1***@", url, flags=re.IGNORECASE)
    return re.sub(r"([?&]password=)[^&]*", r"\1***", masked, flags=re.IGNORECASE)


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
    """A client for ``url`` (redis://, rediss://, unix://, with user:password) that retries blips."""
    return redis.Redis.from_url(url, decode_responses=decode_responses, retry=Retry(_backoff(settings), 3),
                                **_options(settings))


def connect_async(url: str, settings: Settings, *, decode_responses: bool = False) -> redis.asyncio.Redis:
    from redis.asyncio.retry import Retry as AsyncRetry

    return redis.asyncio.Redis.from_url(url, decode_responses=decode_responses,
                                        retry=AsyncRetry(_backoff(settings), 3), **_options(settings))


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
