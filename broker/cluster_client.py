"""redis-py's Redis Cluster clients, with their key lookup kept off a dead node.

redis-py finds the keys of a command with "movable" keys (XREAD, XREADGROUP, ...) by asking the
cluster's *default node* (``COMMAND GETKEYS``), before the command's own retry and slot-map refresh.
When that node is the master that died, every such command fails from then on (seen: a balancer and
groups reading streams for ever against a killed master, its replica long promoted). Here the keys of
XREAD/XREADGROUP are read from the command itself (the first half of what follows ``STREAMS``), and
another lookup that cannot reach the default node picks another one and tries again.
"""

from __future__ import annotations

from typing import Any

from redis.asyncio.cluster import RedisCluster as AsyncRedisCluster
from redis.cluster import RedisCluster
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisClusterException
from redis.exceptions import TimeoutError as RedisTimeoutError

_STREAM_READS = {"XREAD", "XREADGROUP"}


def stream_read_keys(args: tuple[Any, ...]) -> list[Any] | None:
    """The keys of an XREAD/XREADGROUP command (``args``: name first); None for any other command."""
    if _text(args[0]).upper() not in _STREAM_READS:
        return None
    words = [_text(a).upper() if isinstance(a, (str, bytes)) else "" for a in args]
    if "STREAMS" not in words:
        return None
    tail = list(args[words.index("STREAMS") + 1 :])
    return tail[: len(tail) // 2]


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


class ClusterClient(RedisCluster):
    """``RedisCluster`` whose key lookups survive the death of its default node."""

    def _get_command_keys(self, *args: Any) -> Any:
        keys = stream_read_keys(args)
        if keys is not None:
            return keys
        try:
            return super()._get_command_keys(*args)  # type: ignore[no-untyped-call]
        except (RedisConnectionError, RedisTimeoutError):
            self.replace_default_node()
            return super()._get_command_keys(*args)  # type: ignore[no-untyped-call]


class AsyncClusterClient(AsyncRedisCluster):
    """The asyncio ``RedisCluster``, with the stream reads' keys read from the command."""

    async def _determine_slot(self, command: str, *args: Any) -> int:
        keys = stream_read_keys((command, *args))
        if not keys:
            return await super()._determine_slot(command, *args)
        slots = {self.keyslot(key) for key in keys}
        if len(slots) != 1:
            raise RedisClusterException(f"{command} - all keys must map to the same key slot")
        return slots.pop()
