"""Telling a result that expired from one not written yet, for readers of a reply stream.

A reader that finds no events may be early (the request still waits in the ingress stream or a
queue) or late (the result expired: reply streams and request state last ``result_ttl_s`` after
their last event). After a blocking read that returned nothing, ``ExpiryCheck`` asks Redis, in
one round trip, whether anything of the request is left: its state hash (from routing until
expiry), the hold on its id (``{p}:id:<id>``, from routing), and, when the handle knows it, its
ingress entry (present until a balancer handled it). Nothing left means expired, or an id nobody
sent; a handle without its entry id must find nothing twice in a row (two empty blocking reads)
before the reader says so, since a request may still wait, unseen, in the ingress stream.
"""

from __future__ import annotations

from typing import Any

from redis.asyncio.client import Pipeline as AsyncPipeline
from redis.client import Pipeline

from broker.errors import ResultExpired
from broker.keys import Keys
from producer.request import Handle


class ExpiryCheck:
    def __init__(self, keys: Keys, handle: Handle, *, result_ttl_s: float, ingress: str | None = None) -> None:
        self.keys = keys
        self.ingress = ingress or keys.requests  # the stream the request was sent on (a tenant's own)
        self.handle = handle
        self.result_ttl_s = result_ttl_s
        self._misses = 0

    def add(self, pipe: Pipeline | AsyncPipeline) -> None:
        """Add the look-up to a redis-py pipeline (sync or async, ``raise_on_error=False`` when
        executed: a tenant's Redis user may see only some of these keys)."""
        h = self.handle
        pipe.exists(self.keys.state(h.reply_to, h.id))
        pipe.exists(self.keys.request_id(h.id))
        if h.entry_id:
            pipe.xrange(self.ingress, h.entry_id, h.entry_id, count=1)

    def verdict(self, results: list[Any]) -> None:
        """Raise ResultExpired when nothing of the request is left (often enough in a row). Look-ups
        the server refused (NOPERM) tell nothing; without the entry's, two misses are needed."""
        seen = [r for r in results if not isinstance(r, Exception)]
        if not seen:
            return
        left = any(bool(r) for r in seen)
        exact = len(results) == 3 and not isinstance(results[2], Exception)
        self._misses = 0 if left else self._misses + 1
        if self._misses >= (1 if exact else 2):
            h = self.handle
            raise ResultExpired(h.id, (
                f"no result for request {h.id} on {h.reply_to!r}: it expired (results last {self.result_ttl_s:g}s "
                f"after their last event), or no request with this id was handled; an error about the "
                f"request itself may be on {self.keys.result(h.id)!r}"))
