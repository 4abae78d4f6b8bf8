"""redis-py's Redis Cluster clients, with their key lookup kept off a dead node.

redis-py finds the keys of a command with "movable" keys (XREAD, XREADGROUP, EVAL, EVALSHA, ...) by
asking the cluster's *default node* (``COMMAND GETKEYS``), before the command's own retry and
slot-map refresh. When that node is the master that died, every such command fails from then on,
and nothing in the failing path reads the slot map again (seen: a balancer and groups reading
streams for ever against a killed master, its replica long promoted; then a balancer whose registry
read, a pipeline with an EVAL, failed for a minute while the groups had recovered). Pipelines take
the same path: their commands' keys are looked up on the default node to pick a routing policy
(redis-py's ``ClusterPipeline``), EVAL and EVALSHA included.

Here the keys of the movable-key commands ryzanstein sends (stream reads, scripts, functions) are read
from the command itself, by the client and by its pipelines, and a lookup of any other command that
cannot reach the default node picks another one and tries again.
"""

from __future__ import annotations

from typing import Any

from redis.asyncio.cluster import RedisCluster as AsyncRedisCluster
from redis.cluster import ClusterPipeline, RedisCluster
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisClusterException
from redis.exceptions import TimeoutError as RedisTimeoutError

_STREAM_READS = {"XREAD", "XREADGROUP"}
# name numkeys key... arg...: EVAL, EVALSHA and their read-only forms, functions.
_NUMKEYS_COMMANDS = {"EVAL", "EVALSHA", "EVAL_RO", "EVALSHA_RO", "FCALL", "FCALL_RO"}


def command_keys(args: tuple[Any, ...]) -> list[Any] | None:
    """The keys of a stream read or a script/function call, read from the command (``args``: name
    first); None for any other command (or one too malformed to tell: Redis' own error will say)."""
    name = _text(args[0]).upper()
    if name in _STREAM_READS:
        words = [_text(a).upper() if isinstance(a, (str, bytes)) else "" for a in args]
        if "STREAMS" not in words:
            return None
        tail = list(args[words.index("STREAMS") + 1 :])
        return tail[: len(tail) // 2]
    if name in _NUMKEYS_COMMANDS and len(args) >= 3:
        try:
            numkeys = int(args[2])
        except (TypeError, ValueError):
            return None
        return list(args[3 : 3 + numkeys]) if 0 <= numkeys <= len(args) - 3 else None
    return None


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


class _LocalKeys:
    """The key lookup of ``ClusterClient`` and its pipelines (a mixin over redis-py's ``RedisCluster``)."""

    def _get_command_keys(self, *args: Any) -> Any:
        keys = command_keys(args)
        if keys is not None:
            return keys
        try:
            return super()._get_command_keys(*args)  # type: ignore[misc]
        except (RedisConnectionError, RedisTimeoutError):
            self.replace_default_node()  # type: ignore[attr-defined]
            return super()._get_command_keys(*args)  # type: ignore[misc]


class ClusterClientPipeline(_LocalKeys, ClusterPipeline):
    """``ClusterPipeline`` whose key lookups survive the death of the default node."""


class ClusterClient(_LocalKeys, RedisCluster):
    """``RedisCluster`` whose key lookups, its own and its pipelines', survive the death of its
    default node."""

    def pipeline(self, transaction: Any = None, shard_hint: Any = None) -> ClusterClientPipeline:
        pipe = super().pipeline(transaction=transaction, shard_hint=shard_hint)  # type: ignore[no-untyped-call]
        # redis-py builds the pipeline (its constructor's arguments change between releases); ours
        # only adds a method, so the object it built becomes one of ours as it is.
        pipe.__class__ = ClusterClientPipeline
        return pipe  # type: ignore[no-any-return]


class AsyncClusterClient(AsyncRedisCluster):
    """The asyncio ``RedisCluster``, with the keys of stream reads and script/function calls read from
    the command (its pipelines route through this method too)."""

    async def _determine_slot(self, command: str, *args: Any) -> int:
        keys = command_keys((command, *args))
        if not keys:
            return await super()._determine_slot(command, *args)
        slots = {self.keyslot(key) for key in keys}
        if len(slots) != 1:
            raise RedisClusterException(f"{command} - all keys must map to the same key slot")
        return slots.pop()
