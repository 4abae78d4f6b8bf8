"""Whether the whole request path works: a balancer reads the ingress stream, a group serves.

A process that answers is not a path that works: with no balancer running, requests sit on
``{p}:requests`` until their deadline, while Redis and every group look fine. So the gateway's
``/health`` and ``ryzanstein health`` (without options) judge the path from what Redis shows:

- a **balancer** is reading: the youngest balancer heartbeat (``{p}:balancers``, written after each
  ingress read, about every second) is younger than ``balancer_dead_after_s``; and no request has
  waited unread on the ingress stream for longer than that (a balancer that heartbeats but does not
  read would leave them there);
- a **group** serves: at least one registered group is alive and ready (``GroupStatus.routable``),
  and so for every model name a registered group serves (a model whose groups all died, or are
  still loading, cannot be served).

``judge`` is the rule, a pure function; ``read_path`` and ``read_path_async`` read its inputs in
two round trips with the sync and the asyncio Redis clients.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from redis import Redis
from redis.asyncio import Redis as AsyncRedis
from redis.asyncio.client import Pipeline as AsyncPipeline
from redis.client import Pipeline
from redis.exceptions import ResponseError

from broker.connection import pipe_time, time_pair
from broker.keys import INGRESS_GROUP, Keys
from broker.registry import GroupStatus, groups_from_reply, served_names, zset_members


@dataclass(frozen=True, slots=True)
class PathView:
    """What Redis shows of the path, at one moment (ages in seconds on the Redis clock)."""

    groups: list[GroupStatus]
    balancer_age_s: float | None  # of the youngest balancer heartbeat; None: no balancer registered
    unread: int  # ingress entries no balancer has read yet
    oldest_unread_age_s: float | None  # how long the oldest of them has waited; None: none waits


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
    waiting = f" ({view.unread} requests waiting)" if view.unread else ""
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

def _first_pipeline(pipe: Pipeline | AsyncPipeline, keys: Keys, names: list[str]) -> None:
    pipe_time(pipe, keys.groups)
    for name in names:
        pipe.hgetall(keys.group_info(name))
    pipe.zrevrange(keys.balancers, 0, 0, withscores=True)
    pipe.xinfo_groups(keys.requests)


def _after_first(reply: list[Any], names: list[str], *, dead_after_s: float
                 ) -> tuple[list[GroupStatus], float, float | None, str, Any]:
    """Groups, Redis now (ms), youngest balancer age, and the id after which entries are unread
    (``-`` when no balancer ever created the consumer group: every entry is unread)."""
    for raw in reply[: 2 + len(names)]:
        if isinstance(raw, Exception):
            raise raw
    groups = groups_from_reply(reply[: 1 + len(names)], dead_after_s=dead_after_s)
    secs, micros = time_pair(reply[0])
    now_ms = secs * 1000.0 + micros / 1000.0
    youngest, infos = reply[1 + len(names)], reply[2 + len(names)]
    balancer_age_s = max(0.0, (now_ms - float(youngest[0][1])) / 1000.0) if youngest else None
    after = "-"
    if not isinstance(infos, ResponseError):
        for info in infos:
            if _text(info["name"]) == INGRESS_GROUP:
                after = "(" + _text(info["last-delivered-id"])
    return groups, now_ms, balancer_age_s, after, infos


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _unread(now_ms: float, first: list[Any], count: int) -> tuple[int, float | None]:
    if not first or count <= 0:
        return 0, None
    entry_ms = int(_text(first[0][0]).split("-", 1)[0])
    return count, max(0.0, (now_ms - entry_ms) / 1000.0)


def read_path(redis: Redis, keys: Keys, *, dead_after_s: float) -> PathView:
    """The path as Redis shows it now (sync client); raises the Redis error when unreachable."""
    names = zset_members(redis.zrange(keys.groups, 0, -1))
    pipe = redis.pipeline(transaction=False)
    _first_pipeline(pipe, keys, names)
    groups, now_ms, balancer_age_s, after, infos = _after_first(
        pipe.execute(raise_on_error=False), names, dead_after_s=dead_after_s)
    pipe = redis.pipeline(transaction=False)
    pipe.xrange(keys.requests, after, "+", count=1)
    pipe.xlen(keys.requests)
    first, length = pipe.execute(raise_on_error=False)
    unread, age = _unread(now_ms, first if isinstance(first, list) else [], _unread_count(infos, length, after))
    return PathView(groups, balancer_age_s, unread, age)


async def read_path_async(redis: AsyncRedis, keys: Keys, *, dead_after_s: float) -> PathView:
    """``read_path`` with the asyncio client."""
    names = zset_members(await redis.zrange(keys.groups, 0, -1))
    pipe = redis.pipeline(transaction=False)
    _first_pipeline(pipe, keys, names)
    groups, now_ms, balancer_age_s, after, infos = _after_first(
        await pipe.execute(raise_on_error=False), names, dead_after_s=dead_after_s)
    pipe = redis.pipeline(transaction=False)
    pipe.xrange(keys.requests, after, "+", count=1)
    pipe.xlen(keys.requests)
    first, length = await pipe.execute(raise_on_error=False)
    unread, age = _unread(now_ms, first if isinstance(first, list) else [], _unread_count(infos, length, after))
    return PathView(groups, balancer_age_s, unread, age)


def _unread_count(infos: Any, length: Any, after: str) -> int:
    """Entries not yet delivered to a balancer: the consumer group's ``lag`` (Redis >= 7), else the
    stream's length less what balancers hold (an upper bound: acknowledged entries are deleted)."""
    if isinstance(length, Exception):
        raise length
    if after == "-" or isinstance(infos, ResponseError):
        return int(length)
    for info in infos:
        if _text(info["name"]) == INGRESS_GROUP:
            lag = info.get("lag")
            if lag is not None:
                return int(lag)
            return max(0, int(length) - int(info["pending"]))
    return int(length)
