"""The worker-group registry: what a group publishes in its heartbeat, and how readers see it."""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from redis import Redis
from redis.asyncio import Redis as AsyncRedis

from broker.connection import pipe_time, time_pair
from broker.keys import Keys

_INT_FIELDS = ("tp", "kv_capacity_tokens", "kv_used_tokens", "running", "waiting", "queue_depth",
               "leader_pid", "max_context", "vocab_size", "completed", "heartbeat_ms")
# Load fields added later: a heartbeat from an older group may lack them (they read as 0).
_OPTIONAL_INT_FIELDS = ("queued_tokens", "running_tokens", "fenced")
_OPTIONAL_FLOAT_FIELDS = ("tokens_per_s", "kv_utilization", "latency_ewma_ms")
_LIST_FIELDS = ("rank_weight_bytes", "rank_kv_bytes", "eos_token_ids")  # JSON arrays of ints in the hash


@dataclass(slots=True)
class GroupLoad:
    """What a group reports every heartbeat (all of it, each time: a heartbeat is the whole truth)."""

    name: str
    tp: int
    model: str
    kv_dtype: str
    kv_capacity_tokens: int
    kv_used_tokens: int
    running: int
    waiting: int
    queue_depth: int
    leader_pid: int
    host: str
    max_context: int  # longest prompt + max_tokens the group accepts
    vocab_size: int  # token ids must be below this
    state: str = "ready"  # loading | starting | ready | draining: only a ready group is routed to
    completed: int = 0  # requests finished since start
    metrics_port: int | None = None  # of the leader's /metrics endpoint on ``host``; None: not served
    tokens_per_s: float = 0.0  # tokens generated per second since the previous heartbeat
    # queued: dispatched to the group, not yet in its engine (= queue_depth requests); their
    # prompt + max_tokens. running: in the engine (= running + waiting requests); prompt + generated.
    queued_tokens: int = 0
    running_tokens: int = 0
    kv_utilization: float = 0.0  # kv_used_tokens / kv_capacity_tokens (0 without a KV cache)
    latency_ewma_ms: float = 0.0  # engine step time (the time between two tokens of a request), EWMA
    fenced: int = 0  # publishes refused since start: requests that had moved to another group
    # What each of the ``tp`` ranks holds, in rank order: its weights and its KV cache (its heads).
    rank_weight_bytes: list[int] = field(default_factory=list)
    rank_kv_bytes: list[int] = field(default_factory=list)
    rank_hosts: list[str] = field(default_factory=list)  # the host name of each rank (a group may span hosts)
    phase: str = ""  # while loading: the start-up phase (load, pack, KV allocation, kernel compile)
    # The names requests reach this group's model by (``model``), the first one canonical; and a
    # fingerprint of its weights, which tells two versions served under one name apart.
    served_models: list[str] = field(default_factory=list)
    weights: str = ""
    # What clients need to render chat and end turns with no model files (broker.chat): the SHA-256
    # of the chat template ("" when the model has none), its special tokens' texts, the EOS ids.
    chat_template: str = ""
    bos_token: str = ""
    eos_token: str = ""
    eos_token_ids: list[int] = field(default_factory=list)
    tokenizer: str = ""  # the SHA-256 of its tokenizer as published (broker.tokenizers); "" when none

    def __post_init__(self) -> None:
        if not self.served_models:  # a group without names serves its model under its spec
            self.served_models = [self.model]

    def serves(self, model: str) -> bool:
        return model in self.served_models

    def to_fields(self) -> list[str]:
        return [x for k, v in asdict(self).items() for x in (k, _field_text(v))]


def _field_text(value: Any) -> str:
    if value is None:
        return ""
    return json.dumps(value) if isinstance(value, list) else str(value)


