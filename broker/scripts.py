"""Lua scripts: the few steps that must be atomic. Each documents its KEYS and ARGV at the top.

Every script touches keys of one Redis Cluster hash slot (see broker.keys). They are registered
once per connection (``Scripts(redis)``) and called by SHA, also inside pipelines.

The request state hash (``{<reply>}:state:<id>``, see broker.keys) carries:
  owner  - the group that may publish for the request (absent until routed)
  epoch  - bumped whenever ownership is (re)assigned; a publisher must present the current one
  next   - index of the next token event to write (token events are never duplicated or skipped)
  final  - present once the one final event (done or error) is written
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import msgpack
from redis.exceptions import NoScriptError

T = TypeVar("T")

CLAIM_OWNER = """
-- Pin a request to a group, learn the group it is already pinned to, or take it over from a group
-- that handed it back (draining) or died.
-- KEYS[1] = request state hash
-- ARGV[1] = group the caller would route to
-- ARGV[2] = state TTL, ms
-- ARGV[3] = (optional) owner the request is taken over from; '' or absent for none
-- ARGV[4] = (optional) that owner's epoch: the takeover happens only if both still match
-- Returns {owner, epoch, finished}: an existing owner wins over ARGV[1] (unless taken over);
-- finished is 1 when the request already has its final event (nothing left to dispatch).
-- Every (re)assignment bumps the epoch, which fences the previous owner's publishes.
local s = redis.call('HMGET', KEYS[1], 'owner', 'epoch', 'final')
if s[3] then return {s[1] or '', tonumber(s[2] or '0'), 1} end
local from = ARGV[3] or ''
if s[1] and not (from ~= '' and s[1] == from and s[2] == ARGV[4]) then
  return {s[1], tonumber(s[2]), 0}
