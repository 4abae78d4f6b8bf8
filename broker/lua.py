"""The Lua sources of the steps that must be atomic; each documents its KEYS and ARGV at the top.

They are called through ``broker.scripts.Scripts``, one method per script with named arguments,
which is the only place that orders KEYS and ARGV; nothing else should call them. Every script
touches keys of one Redis Cluster hash slot (see broker.keys). The request state hash they share is
described in broker.scripts.
"""

from __future__ import annotations

from dataclasses import dataclass

from broker.protocol import GenerationRequest
from broker.signing import SigningKey, sign

CLAIM_OWNER = """
-- Pin a request to a group, learn the group it is already pinned to, or take it over from a group
-- that handed it back (draining) or died.
-- KEYS[1] = request state hash
-- KEYS[2] = (optional) the request's generated token ids ("id,id,", written by PUBLISH)
-- KEYS[3] = (optional) the request's generated text (the joined token deltas, written by PUBLISH)
-- ARGV[1] = group the caller would route to
-- ARGV[2] = state TTL, ms
-- ARGV[3] = (optional) owner the request is taken over from; '' or absent for none
-- KEYS[4] = (optional) the request's reply stream: an existing key of another type is an error
-- ARGV[4] = (optional) that owner's epoch: the takeover happens only if both still match
-- Returns {owner, epoch, finished, ids, text}: an existing owner wins over ARGV[1] (unless taken
-- over); finished is 1 when the request already has its final event (nothing left to dispatch).
-- ids and text are what the request's token events carried so far ('' when none): a new owner
-- continues from them. Read here, in the step that fences the previous owner, they cannot change
-- any more except through the owner returned.
-- Every (re)assignment bumps the epoch, which fences the previous owner's publishes.
if KEYS[4] then
  local t = redis.call('TYPE', KEYS[4])['ok']
  if t ~= 'none' and t ~= 'stream' then
    return redis.error_reply('WRONGTYPE the reply stream is a ' .. t .. ', not a stream')
  end
end
local s = redis.call('HMGET', KEYS[1], 'owner', 'epoch', 'final')
if s[3] then return {s[1] or '', tonumber(s[2] or '0'), 1, '', ''} end
-- Only an owner publishes tokens: without one there is nothing to read.
local ids = s[1] and KEYS[2] and redis.call('GET', KEYS[2]) or ''
local text = s[1] and KEYS[3] and redis.call('GET', KEYS[3]) or ''
local from = ARGV[3] or ''
if s[1] and not (from ~= '' and s[1] == from and s[2] == ARGV[4]) then
  return {s[1], tonumber(s[2]), 0, ids, text}
end
local epoch = redis.call('HINCRBY', KEYS[1], 'epoch', 1)
redis.call('HSET', KEYS[1], 'owner', ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return {ARGV[1], epoch, 0, ids, text}
"""


DISPATCH = """
-- Put a request on a group's queue, at most once per (request, epoch), while the group accepts work
-- and its queue is within its bounds.
-- KEYS[1] = the group's queue stream
-- KEYS[2] = dispatch marker of (request id, epoch), in the group's slot
-- KEYS[3] = the group's accepting flag (deleted when it drains or is failed over)
-- KEYS[4] = (optional) the group's queued-token counter (the summed cost of its queue entries)
-- ARGV[1] = the request, msgpack (GenerationRequest.to_wire)
-- ARGV[2] = epoch
-- ARGV[3] = marker TTL, ms
-- ARGV[4] = the request's cost, tokens (prompt + max_tokens)
-- ARGV[5] = most entries the queue may hold (0: no bound)
-- ARGV[6] = most tokens the queue may hold (0: no bound)
-- ARGV[7] = (optional) the entry's signature (broker.lua.queue_signature), stored as field 's'
-- Returns {'ok', entry id}, {'dup'} when this (request, epoch) was dispatched before, {'closed'}
-- when the group takes no more work, or {'full'} when the request would break a bound (the caller
-- routes elsewhere). An empty queue takes any request, however costly.
if redis.call('EXISTS', KEYS[3]) == 0 then return {'closed'} end
if redis.call('EXISTS', KEYS[2]) == 1 then return {'dup'} end
local cost = tonumber(ARGV[4] or '0')
local n = redis.call('XLEN', KEYS[1])
if n > 0 then
  local max_n, max_tokens = tonumber(ARGV[5] or '0'), tonumber(ARGV[6] or '0')
  if max_n > 0 and n >= max_n then return {'full'} end
  local queued = KEYS[4] and math.max(0, tonumber(redis.call('GET', KEYS[4]) or '0')) or 0
  if max_tokens > 0 and queued + cost > max_tokens then return {'full'} end
end
redis.call('SET', KEYS[2], '1', 'PX', ARGV[3])
local id
if ARGV[7] then
  id = redis.call('XADD', KEYS[1], '*', 'r', ARGV[1], 'e', ARGV[2], 'c', cost, 's', ARGV[7])
else
  id = redis.call('XADD', KEYS[1], '*', 'r', ARGV[1], 'e', ARGV[2], 'c', cost)
end
if KEYS[4] then redis.call('INCRBY', KEYS[4], cost) end
return {'ok', id}
"""