@dataclass(slots=True)
class GroupStatus(GroupLoad):
    heartbeat_ms: int = 0
    alive: bool = False
    heartbeat_age_s: float = 0.0

    @property
    def routable(self) -> bool:
        return self.alive and self.state == "ready"

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def parse_group(info: dict[bytes, bytes], *, now_ms: float, dead_after_s: float) -> GroupStatus | None:
    """A group's status from its info hash; None when the hash is incomplete (being removed)."""
    known = {f.name for f in fields(GroupStatus)}
    try:
        raw = {k.decode(): v.decode() for k, v in info.items()}
        values: dict[str, Any] = {k: v for k, v in raw.items() if k in known}
        for name in _INT_FIELDS:
            values[name] = int(values[name])
        for name in _OPTIONAL_INT_FIELDS:
            values[name] = int(values.get(name, 0))
        for name in _OPTIONAL_FLOAT_FIELDS:
            values[name] = float(values.get(name, 0.0))
            if not math.isfinite(values[name]):
                raise ValueError(name)
        values["metrics_port"] = int(values["metrics_port"]) if values.get("metrics_port") else None
        for name in _LIST_FIELDS:  # absent in heartbeats of older groups
            values[name] = [int(n) for n in json.loads(values.get(name) or "[]")]
        # absent in heartbeats of older groups: they serve their model under its spec
        served = json.loads(values.get("served_models") or "[]") or [values["model"]]
        if not all(isinstance(n, str) for n in served):
            raise ValueError("served_models")
        values["served_models"] = served
        hosts = json.loads(values.get("rank_hosts") or "[]")  # absent in heartbeats of older groups
        if not all(isinstance(h, str) for h in hosts):
            raise ValueError("rank_hosts")
        values["rank_hosts"] = hosts
        values.pop("alive", None)
        values.pop("heartbeat_age_s", None)
        status = GroupStatus(**values)
    except (KeyError, ValueError, TypeError):  # UnicodeDecodeError is a ValueError
        return None
    status.heartbeat_age_s = max(0.0, (now_ms - status.heartbeat_ms) / 1000.0)
    status.alive = status.heartbeat_age_s <= dead_after_s
    return status


def served_names(groups: list[GroupStatus] | tuple[GroupStatus, ...]) -> list[str]:
    """Every name the groups serve (their ``served_models``), each once, sorted."""
    return sorted({name for g in groups for name in g.served_models})


def zset_members(raw: Iterable[object]) -> list[str]:
    """A ZRANGE reply (no scores) as text, from a client that decodes replies or one that does not."""
    out = []
    for member in raw:
        if isinstance(member, bytes):
            out.append(member.decode())
        elif isinstance(member, str):
            out.append(member)
        else:
            raise TypeError(f"not a sorted set member: {member!r:.60}")
    return out


def read_groups(redis: Redis, keys: Keys, *, dead_after_s: float) -> list[GroupStatus]:
    """Every registered group, alive or not, with ages on the Redis clock."""
    names = zset_members(redis.zrange(keys.groups, 0, -1))
    pipe = redis.pipeline(transaction=False)
    pipe_time(pipe, keys.groups)
    for name in names:
        pipe.hgetall(keys.group_info(name))
    return groups_from_reply(pipe.execute(), dead_after_s=dead_after_s)


async def read_groups_async(redis: AsyncRedis, keys: Keys, *, dead_after_s: float) -> list[GroupStatus]:
    """``read_groups`` on an asyncio Redis client."""
    names = zset_members(await redis.zrange(keys.groups, 0, -1))
    pipe = redis.pipeline(transaction=False)
    pipe_time(pipe, keys.groups)
    for name in names:
        pipe.hgetall(keys.group_info(name))
    return groups_from_reply(await pipe.execute(), dead_after_s=dead_after_s)


def groups_from_reply(reply: list[Any], *, dead_after_s: float) -> list[GroupStatus]:
    """The groups of a ``[TIME, HGETALL info...]`` pipeline reply, sorted by name; ages on the
    Redis clock. Shared by ``read_groups`` and the gateway's asyncio reader."""
    raw_time, *infos = reply
    secs, micros = time_pair(raw_time)
    now_ms = secs * 1000.0 + micros / 1000.0
    out = []
    for info in infos:
        status = parse_group(info, now_ms=now_ms, dead_after_s=dead_after_s) if info else None
        if status is not None:
            out.append(status)
    return sorted(out, key=lambda g: g.name)


@dataclass(frozen=True, slots=True)
class QueueLoad:
    """What a group's queue stream holds now: entries dispatched and not finished, and their cost."""

    requests: int
    tokens: int


def read_queue_loads(redis: Redis, keys: Keys, names: list[str]) -> dict[str, QueueLoad]:
    """Exact queue lengths and queued-token counters of ``names`` (one round trip)."""
    pipe = redis.pipeline(transaction=False)
    for name in names:
        pipe.xlen(keys.group_queue(name))
        pipe.get(keys.group_queue_tokens(name))
    raw = pipe.execute()
    return {name: QueueLoad(int(raw[2 * i]), max(0, int(raw[2 * i + 1] or 0))) for i, name in enumerate(names)}
