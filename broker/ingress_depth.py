"""How many requests wait on each ingress stream (broker.sources): the shared ``{p}:requests`` and
each tenant's ``{p}:t:<tenant>:requests``, as ``ryzanstein status`` and ``ryzanstein health`` show them.

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

from broker.keys import INGRESS_GROUP, Keys


@dataclass(frozen=True, slots=True)
class StreamDepth:
    """One ingress stream's backlog (entries)."""

    stream: str
    tenant: str | None  # None: the shared stream
    depth: int  # entries on the stream: unread, or read and not yet acknowledged
    pending: int  # of those, read by a balancer and not yet acknowledged
    unread: int  # of those, delivered to no balancer yet (the consumer group's lag)
    after: str  # the XRANGE start of the unread entries: "(<last delivered id>", or "-" (no group yet)


def ingress_streams(keys: Keys, tenants: list[str]) -> list[tuple[str, str | None]]:
    """(stream, tenant) of every ingress stream: the shared one first, then the tenants' in order."""
    return [(keys.requests, None), *((keys.tenant_requests(t), t) for t in tenants)]


def add_reads(pipe: Pipeline | AsyncPipeline, stream: str) -> None:
    """Add the two commands ``depth_of`` reads (XLEN, XINFO GROUPS) for ``stream`` to ``pipe``."""
    pipe.xlen(stream)
    pipe.xinfo_groups(stream)


def depth_of(stream: str, tenant: str | None, length: Any, infos: Any) -> StreamDepth:
    """The ``StreamDepth`` of ``stream`` from the replies of ``add_reads`` (in order). A stream with no
    consumer group yet (no balancer started, or a tenant deleted it: balancers make it again) has all
    its entries unread. Raises the shared stream's XLEN error reply (Redis refused the read); a
    tenant's stream that cannot be read (no stream) counts as empty: it holds no requests."""
    if isinstance(length, Exception):
        if tenant is None:
            raise length
        return StreamDepth(stream, tenant, 0, 0, 0, "-")
    depth = int(length)
    if isinstance(infos, ResponseError) or not isinstance(infos, list):
        return StreamDepth(stream, tenant, depth, 0, depth, "-")
    for info in infos:
        if _text(info["name"]) == INGRESS_GROUP:
            pending = int(info["pending"])
            lag = info.get("lag")  # Redis >= 7 (None when it cannot tell); 6.2: length less pending
            unread = int(lag) if lag is not None else max(0, depth - pending)
            return StreamDepth(stream, tenant, depth, pending, unread, "(" + _text(info["last-delivered-id"]))
    return StreamDepth(stream, tenant, depth, 0, depth, "-")


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
