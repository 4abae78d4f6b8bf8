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

    Writers (``get``) read it afresh each time they sign: they sign seldom (failover, drain).
    Readers (``for_entry``) keep it, and read it again when a signature does not verify (the key
    was deleted and made anew), at most every ``REFRESH_S``, so forged signatures cost one GET a
    second at most. Raises the connection's errors.
    """

    def __init__(self, redis: Redis, keys: Keys, *, monotonic: Callable[[], float] = time.monotonic) -> None:
        self.redis = redis
        self.keys = keys
        self._monotonic = monotonic
        self._key: bytes | None = None
        self._read_at = -REFRESH_S

    def get(self) -> bytes:
        """The key now: read from Redis, made there first (32 random bytes, hex) when missing."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.set(self.keys.signing_key, secrets.token_hex(32), nx=True)
        pipe.get(self.keys.signing_key)
        _, value = pipe.execute()
        self._key = value.encode() if isinstance(value, str) else value
        self._read_at = self._monotonic()
        assert self._key is not None
        return self._key

    def current(self) -> bytes:
        """The key kept (read from Redis first when none is)."""
        return self._key if self._key is not None else self.get()

    def verifies(self, payload: bytes, signature: Any) -> bool:
        """Whether ``signature`` signs ``payload`` under the key kept, or, failing that, under the key
        read again (rate-limited, as ``for_entry``)."""
        if verify(self._key, payload, signature):
            return True
        if self._key is None or self._monotonic() - self._read_at >= REFRESH_S:
            return verify(self.get(), payload, signature)
        return False

    def for_entry(self, fields: dict[Any, Any]) -> bytes | None:
        """The key to check ``fields`` (an ingress entry) against: the one kept, or, when the entry
        carries a signature that does not verify under it, the key read again (rate-limited)."""
        signature = fields.get(SIGNATURE_FIELD.encode(), fields.get(SIGNATURE_FIELD))
        if signature is None:
            return self._key
        payload = fields.get(b"payload", fields.get("payload"))
        if (not verify(self._key, payload, signature)
                and self._monotonic() - self._read_at >= REFRESH_S):
            self.get()
        return self._key
