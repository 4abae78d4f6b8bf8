"""Calling the Lua scripts (broker.lua): one typed method per script, and the decoders of their replies.

``Scripts`` is the only place that orders a script's KEYS and ARGV: callers name their arguments
(``scripts.dispatch(queue=..., epoch=..., ...)``), as rq's ``save_unique_job`` wraps its Lua. The
scripts are registered once per connection (``Scripts(redis)``) and called by SHA, also inside
pipelines (``client=``: a ``broker.wire.Batch`` or a redis-py pipeline); a call returns the script's
raw reply, or what the pipeline's ``evalsha`` returns, and the reply's decoder (``claim_result``,
``publish_result``, ``ingress_entries``) reads it once it has come back.

The request state hash (``{<reply>}:state:<id>``, see broker.keys) carries:
  owner  - the group that may publish for the request (absent until routed)
  epoch  - bumped whenever ownership is (re)assigned; a publisher must present the current one
  next   - index of the next token event to write (token events are never duplicated or skipped);
           a request with several completions keeps one per completion, next:<choice>
  final  - present once the one final event (done or error) is written
Next to it, until the final event, the token ids and the text a streamed request has published
(``{<reply>}:gen:<id>``, ``{<reply>}:gentext:<id>``): a new owner continues from them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import msgpack
from redis import Redis
from redis.cluster import RedisCluster
from redis.exceptions import NoScriptError

from broker.keys import Progress
from broker.lua import (
    ACK,
    CLAIM_OWNER,
    DISPATCH,
    HEARTBEAT,
    OVERSIZE_FIELD,
    PUBLISH,
    READ_CANCELS,
    READ_INGRESS,
    RETIRE_QUEUE,
    queue_signature,
)
from broker.wire import Batch, Wire
from broker.wire_cluster import ClusterWire

__all__ = ["OVERSIZE_FIELD", "Claim", "Pipe", "PublishResult", "Scripts", "claim_result", "ingress_entries",
           "pack_events", "publish_result"]

T = TypeVar("T")


class Pipe(Protocol):
    """Where a pipelined script call goes: a ``broker.wire.Batch`` or a redis-py pipeline."""

    def evalsha(self, sha: str, numkeys: int, *keys_and_args: Any) -> Any: ...


def ingress_entries(raw: Any) -> list[tuple[bytes, dict[bytes, bytes]]]:
    """READ_INGRESS's reply as (entry id, fields) pairs, like redis-py's XREADGROUP entries."""
    out = []
    for entry_id, flat in raw or []:
        it = iter(flat or [])
        out.append((entry_id, dict(zip(it, it))))
    return out


def pack_events(events: list[tuple[str, int, dict[str, str]]]) -> bytes:
    """Encode events for PUBLISH: (kind 't'/'f', index, fields); token events carry token_id and
    text, and, with a ``choice`` field (n > 1), the choice and their records framed with it."""
    packed: list[list[Any]] = []
    for kind, index, fields in events:
        flat = [x for kv in fields.items() for x in kv]
        if kind == "t" and "choice" in fields:
            choice, text = int(fields["choice"]), fields["text"]
            framed = f"{choice}:{len(text.encode())}:{text}" if text else ""
            packed.append([kind, index, flat, f"{choice}:{int(fields['token_id'])}", framed, choice])
        elif kind == "t":
            packed.append([kind, index, flat, int(fields["token_id"]), fields["text"]])
        else:
            packed.append([kind, index, flat])
    data: bytes = msgpack.packb(packed, use_bin_type=False)
    return data


@dataclass(frozen=True, slots=True)
class PublishResult:
    status: str  # ok | fenced | final | gap
    next_index: int


def publish_result(raw: Any) -> PublishResult:
    status = raw[0].decode() if isinstance(raw[0], bytes) else raw[0]
    return PublishResult(status=status, next_index=int(raw[1]))


@dataclass(frozen=True, slots=True)
class Claim:
    """What CLAIM_OWNER answered."""

    owner: str
    epoch: int
    finished: bool
    output_ids: tuple[int, ...] = ()  # token ids published so far
    output_text: str = ""  # their text, as the token events carried it
    # The same per completion, for a request with several (n > 1): index = the completion's.
    choice_ids: tuple[tuple[int, ...], ...] = ()
    choice_texts: tuple[str, ...] = ()


def claim_result(raw: Any) -> Claim:
    def text(value: Any) -> str:
        return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)

    ids = text(raw[3]) if len(raw) > 3 else ""
    owner, epoch, finished = text(raw[0]), int(raw[1]), bool(int(raw[2]))
    if ":" in ids:  # a request with several completions: "<choice>:<id>," records (pack_events)
        raw_text = raw[4] if len(raw) > 4 else b""
        choice_ids, choice_texts = _framed_progress(ids, raw_text if isinstance(raw_text, bytes) else
                                                    str(raw_text).encode())
        return Claim(owner=owner, epoch=epoch, finished=finished, choice_ids=choice_ids, choice_texts=choice_texts)
    return Claim(owner=owner, epoch=epoch, finished=finished,
                 output_ids=tuple(int(x) for x in ids.split(",") if x),
                 output_text=text(raw[4]) if len(raw) > 4 else "")


def _framed_progress(ids: str, texts: bytes) -> tuple[tuple[tuple[int, ...], ...], tuple[str, ...]]:
    """Per-completion token ids and texts from PUBLISH's framed records of a request with several."""
    per_ids: dict[int, list[int]] = {}
    for record in ids.split(","):
        if record:
            index, token = record.split(":")
            per_ids.setdefault(int(index), []).append(int(token))
    per_text: dict[int, bytes] = {}
    pos = 0
    while pos < len(texts):
        colon = texts.index(b":", pos)
        second = texts.index(b":", colon + 1)
        choice, size = int(texts[pos:colon]), int(texts[colon + 1 : second])
        per_text[choice] = per_text.get(choice, b"") + texts[second + 1 : second + 1 + size]
        pos = second + 1 + size
    count = max([*per_ids, *per_text], default=-1) + 1
    return (tuple(tuple(per_ids.get(c, ())) for c in range(count)),
            tuple(per_text.get(c, b"").decode("utf-8", "replace") for c in range(count)))


