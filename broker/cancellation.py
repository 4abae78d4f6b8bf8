"""Cancel entries, and whose they are: a request sent with a ``cancel_token`` is cancelled only by an
entry that carries the same token.

``XADD {p}:cancel * id <id>`` cancels a request sent without a token (the original form). A request
sent with ``cancel_token <secret>`` needs ``XADD {p}:cancel * id <id> token <secret>``: under the
ACL recipe of docs/OPERATIONS.md clients may write ``{p}:cancel`` and ``{p}:requests`` but read
neither, so no one else learns the secret, and knowing a request's id is no longer enough to end it.
Balancers and worker groups keep what they read for a horizon (``Settings.cancel_horizon_s``, by
10 minutes), so that a cancel that comes before its request still applies.

A tenant's cancel stream (``{p}:t:<tenant>:cancel``, broker.sources) ends that tenant's requests only,
and ``{p}:cancel`` only requests of the shared ingress stream: a cancel is remembered with the
tenant of the stream it was read from, and matches a request of the same tenant.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, NamedTuple

from broker.protocol import ID_RE, MAX_TOKEN_BYTES, is_later_entry_id
from broker.settings import Settings

HORIZON_MS = int(Settings.model_fields["cancel_horizon_s"].default * 1000)  # the setting's default
# (request id, token) pairs remembered at most, the oldest of the tenant with the most forgotten
# first: memory stays bounded whatever is written to the cancel streams, a tenant's flood pushes out
# its own cancels only, and a stranger's wrong tokens on the shared stream cannot push out the
# owner's except by outnumbering every cancel of the last HORIZON_MS (a flood, seen in the metrics).
MAX_REMEMBERED = 50_000


class Cancel(NamedTuple):
    """One cancel entry as read: the request id it names, its token, the tenant of its stream."""

    request_id: str
    token: str | None
    tenant: str | None = None


def _text(value: Any) -> str | None:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return value if isinstance(value, str) else None


class Cancellations:
    """Cancel entries seen lately: per tenant (None: the shared stream), (request id, token or None)
    -> when last seen (Redis ms), oldest first. Only what a request could match is kept: an id of the
    protocol's form (``ID_RE``) and a token within the protocol's size; anything else is no request's
    cancel and is forgotten at once. At ``max_remembered`` in all, the oldest cancel of the tenant
    that has the most is forgotten: a tenant flooding its cancel stream pushes out its own only."""

    def __init__(self, *, horizon_ms: float = HORIZON_MS, max_remembered: int = MAX_REMEMBERED) -> None:
        self.horizon_ms = horizon_ms
        self._pairs: dict[str | None, OrderedDict[Cancel, float]] = {}  # tenant -> its cancels, oldest first
        self._count = 0
        self._ids: dict[tuple[str | None, str], int] = {}  # (tenant, request id) -> cancels remembered
        self._max = max_remembered
        self._next_prune = 0.0

    def add(self, fields: dict[Any, Any], now_ms: float, *, entry_id: bytes | str | None = None,
            tenant: str | None = None) -> Cancel | None:
        """Take in one cancel entry's fields, read from ``tenant``'s cancel stream (None: the shared
        one); the ``Cancel`` it is, or None when it names no id a
        request can have, carries a token no request can have, or names a stream entry id later than
        the cancel's own ``entry_id`` (the id a later request sent without 'id' will get: remembered,
        it would cancel that request before it is sent)."""
        rid = _text(fields.get(b"id", fields.get("id")))
        if not rid or len(rid) > 128 or not ID_RE.fullmatch(rid):
            return None
        own = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
        if own is not None and is_later_entry_id(rid, own):
            return None
        token = _text(fields.get(b"token", fields.get("token"))) or None
        if token is not None and len(token.encode()) > MAX_TOKEN_BYTES:
            return None
        pair = Cancel(rid, token, tenant)
        if pair in self._pairs.get(tenant, ()):
            self._pairs[tenant].move_to_end(pair)
        else:
            while self._count >= self._max:
                self._forget_oldest(max(self._pairs, key=lambda t: len(self._pairs[t])))
            self._ids[(tenant, rid)] = self._ids.get((tenant, rid), 0) + 1
            self._count += 1
        self._pairs.setdefault(tenant, OrderedDict())[pair] = now_ms
        return pair

    def _forget_oldest(self, tenant: str | None) -> None:
        pairs = self._pairs[tenant]
        (rid, _token, _tenant), _when = pairs.popitem(last=False)
        if not pairs:
            del self._pairs[tenant]
        self._count -= 1
        left = self._ids[(tenant, rid)] - 1
        if left:
            self._ids[(tenant, rid)] = left
        else:
            del self._ids[(tenant, rid)]

    def matches(self, request_id: str, cancel_token: str | None, tenant: str | None = None) -> bool:
        """Whether a cancel seen for ``request_id`` applies to a request with ``cancel_token`` of
        ``tenant`` (read from that tenant's cancel stream)."""
        if cancel_token is None:
            return (tenant, request_id) in self._ids
        return Cancel(request_id, cancel_token, tenant) in self._pairs.get(tenant, ())

    def prune(self, now_ms: float) -> None:
        """Forget cancels older than the horizon (a pass at most once a minute)."""
        if now_ms < self._next_prune:
            return
        self._next_prune = now_ms + 60_000
        horizon = now_ms - self.horizon_ms
        for tenant in list(self._pairs):
            while tenant in self._pairs and next(iter(self._pairs[tenant].values())) < horizon:
                self._forget_oldest(tenant)

    def __contains__(self, request_id: str) -> bool:
        """Whether a cancel of the shared cancel stream named ``request_id``."""
        return (None, request_id) in self._ids

    def __len__(self) -> int:
        return self._count


def applies(cancel_token: str | None, token: str | None, *, tenant: str | None = None,
            cancel_tenant: str | None = None) -> bool:
    """Whether one cancel entry carrying ``token``, read from ``cancel_tenant``'s cancel stream, ends a
    request of ``tenant`` sent with ``cancel_token``."""
    return tenant == cancel_tenant and (cancel_token is None or cancel_token == token)
