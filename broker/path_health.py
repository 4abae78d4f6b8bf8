"""Whether the whole request path works: a balancer reads the ingress stream, a group serves.

A process that answers is not a path that works: with no balancer running, requests sit on
``{p}:requests`` until their deadline, while Redis and every group look fine. So the gateway's
``/health`` and ``ryzanstein health`` (without options) judge the path from what Redis shows:

- a **balancer** is reading: the youngest balancer heartbeat (``{p}:balancers``, written after each
  ingress read, about every second) is younger than ``balancer_dead_after_s``; and no request has
  waited unread on the shared ingress stream or one of its shards (``Settings.ingress_shards``) for
  longer than that (a balancer that heartbeats but does not read would leave them there). The
  streams of the tenants, removed ones too (broker.sources), count in the number of requests
  waiting (``tenants``), not in that age: a tenant names its entry ids itself (an explicit ``XADD``
  id, after deleting its stream), so their age is the tenant's to forge, and no tenant may make the
  path look broken to everyone;
- a **group** serves: at least one registered group is alive and ready (``GroupStatus.routable``),
  and so for every model name a registered group serves (a model whose groups all died, or are
  still loading, cannot be served).

``judge`` is the rule, a pure function; ``read_path`` and ``read_path_async`` read its inputs in
three round trips with the sync and the asyncio Redis clients, from every ingress stream balancers
read (``broker.sources.sources`` with the shard count passed in).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from redis import Redis
from redis.asyncio import Redis as AsyncRedis
from redis.asyncio.client import Pipeline as AsyncPipeline
from redis.client import Pipeline

from broker.connection import pipe_time, time_pair
from broker.ingress_depth import StreamDepth, add_reads, depth_of
from broker.keys import Keys
from broker.registry import GroupStatus, groups_from_reply, served_names, zset_members
from broker.sources import TENANT_RE, Source, sources


@dataclass(frozen=True, slots=True)
class PathView:
    """What Redis shows of the path, at one moment (ages in seconds on the Redis clock)."""

    groups: list[GroupStatus]
    balancer_age_s: float | None  # of the youngest balancer heartbeat; None: no balancer registered
    unread: int  # entries of the shared ingress stream and its shards no balancer has read yet
    oldest_unread_age_s: float | None  # how long the oldest of them has waited; None: none waits
    # tenant (removed ones too) -> entries of its stream no balancer has read yet
    tenants: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class PathHealth:
    ok: bool
    reason: str  # one line for people: "ok", or what is broken
    serving: list[str] = field(default_factory=list)  # routable groups
    models: list[str] = field(default_factory=list)  # the model names they serve

    def to_json(self) -> dict[str, Any]:
        return {"status": "ok" if self.ok else "unavailable", "reason": self.reason,
                "groups": len(self.serving), "models": self.models}


def judge(view: PathView, *, balancer_dead_after_s: float) -> PathHealth:
    """The path's health from ``view``: unhealthy when no balancer reads recently, when requests
    wait unread past ``balancer_dead_after_s``, or when no group is alive and ready."""
    serving = [g for g in view.groups if g.routable]
    models = served_names(serving)
    problems = []
    unread = view.unread + sum(view.tenants.values())
    waiting = f" ({unread} requests waiting)" if unread else ""
    if view.balancer_age_s is None:
        problems.append(f"no balancer is running{waiting}")
    elif view.balancer_age_s > balancer_dead_after_s:
        problems.append(f"no balancer has read the ingress stream for {view.balancer_age_s:.0f}s{waiting}")
    elif view.oldest_unread_age_s is not None and view.oldest_unread_age_s > balancer_dead_after_s:
        problems.append(f"{view.unread} requests have waited {view.oldest_unread_age_s:.0f}s "
                        f"unread by any balancer")
    if not serving:
        loading = [g for g in view.groups if g.alive and g.state in ("loading", "starting")]
        problems.append("no live worker group" + (f" ({len(loading)} loading)" if loading else ""))
    else:  # every model a registered group serves (or served lately, or is loading) has a live group
        missing = sorted(set(served_names(view.groups)) - set(models))
        if missing:
            problems.append(f"no live worker group serves {', '.join(missing)}")
    names = [g.name for g in serving]
    if problems:
        return PathHealth(False, "; ".join(problems), names, models)
    return PathHealth(True, "ok", names, models)


# --- reading ---------------------------------------------------------------------------------------

def _first_pipeline(pipe: Pipeline | AsyncPipeline, keys: Keys, names: list[str], streams: list[Source]) -> None:
    pipe_time(pipe, keys.groups)
    for name in names:
        pipe.hgetall(keys.group_info(name))
    pipe.zrevrange(keys.balancers, 0, 0, withscores=True)
    for source in streams:
        add_reads(pipe, source.stream)


def _after_first(reply: list[Any], names: list[str], streams: list[Source], *,
                 dead_after_s: float) -> tuple[list[GroupStatus], float, float | None, list[StreamDepth]]:
    """Groups, Redis now (ms), youngest balancer age, and each ingress stream's depth."""
    for raw in reply[: 2 + len(names)]:
        if isinstance(raw, Exception):
            raise raw
    groups = groups_from_reply(reply[: 1 + len(names)], dead_after_s=dead_after_s)
    secs, micros = time_pair(reply[0])
    now_ms = secs * 1000.0 + micros / 1000.0
    youngest, rest = reply[1 + len(names)], reply[2 + len(names):]
    balancer_age_s = max(0.0, (now_ms - float(youngest[0][1])) / 1000.0) if youngest else None
    depths = [depth_of(source, length, infos) for source, length, infos in zip(streams, rest[0::2], rest[1::2])]
    return groups, now_ms, balancer_age_s, depths


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _waiting(depths: list[StreamDepth]) -> list[StreamDepth]:
    """The shared streams (``{p}:requests`` and its shards) with unread entries: their first unread
    entry is read next (``XRANGE <after> + COUNT 1``), for its age."""
    return [d for d in depths if d.tenant is None and d.unread]


