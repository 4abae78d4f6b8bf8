"""Poison entries: a request that cannot be handled ends with an error where one can be written,
else its entry goes to the dead-letter stream ``{p}:dead``; either way it is acknowledged.

Balancers and worker groups share this one mechanism. A per-request failure (a Redis error about
the request's keys, such as WRONGTYPE or NOPERM; a reply of an unexpected shape; an exception in
validation or routing) must never leave the entry pending, where every later pass would meet it
again (the loop the issue "Shared use without trust" found: thousands of failed claims a second).

``Attempts`` bounds the retries of failures that may pass (with a backoff between them); what
fails for good, or too often, goes to ``DeadLetters.give_up``, which tries, in order:

1. the error event on the request's reply stream (``PUBLISH``, fenced as usual);
2. the error event on the request's default result stream ``{p}:result:<id>``, when the reply
   stream is another key (an existing key of another type, or one the server refuses: NOPERM);
3. an entry on ``{p}:dead`` with the reason, kept up to ``DEAD_MAX_LEN`` entries (``XADD MAXLEN ~``).

Redis errors that say the server is busy, moving or loading (``TRANSIENT_REPLIES``) are not about
the request: the loops retry those with a backoff like a lost connection.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from redis import Redis
from redis.exceptions import NoPermissionError, ResponseError
from redis.typing import EncodableT, FieldT

from broker.connection import TRANSIENT_ERRORS
from broker.events import error_event
from broker.keys import Keys
from broker.logs import request_extra
from broker.scripts import Scripts, pack_events, publish_result

log = logging.getLogger(__name__)

DEAD_MAX_LEN = 10_000  # entries kept on {p}:dead (approximately: XADD MAXLEN ~)
DEAD_FIELD_BYTES = 4096  # of each field of the original entry kept on {p}:dead (prompts can be large)
MAX_ATTEMPTS = 3  # tries of one entry before it is given up (after errors that may pass)
RETRY_BASE_S = 0.1  # backoff before the second try; doubled for each further one

# Error replies that say nothing about the request: the server is loading, busy, out of memory, or
# (Cluster) the slot moved. Retried by the loop, never held against a request.
TRANSIENT_REPLIES = ("LOADING", "BUSY", "OOM", "TRYAGAIN", "CLUSTERDOWN", "MASTERDOWN", "READONLY",
                     "MOVED", "ASK", "NOSCRIPT")


def is_transient(exc: BaseException) -> bool:
    """Whether ``exc`` is a failure of the connection or server, not of one request."""
    if isinstance(exc, TRANSIENT_ERRORS):
        return True
    return isinstance(exc, ResponseError) and str(exc).split(" ", 1)[0] in TRANSIENT_REPLIES


def describe(exc: BaseException | str) -> str:
    """A short reason for logs, error messages and ``{p}:dead``: the Redis reply, else the type."""
    if isinstance(exc, str):
        return exc
    if isinstance(exc, NoPermissionError):  # redis-py drops the NOPERM prefix of the reply
        return f"NOPERM {exc}"[:300]
    if isinstance(exc, ResponseError):
        return str(exc)[:300]
    return f"{type(exc).__name__}: {str(exc)[:200]}"


@dataclass(slots=True)
class Attempts:
    """Failed tries per entry: when the next one may run, and when to stop trying.

    Time is passed in (seconds on a monotonic clock), so the backoff is tested without sleeping.
    """

    max_attempts: int = MAX_ATTEMPTS
    base_s: float = RETRY_BASE_S
    _failed: dict[bytes, tuple[int, float]] = field(default_factory=dict)  # entry -> (failures, retry at)

    def failed(self, entry_id: bytes, *, now: float) -> bool:
        """Record a failure; True when the entry has had its tries and must be given up."""
        count = self._failed.get(entry_id, (0, 0.0))[0] + 1
        self._failed[entry_id] = (count, now + self.base_s * 2 ** (count - 1))
        return count >= self.max_attempts

    def ready(self, entry_id: bytes, *, now: float) -> bool:
        """Whether the entry may be tried now (never failed, or its backoff has passed)."""
        got = self._failed.get(entry_id)
        return got is None or got[1] <= now

    def next_retry(self) -> float | None:
        """The earliest time an entry backing off may be tried again; None when none is."""
        return min((at for _n, at in self._failed.values()), default=None)

    def forget(self, entry_id: bytes) -> None:
        self._failed.pop(entry_id, None)

    def __len__(self) -> int:
        return len(self._failed)


class DeadLetters:
    """Ends requests that cannot be handled (see the module docstring); ``on_dead`` counts them."""

    def __init__(self, redis: Redis, scripts: Scripts, keys: Keys, *, publisher: str, ttl_ms: int,
                 on_dead: Callable[[], None] = lambda: None) -> None:
        self.redis = redis
        self.scripts = scripts
        self.keys = keys
        self.publisher = publisher
        self.ttl_ms = ttl_ms
        self.on_dead = on_dead

    def give_up(self, *, source: str, entry_id: bytes | str, request_id: str | None, reply_to: str | None,
                reason: str, code: str = "internal", epoch: int = 0, reply_to_failed: bool = False,
                fields: dict[Any, Any] | None = None) -> bool:
        """End one request with error ``code`` (message ``reason``), else dead-letter its entry.

        ``source`` names the stream the entry came from (``{p}:requests`` or a group queue);
        ``reply_to_failed`` skips the reply stream when a write there just failed. True when an
        error event was written (or the request had its final event already, or belongs to
        another owner who will write it), False when the entry went to ``{p}:dead``.
        Raises only the connection's transient errors (the caller's loop retries).
        """
        if request_id is not None:
            default = self.keys.result(request_id)
            targets = [] if reply_to_failed or reply_to is None else [reply_to]
            if default != reply_to:
                targets.append(default)
            for target in targets:
                if self._publish_error(target, request_id, code, reason, epoch=epoch if target == reply_to else 0):
                    log.warning("request %s ended with error %s on %r: %s", request_id, code, target, reason,
                                extra=request_extra(request_id))
                    return True
        self._dead(source=source, entry_id=entry_id, request_id=request_id, reply_to=reply_to, reason=reason,
                   fields=fields)
        return False

    def _publish_error(self, reply: str, request_id: str, code: str, reason: str, *, epoch: int) -> bool:
        event = error_event(request_id, code, reason)
        try:
            raw = self.scripts.publish(reply_stream=reply, progress=self.keys.progress(reply, request_id),
                                       publisher=self.publisher, epoch=epoch, ttl_ms=self.ttl_ms,
                                       events=pack_events([("f", 0, event)]))
            publish_result(raw)
        except Exception as exc:
            if isinstance(exc, TRANSIENT_ERRORS):
                raise
            log.warning("request %s: cannot write its error to %r: %s", request_id, reply, describe(exc),
                        extra=request_extra(request_id))
            return False
        return True  # ok; or final / fenced: the request has, or will get, its final event elsewhere

    def _dead(self, *, source: str, entry_id: bytes | str, request_id: str | None, reply_to: str | None,
              reason: str, fields: dict[Any, Any] | None) -> None:
        record: dict[FieldT, EncodableT] = {
            "source": source,
            "entry_id": entry_id,
            "id": request_id or "",
            "reply_to": reply_to or "",
            "reason": reason,
            "by": self.publisher,
        }
        for name, value in (fields or {}).items():
            key = name.decode("utf-8", "replace") if isinstance(name, bytes) else str(name)
            if isinstance(value, (bytes, str)) and key not in record:
                record[f"f:{key}"[:256]] = value[:DEAD_FIELD_BYTES]
        try:
            self.redis.xadd(self.keys.dead, record, maxlen=DEAD_MAX_LEN, approximate=True)
        except Exception as exc:
            if isinstance(exc, TRANSIENT_ERRORS):
                raise
            log.error("cannot write to %s: %s", self.keys.dead, describe(exc))
        self.on_dead()
        log.error("entry %r of %s moved to %s: %s", entry_id, source, self.keys.dead, reason,
                  extra=request_extra(request_id or ""))
