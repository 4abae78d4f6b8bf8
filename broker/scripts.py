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

from dataclasses import dataclass
from typing import Any

import msgpack

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

RELEASE = """
-- Give a request back (group draining): drop ownership so that it can be routed again.
-- KEYS[1] = request state hash
-- ARGV[1] = owner giving it back
-- ARGV[2] = owner's epoch
-- Returns 1 when released, 0 when the caller no longer owned it or it is finished.
local s = redis.call('HMGET', KEYS[1], 'owner', 'epoch', 'final')
if s[3] or s[1] ~= ARGV[1] or s[2] ~= ARGV[2] then return 0 end
redis.call('HDEL', KEYS[1], 'owner')
return 1
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


class Scripts:
    """The scripts registered on one client (sync or asyncio); call with ``client=pipeline`` to batch."""

    def __init__(self, redis: Any) -> None:
        self.claim_owner = redis.register_script(CLAIM_OWNER)
        self.dispatch = redis.register_script(DISPATCH)
        self.publish = redis.register_script(PUBLISH)
        self.release = redis.register_script(RELEASE)
        self.heartbeat = redis.register_script(HEARTBEAT)
