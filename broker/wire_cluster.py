"""``Wire`` for a Redis Cluster: each command of a ``Batch`` goes to the master of its keys' slot.

A batch's commands are grouped by node; every node's commands go out in one send (all nodes are
written before any is read, so a blocking read on one node does not delay the others' replies),
and the replies are put back in the batch's order. A command answered ``MOVED`` (its slot now has
another master: a failover or a resharding) or ``ASK`` (its slot is being migrated) was not run, so
it is sent again where the redirection points, after the slot map is patched (``MOVED``; redis-py's
``NodesManager.move_slot``) or behind ``ASKING`` (``ASK``), up to ``MAX_REDIRECTS`` times. A lost
connection drops every connection of the batch, marks the slot map stale (read again from the
cluster before the next batch: a dead master's replica may have been promoted) and is raised, as
``Wire`` raises it (the loops retry with backoff). Replies are shaped as ``Wire`` shapes them.

Every command in a ``Batch`` has its keys in one slot (asserted for the scripts in
tests/broker/test_cluster_slots.py); a multi-key command across slots comes back as Redis'
``CROSSSLOT`` error reply.
"""

from __future__ import annotations

import threading
from typing import Any

from redis.cluster import RedisCluster
from redis.exceptions import (
    AskError,
    ClusterDownError,
    MovedError,
    RedisClusterException,
    ResponseError,
    SlotNotCoveredError,
)
from redis.exceptions import ConnectionError as RedisConnectionError

from broker.keys import key_slot
from broker.wire import Batch, pack_commands, stream_reply

MAX_REDIRECTS = 5


def command_key(command: tuple[Any, ...]) -> Any:
    """The first key of a ``Batch`` command (every such command has one): the one that picks its slot."""
    name = command[0]
    if name == "EVALSHA":
        return command[3]
    if name in ("XREAD", "XREADGROUP"):
        return command[command.index("STREAMS") + 1]
    return command[1]


def _slot(key: Any) -> int:
    return key_slot(key.decode() if isinstance(key, bytes) else str(key))


class ClusterWire:
    """Batches sent to the cluster's masters over connections of its own, one per node, made as the
    cluster client makes its connections (credentials, TLS, timeouts); closed by ``close``."""

    def __init__(self, cluster: RedisCluster) -> None:
        self._cluster = cluster
        self._conns: dict[tuple[str, int], Any] = {}
        self._lock = threading.Lock()
        self._stale = False

    def execute(self, batch: Batch) -> list[Any]:
        if not batch.commands:
            return []
        with self._lock:
            if self._stale:
                self._refresh()
            replies: list[Any] = [None] * len(batch.commands)
            due = {i: self._address(command) for i, command in enumerate(batch.commands)}
            asking: set[int] = set()
            for _round in range(MAX_REDIRECTS + 1):
                self._round_trip(batch.commands, due, asking, replies)
                redirected = {i: replies[i] for i in due if isinstance(replies[i], AskError)}
                if not redirected:
                    break
                for i, exc in redirected.items():
                    if isinstance(exc, MovedError):
                        self._cluster.nodes_manager.move_slot(exc)
                        asking.discard(i)
                    else:
                        asking.add(i)
                due = {i: exc.node_addr for i, exc in redirected.items()}
            if any(isinstance(r, ClusterDownError) for r in replies):
                self._stale = True  # a master is down: its replica may be promoted by the next batch
        return [stream_reply(r) if is_stream and not isinstance(r, Exception) else r
                for r, is_stream in zip(replies, batch._streams)]

    def _address(self, command: tuple[Any, ...]) -> tuple[str, int]:
        try:
            node = self._cluster.nodes_manager.get_node_from_slot(_slot(command_key(command)))
        except SlotNotCoveredError as exc:  # its master is gone and no replica promoted yet
            self._stale = True
            raise RedisConnectionError(str(exc)) from exc
        return node.host, int(node.port)

    def _round_trip(self, commands: list[tuple[Any, ...]], due: dict[int, tuple[str, int]], asking: set[int],
                    replies: list[Any]) -> None:
        """Send the ``due`` commands (index -> node address) and put their replies in ``replies``."""
        by_node: dict[tuple[str, int], list[int]] = {}
        for i, address in due.items():
            by_node.setdefault(address, []).append(i)
        try:
            for address, indexes in by_node.items():
                conn = self._connection(address)
                out: list[tuple[Any, ...]] = []
                for i in indexes:
                    out += [("ASKING",), commands[i]] if i in asking else [commands[i]]
                conn.send_packed_command(pack_commands(conn, out))
            for address, indexes in by_node.items():
                conn = self._conns[address]
                for i in indexes:
                    if i in asking:
                        conn.read_response()
                    try:
                        replies[i] = conn.read_response()
                    except ResponseError as exc:
                        replies[i] = exc
        except BaseException:
            # Replies still due would come out of step, and a node may be gone: start afresh.
            self._drop_all()
            self._stale = True
            raise

    def _connection(self, address: tuple[str, int]) -> Any:
        conn = self._conns.get(address)
        if conn is None:
            node = self._cluster.nodes_manager.get_node(host=address[0], port=address[1])
            if node is None or node.redis_connection is None:
                node = self._cluster.get_default_node()  # type: ignore[no-untyped-call]  # an ASK target not in the slot map: its settings
            pool = node.redis_connection.connection_pool
            conn = pool.connection_class(**{**pool.connection_kwargs, "host": address[0], "port": address[1]})
            conn.connect()
            self._conns[address] = conn
        return conn

    def _refresh(self) -> None:
        """Read the slot map again (after a lost node: a replica may have been promoted)."""
        try:
            self._cluster.nodes_manager.initialize()
        except RedisClusterException as exc:
            raise RedisConnectionError(f"no cluster node answers: {exc}") from exc
        self._stale = False

    def _drop_all(self) -> None:
        for conn in self._conns.values():
            conn.disconnect()
        self._conns.clear()

    def close(self) -> None:
        with self._lock:
            self._drop_all()