@dataclass(frozen=True, slots=True)
class QueueEntry:
    """A group queue entry, as DISPATCH writes it (fields r, e, c, s)."""

    request: GenerationRequest  # r: the request, msgpack (GenerationRequest.to_wire)
    epoch: int  # e: the epoch it was dispatched under; the group publishes under it
    cost: int  # c: tokens it adds to the queue's token counter (0 in entries written before it existed)


class ForgedEntry(ValueError):
    """A queue entry not signed by the pipeline: a client wrote it there directly."""


def queue_signature(key: bytes, request: bytes, epoch: int, cost: int) -> str:
    """What a balancer signs a queue entry with (field s): HMAC-SHA256 under the pipeline's key
    (broker.signing) of its epoch, cost and request bytes, hex."""
    return sign(key, b"%d:%d:" % (epoch, cost) + request)


def queue_entry(fields: dict[bytes, bytes], *, signing: SigningKey | None) -> QueueEntry:
    """Decode a queue entry's fields (the one place that reads them); KeyError or ValueError
    (msgpack's, pydantic's) when malformed. Unless ``signing`` is None (to describe a refused entry),
    the entry must be signed under its key (``queue_signature``, field s), else ``ForgedEntry``:
    only balancers write queues, and a request put there by anyone else (possible where the ACL
    recipe of docs/OPERATIONS.md is not used) would skip validation, ``reply_to`` rules included."""
    epoch, cost = int(fields[b"e"]), int(fields.get(b"c", b"0"))
    if signing is not None and not signing.verifies(b"%d:%d:" % (epoch, cost) + fields[b"r"], fields.get(b"s")):
        raise ForgedEntry("queue entry not signed by the pipeline (written to the queue directly?)")
    return QueueEntry(GenerationRequest.from_wire(fields[b"r"]), epoch, cost)


ACK = """
-- Acknowledge and delete a group's finished queue entries, and take their cost off its counter.
-- KEYS[1] = the group's queue stream
-- KEYS[2] = the group's queued-token counter
-- ARGV[1] = the queue's consumer group
-- ARGV[2..] = entry ids
-- Only entries still in the stream count, so repeating an acknowledgement (a retry after a lost
-- reply) never takes a cost off twice. Returns the tokens freed.
local freed = 0
for i = 2, #ARGV do
  local entry = redis.call('XRANGE', KEYS[1], ARGV[i], ARGV[i])
  if #entry > 0 then
    local f = entry[1][2]
    for j = 1, #f, 2 do
      if f[j] == 'c' then freed = freed + tonumber(f[j + 1]) end
    end
    redis.call('XDEL', KEYS[1], ARGV[i])
  end
end
if #ARGV > 1 then redis.call('XACK', KEYS[1], ARGV[1], unpack(ARGV, 2)) end
if freed > 0 and redis.call('DECRBY', KEYS[2], freed) <= 0 then redis.call('DEL', KEYS[2]) end
return freed
"""


RETIRE_QUEUE = """
-- Delete a failed-over group's queue (and with it its consumer group) once it is empty, with its
-- token counter. A queue that took entries again (the group came back meanwhile) is left alone.
-- KEYS[1] = the group's queue stream
-- KEYS[2] = the group's queued-token counter
-- Returns 1 when deleted.
if redis.call('XLEN', KEYS[1]) > 0 then return 0 end
redis.call('DEL', KEYS[1], KEYS[2])
return 1
"""


