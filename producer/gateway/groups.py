"""The gateway's view of the worker-group registry: which groups are alive, which models they serve.

Read with the asyncio Redis client and kept for ``max_age_s``, so that a busy gateway reads the
registry a few times a second rather than once per request.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from redis.asyncio import Redis as AsyncRedis

from broker.keys import Keys
from broker.registry import GroupStatus, read_groups_async, served_names


class LiveGroups:
    """The routable groups (alive, not draining), re-read when older than ``max_age_s``."""

    def __init__(self, redis: AsyncRedis, keys: Keys, *, dead_after_s: float, max_age_s: float = 0.5,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._redis = redis
        self._keys = keys
        self._dead_after_s = dead_after_s
        self._max_age_s = max_age_s
        self._clock = clock
        self._groups: list[GroupStatus] = []
        self._read_at: float | None = None

    async def get(self) -> list[GroupStatus]:
        """Routable groups; raises the Redis error when the registry cannot be read."""
        now = self._clock()
        if self._read_at is None or now - self._read_at >= self._max_age_s:
            groups = await read_groups_async(self._redis, self._keys, dead_after_s=self._dead_after_s)
            self._groups = [g for g in groups if g.routable]
            self._read_at = now
        return self._groups

    async def models(self) -> list[str]:
        """The names the routable groups serve (``--served-model-name``), each once, sorted."""
        return served_names(await self.get())
