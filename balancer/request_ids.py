"""Request ids are unique while their results last: a second request with an id in use is refused.

The first ingress entry to use an id holds it (``{p}:id:<id>``: its entry id and reply stream, for
the result TTL). A later entry with that id is a duplicate, told apart from a re-read of the same
entry (a balancer crashed: the entry id matches) and from a request put back by failover or a
draining group (``takeover_from``: the same request, with a new entry id, not checked here):

- with a reply stream of its own, it ends with error ``duplicate_id`` there;
- with the first request's reply stream (the default one of the id, typically), that stream
  carries the first request's events, which answer it too: it is acknowledged as a retry.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from broker.keys import Keys
from broker.wire import Batch, Wire


@dataclass(frozen=True, slots=True)
class Holder:
    """Who holds a request id."""

    entry_id: str
    reply_to: str

    @classmethod
    def parse(cls, raw: Any) -> Holder | None:
        if not isinstance(raw, (bytes, str)):
            return None
        text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else raw
        entry_id, _, reply_to = text.partition(" ")
        return cls(entry_id, reply_to)


def hold_ids(wire: Wire, keys: Keys, requests: list[tuple[bytes, str, str]], *, ttl_ms: int) -> list[Holder | None]:
    """Hold each (entry id, request id, reply stream) in one round trip; who holds each id now.

    A holder equal to the caller's entry means the id is its own. None when the reply could not be
    read (an error reply: the caller treats the id as its own, as before ids were held).
    Raises the connection's errors.
    """
    if not requests:
        return []
    batch = Batch()
    for entry_id, request_id, reply_to in requests:
        key = keys.request_id(request_id)
        batch.set_nx(key, f"{entry_id.decode()} {reply_to}", px=ttl_ms)
        batch.get(key)
    results = wire.execute(batch)
    return [Holder.parse(results[2 * i + 1]) for i in range(len(requests))]