def _view(groups: list[GroupStatus], now_ms: float, balancer_age_s: float | None, depths: list[StreamDepth],
          firsts: list[Any]) -> PathView:
    """``firsts``: the XRANGE replies for ``_waiting(depths)``, in order."""
    unread, ages = 0, []
    for depth, first in zip(_waiting(depths), firsts):
        if isinstance(first, list) and first:  # (else: read meanwhile, or trimmed)
            unread += depth.unread
            ages.append(max(0.0, (now_ms - int(_text(first[0][0]).split("-", 1)[0])) / 1000.0))
    return PathView(groups, balancer_age_s, unread, max(ages, default=None),
                    {t.tenant: t.unread for t in depths if t.tenant is not None})


def _tenant_names(members: Any) -> list[str]:
    return sorted(n for n in (_text(m) for m in members) if TENANT_RE.fullmatch(n))


def _names(reply: list[Any], keys: Keys, shards: int) -> tuple[list[str], list[Source]]:
    groups, tenants, removed = reply
    return zset_members(groups), sources(keys, _tenant_names(tenants), _tenant_names(removed), shards=shards)


def _add_name_reads(pipe: Pipeline | AsyncPipeline, keys: Keys) -> None:
    pipe.zrange(keys.groups, 0, -1)
    pipe.smembers(keys.tenants)
    pipe.smembers(keys.tenants_removed)


def read_path(redis: Redis, keys: Keys, *, dead_after_s: float, shards: int) -> PathView:
    """The path as Redis shows it now (sync client), with ``shards`` ingress shards
    (``Settings.ingress_shards``); raises the Redis error when unreachable."""
    pipe = redis.pipeline(transaction=False)
    _add_name_reads(pipe, keys)
    names, streams = _names(pipe.execute(), keys, shards)
    pipe = redis.pipeline(transaction=False)
    _first_pipeline(pipe, keys, names, streams)
    groups, now_ms, balancer_age_s, depths = _after_first(
        pipe.execute(raise_on_error=False), names, streams, dead_after_s=dead_after_s)
    firsts: list[Any] = []
    if waiting := _waiting(depths):
        pipe = redis.pipeline(transaction=False)
        for depth in waiting:
            pipe.xrange(depth.stream, depth.after, "+", count=1)
        firsts = pipe.execute(raise_on_error=False)
    return _view(groups, now_ms, balancer_age_s, depths, firsts)


async def read_path_async(redis: AsyncRedis, keys: Keys, *, dead_after_s: float, shards: int) -> PathView:
    """``read_path`` with the asyncio client."""
    pipe = redis.pipeline(transaction=False)
    _add_name_reads(pipe, keys)
    names, streams = _names(await pipe.execute(), keys, shards)
    pipe = redis.pipeline(transaction=False)
    _first_pipeline(pipe, keys, names, streams)
    groups, now_ms, balancer_age_s, depths = _after_first(
        await pipe.execute(raise_on_error=False), names, streams, dead_after_s=dead_after_s)
    firsts: list[Any] = []
    if waiting := _waiting(depths):
        pipe = redis.pipeline(transaction=False)
        for depth in waiting:
            pipe.xrange(depth.stream, depth.after, "+", count=1)
        firsts = await pipe.execute(raise_on_error=False)
    return _view(groups, now_ms, balancer_age_s, depths, firsts)
