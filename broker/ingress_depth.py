"""How many requests wait on each ingress stream balancers read (``broker.sources.sources``: the
shared ``{p}:requests``, its shards ``{p}:requests:<n>``, each tenant's ``{p}:t:<tenant>:requests``
and each removed tenant's), as ``ryzanstein status`` and ``ryzanstein health`` show them.

Two commands per stream, added to a caller's pipeline (``add_reads``, sync or asyncio): ``XLEN``
and ``XINFO GROUPS``; ``depth_of`` turns their replies into a ``StreamDepth``. Acknowledged entries
are deleted (XACK + XDEL), so a stream's length is what is still to do: unread, or read by a balancer
and not yet acknowledged (``pending``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from redis.asyncio.client import Pipeline as AsyncPipeline
from redis.client import Pipeline
from redis.exceptions import ResponseError

from broker.keys import INGRESS_GROUP
from broker.sources import Source


@dataclass(frozen=True, slots=True)
class StreamDepth:
    """One ingress stream's backlog (entries)."""

    stream: str
    tenant: str | None  # None: the shared stream or one of its shards
    depth: int  # entries on the stream: unread, or read and not yet acknowledged
    pending: int  # of those, read by a balancer and not yet acknowledged
    unread: int  # of those, delivered to no balancer yet (the consumer group's lag)
    after: str  # the XRANGE start of the unread entries: "(<last delivered id>", or "-" (no group yet)
    removed: bool = False  # a removed tenant's stream (still read: its entries are answered)


def add_reads(pipe: Pipeline | AsyncPipeline, stream: str) -> None:
    """Add the two commands ``depth_of`` reads (XLEN, XINFO GROUPS) for ``stream`` to ``pipe``."""
    pipe.xlen(stream)
    pipe.xinfo_groups(stream)


def depth_of(source: Source, length: Any, infos: Any) -> StreamDepth:
    """The ``StreamDepth`` of ``source``'s stream from the replies of ``add_reads`` (in order). A
    stream with no consumer group yet (no balancer started, or a tenant deleted it: balancers make it
    again) has all its entries unread. Raises a shared stream's (or shard's) XLEN error reply (Redis
    refused the read); a tenant's stream that cannot be read counts as empty: it holds no requests."""
    stream, tenant = source.stream, source.tenant
    if isinstance(length, Exception):
        if tenant is None:
            raise length
        return StreamDepth(stream, tenant, 0, 0, 0, "-", source.removed)
    depth = int(length)
    if isinstance(infos, ResponseError) or not isinstance(infos, list):
        return StreamDepth(stream, tenant, depth, 0, depth, "-", source.removed)
    for info in infos:
        if _text(info["name"]) == INGRESS_GROUP:
            pending = int(info["pending"])
            lag = info.get("lag")  # Redis >= 7 (None when it cannot tell); 6.2: length less pending
            unread = int(lag) if lag is not None else max(0, depth - pending)
            return StreamDepth(stream, tenant, depth, pending, unread, "(" + _text(info["last-delivered-id"]),
                               source.removed)
    return StreamDepth(stream, tenant, depth, 0, depth, "-", source.removed)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