end
local epoch = redis.call('HINCRBY', KEYS[1], 'epoch', 1)
redis.call('HSET', KEYS[1], 'owner', ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return {ARGV[1], epoch, 0}
"""

DISPATCH = """
-- Put a request on a group's queue, at most once per (request, epoch), while the group accepts work.
-- KEYS[1] = the group's queue stream
-- KEYS[2] = dispatch marker of (request id, epoch), in the group's slot
-- KEYS[3] = the group's accepting flag (deleted when it drains or is failed over)
-- ARGV[1] = the request, msgpack (GenerationRequest.to_wire)
-- ARGV[2] = epoch
-- ARGV[3] = marker TTL, ms
-- Returns {'ok', entry id}, {'dup'} when this (request, epoch) was dispatched before, or {'closed'}
-- when the group takes no more work (the caller routes elsewhere).
if redis.call('EXISTS', KEYS[3]) == 0 then return {'closed'} end
if redis.call('SET', KEYS[2], '1', 'NX', 'PX', ARGV[3]) then
  return {'ok', redis.call('XADD', KEYS[1], '*', 'r', ARGV[1], 'e', ARGV[2])}
end
return {'dup'}
"""

PUBLISH = """
-- Write result events for one request, fenced by ownership, in order and at most once.
-- KEYS[1] = reply stream
-- KEYS[2] = request state hash
-- ARGV[1] = publisher (group name; the balancer for requests it never routed)
-- ARGV[2] = publisher's epoch
-- ARGV[3] = TTL of reply stream and state, ms
-- ARGV[4] = msgpack array of events, each {kind, index, {field, value, ...}}; kind 't' is a token
--           event with its index, 'f' a final event (done/error), which ends the request
-- A publisher must own the request (CLAIM_OWNER) unless nobody ever claimed it.
-- Returns {status, next}: status 'ok', 'fenced' (another owner or epoch: nothing written), 'final'
-- (already finished: nothing written) or 'gap' (a token index past `next`: stopped there).
local owner = redis.call('HGET', KEYS[2], 'owner')
local epoch = redis.call('HGET', KEYS[2], 'epoch')
if owner and (owner ~= ARGV[1] or epoch ~= ARGV[2]) then
  return {'fenced', 0}
end
if redis.call('HEXISTS', KEYS[2], 'final') == 1 then
  return {'final', 0}
end
local nxt = tonumber(redis.call('HGET', KEYS[2], 'next') or '0')
local status = 'ok'
for _, ev in ipairs(cmsgpack.unpack(ARGV[4])) do
  if ev[1] == 't' then
    if ev[2] == nxt then
      redis.call('XADD', KEYS[1], '*', unpack(ev[3]))
      nxt = nxt + 1
    elseif ev[2] > nxt then
      status = 'gap'
      break
    end
  else
    redis.call('XADD', KEYS[1], '*', unpack(ev[3]))
    redis.call('HSET', KEYS[2], 'final', '1')
    break
  end
end
redis.call('HSET', KEYS[2], 'next', nxt)
redis.call('PEXPIRE', KEYS[1], ARGV[3])
redis.call('PEXPIRE', KEYS[2], ARGV[3])
return {status, nxt}
"""

HEARTBEAT = """
-- Record a group's heartbeat, stamped with the Redis server's clock (no skew between hosts).
-- KEYS[1] = group registry zset
-- KEYS[2] = the group's info hash
-- ARGV[1] = group name
-- ARGV[2..] = field, value, ... of the group's info
-- Returns the heartbeat time, ms.
local t = redis.call('TIME')
local ms = string.format('%d', tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000))
redis.call('HSET', KEYS[2], 'heartbeat_ms', ms, unpack(ARGV, 2))
redis.call('ZADD', KEYS[1], ms, ARGV[1])
return ms
"""


def pack_events(events: list[tuple[str, int, dict[str, str]]]) -> bytes:
    """Encode events for PUBLISH: (kind 't'/'f', index, fields)."""
    return msgpack.packb(
        [[kind, index, [x for kv in fields.items() for x in kv]] for kind, index, fields in events],
        use_bin_type=False,
    )


@dataclass(frozen=True, slots=True)
class PublishResult:
    status: str  # ok | fenced | final | gap
    next_index: int


def publish_result(raw: Any) -> PublishResult:
    status = raw[0].decode() if isinstance(raw[0], bytes) else raw[0]
    return PublishResult(status=status, next_index=int(raw[1]))


class Script:
    """One Lua script, called by SHA. Direct calls load it when Redis lacks it (after a restart);
    pipelined calls (``client=pipe``) go out as plain EVALSHA, without redis-py's SCRIPT EXISTS round
    trip per pipeline: ``Scripts.execute`` reloads and re-runs a pipeline that met NOSCRIPT."""

    def __init__(self, redis: Any, source: str) -> None:
        self._script = redis.register_script(source)
        self.sha: str = self._script.sha

    def __call__(self, *, keys: list[Any], args: list[Any], client: Any = None) -> Any:
        if client is None:
            return self._script(keys=keys, args=args)
        return client.evalsha(self.sha, len(keys), *keys, *args)


class Scripts:
    """The scripts registered on one (sync) client."""

    def __init__(self, redis: Any) -> None:
        self.redis = redis
        self.claim_owner = Script(redis, CLAIM_OWNER)
        self.dispatch = Script(redis, DISPATCH)
        self.publish = Script(redis, PUBLISH)
        self.heartbeat = Script(redis, HEARTBEAT)
        self._all = (self.claim_owner, self.dispatch, self.publish, self.heartbeat)
        self._sources = (CLAIM_OWNER, DISPATCH, PUBLISH, HEARTBEAT)

    def load(self) -> None:
        """Make sure Redis has every script (a restarted or flushed server has none)."""
        pipe = self.redis.pipeline(transaction=False)
        for source in self._sources:
            pipe.script_load(source)
        pipe.execute()

    def execute(self, build: Callable[[Any], T]) -> tuple[T, list[Any]]:
        """Run the commands ``build(pipe)`` adds as one pipeline; (build's value, results).

        Errors come back in the results, not raised. If Redis lost the scripts, they are loaded and
        the pipeline is built and run again, so what ``build`` adds must be safe to repeat (our
        scripts are: claims, dispatches and publishes are idempotent).
        """
        for _attempt in range(2):
            pipe = self.redis.pipeline(transaction=False)
            value = build(pipe)
            results = pipe.execute(raise_on_error=False)
            if not any(isinstance(r, NoScriptError) for r in results):
                return value, results
            self.load()
        raise RuntimeError("Redis keeps losing the Lua scripts")
