"""The key that signs what ryzanstein itself puts on the ingress stream, so no client can forge it.

A request moved off a group (failed over by a balancer, handed back by a draining group) goes back
on ``{p}:requests`` with fields only the pipeline may set: ``_takeover`` (the owner and epoch it is
taken over from), ``_enqueued_ms`` (its first arrival, which orders it and starts its timeout) and
``_weights``. Any client can XADD to the ingress stream, so those fields count only inside a payload
signed with HMAC-SHA256 under a random key kept in Redis (``Keys.signing_key``), which the pipeline's
processes read and clients cannot (the ACL recipe of docs/OPERATIONS.md gives them no read access
outside their own reply streams). An entry with ``_``-prefixed fields and no valid signature is
refused (``broker.protocol.parse_request``).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from collections.abc import Callable
from typing import Any

from redis import Redis

from broker.keys import Keys

SIGNATURE_FIELD = "_sig"  # the entry field next to ``payload`` that carries its signature (hex)
REFRESH_S = 1.0  # a signature that does not verify re-reads the key at most this often
PREVIOUS_KEY_S = 60.0  # after the key changed, what the key before it signed still verifies this long


def sign(key: bytes, payload: bytes) -> str:
    """HMAC-SHA256 of ``payload`` under ``key``, hex."""
    return hmac.new(key, payload, hashlib.sha256).hexdigest()


def verify(key: bytes | None, payload: Any, signature: Any) -> bool:
    """Whether ``signature`` (bytes or str, hex) signs ``payload`` (bytes) under ``key``."""
    if key is None or not isinstance(payload, bytes) or not isinstance(signature, (bytes, str)):
        return False
    if isinstance(signature, bytes):
        try:
            signature = signature.decode("ascii")
        except UnicodeDecodeError:
            return False
    return hmac.compare_digest(sign(key, payload), signature)


class SigningKey:
    """The signing key of one prefix, as read from Redis (created there by the first to need it).

    Writers (``get``) read it afresh each time they sign seldom (failover, drain); a balancer
    signing every queue entry keeps it (``current``) and reads it again with each registry refresh.
    Readers (``for_entry``, ``verifies``) keep it, and read it again when a signature does not
    verify (the key was deleted and made anew), at most every ``REFRESH_S``, so forged signatures
    cost one GET a second at most; the key read before stays good for ``PREVIOUS_KEY_S`` more (what
    was signed just before the change). Raises the connection's errors.
    """

    def __init__(self, redis: Redis, keys: Keys, *, monotonic: Callable[[], float] = time.monotonic) -> None:
        self.redis = redis
        self.keys = keys
        self._monotonic = monotonic
        self._key: bytes | None = None
        self._read_at = -REFRESH_S
        self._previous: tuple[bytes, float] | None = None  # the key read before, and until when it is good

    def get(self) -> bytes:
        """The key now: read from Redis, made there first (32 random bytes, hex) when missing."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.set(self.keys.signing_key, secrets.token_hex(32), nx=True)
        pipe.get(self.keys.signing_key)
        _, value = pipe.execute()
        key = value.encode() if isinstance(value, str) else value
        assert key is not None
        self._read_at = self._monotonic()
        if self._key is not None and key != self._key:
            self._previous = (self._key, self._read_at + PREVIOUS_KEY_S)
        self._key = key
        return key

    def _good(self, payload: Any, signature: Any) -> bytes | None:
        """The key kept, or the one before it while still good, that ``signature`` verifies under."""
        if verify(self._key, payload, signature):
            return self._key
        if self._previous is not None and self._monotonic() < self._previous[1] \
                and verify(self._previous[0], payload, signature):
            return self._previous[0]
        return None

    def current(self) -> bytes:
        """The key kept (read from Redis first when none is)."""
        return self._key if self._key is not None else self.get()

    def verifies(self, payload: bytes, signature: Any) -> bool:
        """Whether ``signature`` signs ``payload`` under the key kept, or, failing that, under the key
        read again (rate-limited, as ``for_entry``)."""
        if self._good(payload, signature) is not None:
            return True
        if self._key is None or self._monotonic() - self._read_at >= REFRESH_S:
            self.get()
            return self._good(payload, signature) is not None
        return False

    def for_entry(self, fields: dict[Any, Any]) -> bytes | None:
        """The key to check ``fields`` (an ingress entry) against: the one kept (or the one before it,
        while good, if that is what the entry was signed under), or, when the entry carries a
        signature that verifies under neither, the key read again (rate-limited)."""
        signature = fields.get(SIGNATURE_FIELD.encode(), fields.get(SIGNATURE_FIELD))
        if signature is None:
            return self._key
        payload = fields.get(b"payload", fields.get("payload"))
        if (good := self._good(payload, signature)) is not None:
            return good
        if self._monotonic() - self._read_at >= REFRESH_S:
            self.get()
            return self._good(payload, signature) or self._key
        return self._key