class _Script:
    """One Lua script, called by SHA. Direct calls load it when Redis lacks it (after a restart);
    pipelined calls go out as plain EVALSHA, without redis-py's SCRIPT EXISTS round trip per
    pipeline: ``Scripts.execute`` reloads and re-runs a pipeline that met NOSCRIPT."""

    def __init__(self, redis: Redis, source: str) -> None:
        self._script = redis.register_script(source)
        self.sha: str = self._script.sha

    def __call__(self, keys: Sequence[str], args: Sequence[str | bytes | int | float], client: Pipe | None) -> Any:
        if client is None:
            return self._script(keys=keys, args=args)
        return client.evalsha(self.sha, len(keys), *keys, *args)


def _progress_keys(progress: Progress) -> list[str]:
    """The state key, then both record keys or neither (the scripts read them as a pair)."""
    if progress.generated is None or progress.generated_text is None:
        return [progress.state]
    return [progress.state, progress.generated, progress.generated_text]


class Scripts:
    """The scripts registered on one (sync) client, one method per script."""

    def __init__(self, redis: Redis) -> None:
        self.redis = redis
        # The hot loops' round trips (broker.wire; on a cluster, per node: broker.wire_cluster).
        self.wire: Wire | ClusterWire = ClusterWire(redis) if isinstance(redis, RedisCluster) else Wire(redis)
        self._claim_owner = _Script(redis, CLAIM_OWNER)
        self._dispatch = _Script(redis, DISPATCH)
        self._publish = _Script(redis, PUBLISH)
        self._heartbeat = _Script(redis, HEARTBEAT)
        self._ack = _Script(redis, ACK)
        self._retire_queue = _Script(redis, RETIRE_QUEUE)
        self._read_ingress = _Script(redis, READ_INGRESS)
        self._read_cancels = _Script(redis, READ_CANCELS)
        self._sources = (CLAIM_OWNER, DISPATCH, PUBLISH, HEARTBEAT, ACK, RETIRE_QUEUE, READ_INGRESS, READ_CANCELS)

    def claim_owner(self, *, progress: Progress, group: str, ttl_ms: int, reply_stream: str | None = None,
                    taken_from: str | None = None, taken_from_epoch: int = 0, client: Pipe | None = None) -> Any:
        """CLAIM_OWNER: pin the request whose keys are ``progress`` to ``group`` (or learn its owner).

        ``reply_stream``, when given, must be a stream or absent (else a WRONGTYPE error reply); it
        needs the record keys in ``progress``. ``taken_from``/``taken_from_epoch``: the owner and epoch
        the request is taken over from (it moves only while both still hold). ``ttl_ms``: the state's
        expiry. Reply: ``claim_result``.
        """
        keys = _progress_keys(progress)
        if reply_stream is not None:
            if len(keys) == 1:
                raise ValueError("claim_owner: a reply_stream needs the progress' generated keys")
            keys.append(reply_stream)
        return self._claim_owner(keys, [group, ttl_ms, taken_from or "", taken_from_epoch], client)

    def dispatch(self, *, queue: str, marker: str, accepting: str, queue_tokens: str | None, request: bytes,
                 epoch: int, marker_ttl_ms: int, cost: int = 0, max_entries: int = 0, max_tokens: int = 0,
                 signing_key: bytes | None = None, client: Pipe | None = None) -> Any:
        """DISPATCH: add ``request`` (msgpack, ``GenerationRequest.to_wire``) to a group's ``queue`` under
        ``epoch``, once per ``marker`` (``Keys.dispatch_marker``, kept ``marker_ttl_ms``), while
        ``accepting`` exists and the queue stays within ``max_entries`` entries and ``max_tokens``
        tokens of ``cost`` (0: no bound; counted in ``queue_tokens``, None: not counted). ``signing_key``:
        the entry is signed under it (``broker.lua.queue_signature``); groups refuse entries that are not.

        Reply: ``[b'ok', entry id]``, ``[b'dup']``, ``[b'closed']`` or ``[b'full']``.
        """
        keys = [queue, marker, accepting, *([queue_tokens] if queue_tokens is not None else [])]
        signed = [queue_signature(signing_key, request, epoch, cost)] if signing_key is not None else []
        return self._dispatch(keys, [request, epoch, marker_ttl_ms, cost, max_entries, max_tokens, *signed], client)

    def publish(self, *, reply_stream: str, progress: Progress, publisher: str, epoch: int, ttl_ms: int,
                events: bytes, client: Pipe | None = None) -> Any:
        """PUBLISH: write ``events`` (``pack_events``) to ``reply_stream`` as ``publisher`` holding
        ``epoch``, fenced and in order; the stream and state expire ``ttl_ms`` after. With the record
        keys in ``progress``, the tokens written are recorded for a new owner. Reply: ``publish_result``.
        """
        return self._publish([reply_stream, *_progress_keys(progress)], [publisher, epoch, ttl_ms, events], client)

    def ack(self, *, queue: str, queue_tokens: str, consumer_group: str, entry_ids: Sequence[bytes | str],
            client: Pipe | None = None) -> Any:
        """ACK: acknowledge and delete ``entry_ids`` of a group's ``queue`` (read by ``consumer_group``),
        taking their cost off ``queue_tokens``. Reply: the tokens freed."""
        return self._ack([queue, queue_tokens], [consumer_group, *entry_ids], client)

    def retire_queue(self, *, queue: str, queue_tokens: str, client: Pipe | None = None) -> Any:
        """RETIRE_QUEUE: delete a failed-over group's ``queue`` and ``queue_tokens`` once the queue is
        empty. Reply: 1 when deleted, 0 when the queue took entries again."""
        return self._retire_queue([queue, queue_tokens], [], client)

    def read_ingress(self, *, ingress: str, consumer_group: str, consumer: str, count: int, max_entry_bytes: int,
                     client: Pipe | None = None) -> Any:
        """READ_INGRESS: read up to ``count`` new entries of ``ingress`` as ``consumer`` of
        ``consumer_group``, never blocking; entries over ``max_entry_bytes`` come back as stubs
        (``OVERSIZE_FIELD``). Reply: ``ingress_entries``."""
        return self._read_ingress([ingress], [consumer_group, consumer, count, max_entry_bytes], client)

    def read_cancels(self, *, cancel_stream: str, after: bytes | str, count: int, max_field_bytes: int,
                     client: Pipe | None = None) -> Any:
        """READ_CANCELS: up to ``count`` entries of ``cancel_stream`` after id ``after``, each reduced
        to its ``id`` and ``token`` fields of at most ``max_field_bytes`` (others dropped). Reply:
        XREAD's shape, ``[[stream, [(entry id, [field, value, ...]), ...]]]``."""
        return self._read_cancels([cancel_stream], [after, count, max_field_bytes], client)

    def heartbeat(self, *, registry: str, info: str, group: str, fields: Sequence[str | bytes | int | float],
                  client: Pipe | None = None) -> Any:
        """HEARTBEAT: stamp ``group``'s heartbeat in ``registry`` (``Keys.groups``) with the Redis clock
        and write ``fields`` (field, value, ...) to its ``info`` hash. Reply: the time, ms (bytes)."""
        return self._heartbeat([registry, info], [group, *fields], client)

    def load(self) -> None:
        """Make sure Redis has every script (a restarted or flushed server has none; on a cluster,
        every master: a promoted replica has none)."""
        if isinstance(self.redis, RedisCluster):
            for source in self._sources:
                self.redis.script_load(source)  # sent to every master
            return
        pipe = self.redis.pipeline(transaction=False)
        for source in self._sources:
            pipe.script_load(source)
        pipe.execute()

    def execute(self, build: Callable[[Batch], T]) -> tuple[T, list[Any]]:
        """Run the commands ``build(batch)`` adds in one round trip; (build's value, results).

        Errors come back in the results, not raised. If Redis lost the scripts, they are loaded and
        the pipeline is built and run again, so what ``build`` adds must be safe to repeat (our
        scripts are: claims, dispatches and publishes are idempotent).
        """
        for _attempt in range(2):
            batch = Batch()
            value = build(batch)
            results = self.wire.execute(batch)
            if not any(isinstance(r, NoScriptError) for r in results):
                return value, results
            self.load()
        raise RuntimeError("Redis keeps losing the Lua scripts")
