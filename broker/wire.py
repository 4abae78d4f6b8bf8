"""One round trip of commands on a connection of our own: the hot loops' pipeline.

A balancer and a worker group spend most of each request in a few pipelines (read, claim and
dispatch, publish). redis-py's ``Pipeline`` adds tens of microseconds per round trip on top of the
socket (a pool checkout and release per call, observability and fieldset hooks): measured here,
about 70-90 us per pipelined EVALSHA against about 35 us when the same packed commands go straight
over one connection. ``Wire`` keeps one connection (configured as the client's) for itself, writes every
command of a ``Batch`` in one send and reads the replies in order.

Replies come back as redis-py's pipeline with ``raise_on_error=False`` gives them: an error reply
is returned as its exception in its place; XREAD/XREADGROUP replies are shaped as redis-py shapes
them ([[stream, [(id, {field: value})]]], None when a blocking read timed out). A lost connection
is dropped and raised (the loops retry with backoff; the next call connects again), as is any
error that leaves replies unread.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from redis import Redis
from redis.exceptions import ResponseError

PackCommand = Callable[[tuple[Any, ...]], bytes]


def _hiredis_packer() -> PackCommand | None:
    """redis[hiredis]: packs a command in C, several times faster than redis-py's own packer."""
    try:
        from hiredis import pack_command
    except ImportError:  # pragma: no cover - hiredis is a dependency; a plain redis-py still works
        return None
    return pack_command


_pack_command = _hiredis_packer()


class Batch:
    """Commands for one round trip, added with the names and arguments of redis-py's methods.

    Each method returns its command's handle: the index of its reply in ``Wire.execute``'s list, so
    that callers take replies by handle, never by counting commands."""

    def __init__(self) -> None:
        self.commands: list[tuple[Any, ...]] = []
        self._streams: list[bool] = []  # per command: is its reply a stream read to reshape?

    def __len__(self) -> int:
        return len(self.commands)

    def _add(self, args: tuple[Any, ...], *, stream: bool = False) -> int:
        self.commands.append(args)
        self._streams.append(stream)
        return len(self.commands) - 1

    def evalsha(self, sha: str, numkeys: int, *keys_and_args: Any) -> int:
        return self._add(("EVALSHA", sha, numkeys, *keys_and_args))

    def set_nx(self, name: Any, value: Any, *, px: int) -> int:
        """SET name value NX PX px: OK, or None when the key exists."""
        return self._add(("SET", name, value, "NX", "PX", px))

    def get(self, name: Any) -> int:
        return self._add(("GET", name))

    def xack(self, name: Any, group: str, *ids: Any) -> int:
        return self._add(("XACK", name, group, *ids))

    def xdel(self, name: Any, *ids: Any) -> int:
        return self._add(("XDEL", name, *ids))

    def xread(self, streams: dict[Any, Any], count: int | None = None, block: int | None = None) -> int:
        return self._add(("XREAD", *_read_options(count, block), "STREAMS", *streams, *streams.values()), stream=True)

    def xreadgroup(self, groupname: str, consumername: str, streams: dict[Any, Any], count: int | None = None,
                   block: int | None = None) -> int:
        return self._add(("XREADGROUP", "GROUP", groupname, consumername, *_read_options(count, block),
                          "STREAMS", *streams, *streams.values()), stream=True)


def _read_options(count: int | None, block: int | None) -> tuple[Any, ...]:
    return (*(("COUNT", count) if count is not None else ()), *(("BLOCK", block) if block is not None else ()))


def stream_reply(raw: Any) -> list[list[Any]] | None:
    """An XREAD/XREADGROUP reply (RESP2 list or RESP3 map) as redis-py returns it."""
    if not raw:
        return None
    pairs = raw.items() if isinstance(raw, dict) else raw
    return [[name, [(entry_id, _fields(fields)) for entry_id, fields in entries]] for name, entries in pairs]


def _fields(flat: Any) -> dict[Any, Any] | None:
    if flat is None:
        return None  # an entry deleted after it was delivered (a re-read of pending entries)
    if isinstance(flat, dict):
        return flat
    it = iter(flat)
    return dict(zip(it, it))


class Wire:
    """Batches sent over one connection of its own, made as ``redis``'s pool makes its connections
    (same address, credentials, TLS and timeouts); closed by ``close`` or with the object."""

    def __init__(self, redis: Redis) -> None:
        self._pool = redis.connection_pool
        self._conn: Any = None
        self._lock = threading.Lock()

    def execute(self, batch: Batch) -> list[Any]:
        if not batch.commands:
            return []
        with self._lock:
            if self._conn is None:
                fresh = self._pool.connection_class(**self._pool.connection_kwargs)
                # Here, not in the first send: a Sentinel-managed connection asks the Sentinels for the
                # master in its connect() (sending first would connect to its default address).
                fresh.connect()
                self._conn = fresh
            conn = self._conn
            try:
                conn.send_packed_command(pack_commands(conn, batch.commands))
                replies: list[Any] = []
                for _ in batch.commands:
                    try:
                        replies.append(conn.read_response())
                    except ResponseError as exc:
                        replies.append(exc)
            except BaseException:
                # The replies still due would come out of step: drop the connection, start afresh.
                self._conn = None
                conn.disconnect()
                raise
        return [stream_reply(r) if is_stream and not isinstance(r, Exception) else r
                for r, is_stream in zip(replies, batch._streams)]

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.disconnect()
                self._conn = None


def pack_commands(conn: Any, commands: list[tuple[Any, ...]]) -> Any:
    """``commands`` packed for one ``send_packed_command`` on ``conn``."""
    if _pack_command is None:
        return conn.pack_commands(commands)
    return [b"".join(_pack_command(command) for command in commands)]
