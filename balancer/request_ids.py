"""Request ids are unique while their results last: a second request with an id in use is refused.

The first ingress entry to use an id holds it (``{p}:id:<id>``: its entry id and reply stream, for
the result TTL). A later entry with that id is a duplicate, told apart from a re-read of the same
entry (a balancer crashed: the entry id matches) and from a request put back by failover or a
draining group (``takeover_from``: the same request, with a new entry id, not checked here):

- with a reply stream of its own, it ends with error ``duplicate_id`` there;
- with the first request's reply stream (the default one of the id, typically), that stream
  carries the first request's events, which answer it too: it is acknowledged as a retry.

A new request holds its id in the round trip that claims and queues it (``add_hold`` in the
balancer's claim pipeline, ahead of its CLAIM_OWNER: no round trip of its own); the requests of one
batch hold theirs in that pipeline's order: valid requests (routed, then waiting) before entries
that failed validation, so an invalid entry never takes the id of a valid one read with it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from broker.keys import Keys
from broker.wire import Batch


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


def add_hold(batch: Batch, keys: Keys, entry_id: bytes, request_id: str, reply_to: str, *, ttl_ms: int) -> int:
    """Add the hold of ``request_id`` by ``entry_id`` (SET NX) and the read of its holder (GET) to
    ``batch``; the GET's handle, whose reply ``Holder.parse`` reads (None when it could not be read:
    an error reply, and the caller treats the id as its own, as before ids were held)."""
    key = keys.request_id(request_id)
    batch.set_nx(key, f"{entry_id.decode()} {reply_to}", px=ttl_ms)
    return batch.get(key)


def is_duplicate(holder: Holder | None, entry_id: bytes) -> bool:
    """Whether the id is held by another entry than ``entry_id``."""
    return holder is not None and holder.entry_id != entry_id.decode()