PUBLISH = """
-- Write result events for one request, fenced by ownership, in order and at most once.
-- KEYS[1] = reply stream
-- KEYS[2] = request state hash
-- KEYS[3] = (optional) the request's generated token ids ("id,id,")
-- KEYS[4] = (optional) the request's generated text (the joined token deltas)
-- ARGV[1] = publisher (group name; the balancer for requests it never routed)
-- ARGV[2] = publisher's epoch
-- ARGV[3] = TTL of reply stream and state, ms
-- ARGV[4] = msgpack array of events, each {kind, index, {field, value, ...}, token id, text[, choice]};
--           kind 't' is a token event with its index, token id and text delta, 'f' a final event
--           (done/error), which ends the request. A token event of a request with several
--           completions names its completion (choice): indices then count per completion (state
--           field 'next:<choice>'), and the token id and text it records are framed with it
--           ("<choice>:<id>", "<choice>:<bytes>:<text>": pack_events, claim_result).
-- A publisher must own the request (CLAIM_OWNER) unless nobody ever claimed it. Each token written
-- is appended to KEYS[3] and KEYS[4], so that a new owner can continue after it; both go with the
-- final event.
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
local nexts = {}  -- choice -> its next index, for the choices met here
local status = 'ok'
local final = false
local record = KEYS[3] and KEYS[4]
for _, ev in ipairs(cmsgpack.unpack(ARGV[4])) do
  if ev[1] == 't' then
    local choice = ev[6]
    local at = nxt
    if choice then
      at = nexts[choice] or tonumber(redis.call('HGET', KEYS[2], 'next:' .. choice) or '0')
    end
    if ev[2] == at then
      redis.call('XADD', KEYS[1], '*', unpack(ev[3]))
      if record then
        redis.call('APPEND', KEYS[3], ev[4] .. ',')
        if ev[5] ~= '' then redis.call('APPEND', KEYS[4], ev[5]) end
      end
      at = at + 1
    elseif ev[2] > at then
      status = 'gap'
    end
    if choice then nexts[choice] = at else nxt = at end
    if status == 'gap' then break end
  else
    redis.call('XADD', KEYS[1], '*', unpack(ev[3]))
    redis.call('HSET', KEYS[2], 'final', '1')
    final = true
    break
  end
end
redis.call('HSET', KEYS[2], 'next', nxt)
for choice, at in pairs(nexts) do
  redis.call('HSET', KEYS[2], 'next:' .. choice, at)
end
redis.call('PEXPIRE', KEYS[1], ARGV[3])
redis.call('PEXPIRE', KEYS[2], ARGV[3])
if record and final then
  redis.call('DEL', KEYS[3], KEYS[4])
elseif record then
  redis.call('PEXPIRE', KEYS[3], ARGV[3])
  redis.call('PEXPIRE', KEYS[4], ARGV[3])
end
return {status, nxt}
"""


OVERSIZE_FIELD = b"__ryz_oversize"  # in READ_INGRESS's stub of an entry over the size limit: its size

READ_INGRESS = """
-- Read new ingress entries for a balancer (XREADGROUP, never blocking), returning entries over the
-- size limit as stubs: the balancer refuses them without holding their bodies in its memory.
-- KEYS[1] = the ingress stream
-- ARGV[1] = consumer group
-- ARGV[2] = consumer
-- ARGV[3] = most entries to read
-- ARGV[4] = largest entry returned whole, bytes (field names and values summed)
-- Returns {{id, {field, value, ...}}, ...}; a stub is {id, {OVERSIZE_FIELD, size, [id, v], [reply_to, v]}}
-- (its id and reply_to only when they are short).
local got = redis.call('XREADGROUP', 'GROUP', ARGV[1], ARGV[2], 'COUNT', ARGV[3], 'STREAMS', KEYS[1], '>')
if not got then return {} end
local limit = tonumber(ARGV[4])
local out = {}
for _, e in ipairs(got[1][2]) do
  local f, size = e[2], 0
  for i = 1, #f do size = size + #f[i] end
  if size > limit then
    local stub = {'__ryz_oversize', tostring(size)}
    for i = 1, #f - 1, 2 do
      if (f[i] == 'id' or f[i] == 'reply_to') and #f[i + 1] <= 512 then
        stub[#stub + 1] = f[i]
        stub[#stub + 1] = f[i + 1]
      end
    end
    out[#out + 1] = {e[1], stub}
  else
    out[#out + 1] = e
  end
end
return out
"""


READ_CANCELS = """
-- Read the cancel feed after a cursor (XREAD, never blocking), keeping of each entry only what a
-- cancel can use: 'id' and 'token' when each is at most ARGV[3] bytes (no request id or token is
-- longer). A client may write anything there: one read returns at most ARGV[2] entries of bounded
-- size, however large what was written, and the cursor still moves past every entry.
-- KEYS[1] = the cancel stream
-- ARGV[1] = cursor: entries after this id
-- ARGV[2] = most entries to read
-- ARGV[3] = longest id or token kept, bytes
-- Returns {{stream, {{id, {field, value, ...}}, ...}}} like XREAD, or {} when nothing is new.
local got = redis.call('XREAD', 'COUNT', ARGV[2], 'STREAMS', KEYS[1], ARGV[1])
if not got then return {} end
local limit = tonumber(ARGV[3])
local out = {}
for _, e in ipairs(got[1][2]) do
  local f, kept = e[2], {}
  for i = 1, #f - 1, 2 do
    if (f[i] == 'id' or f[i] == 'token') and #f[i + 1] <= limit then
      kept[#kept + 1] = f[i]
      kept[#kept + 1] = f[i + 1]
    end
  end
  out[#out + 1] = {e[1], kept}
end
return {{KEYS[1], out}}
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
