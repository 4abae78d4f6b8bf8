"""Cancel entries, and whose they are: a request sent with a ``cancel_token`` is cancelled only by an
entry that carries the same token.

``XADD {p}:cancel * id <id>`` cancels a request sent without a token (the original form). A request
sent with ``cancel_token <secret>`` needs ``XADD {p}:cancel * id <id> token <secret>``: under the
ACL recipe of docs/OPERATIONS.md clients may write ``{p}:cancel`` and ``{p}:requests`` but read
neither, so no one else learns the secret, and knowing a request's id is no longer enough to end it.
Balancers and worker groups keep what they read for a horizon (``Settings.cancel_horizon_s``, by
10 minutes), so that a cancel that comes before its request still applies.
"""

from __future__ import annotations

from typing import Any

from broker.protocol import is_later_entry_id
from broker.settings import Settings

HORIZON_MS = int(Settings.model_fields["cancel_horizon_s"].default * 1000)  # the setting's default
MAX_TOKENS_PER_ID = 32  # tokens kept per request id (a flood of wrong ones cannot grow it further)


def _text(value: Any) -> str | None:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return value if isinstance(value, str) else None


class Cancellations:
    """Cancel entries seen lately: request id -> (last seen, Redis ms; tokens, None for none)."""

    def __init__(self, *, horizon_ms: float = HORIZON_MS) -> None:
        self.horizon_ms = horizon_ms
        self._seen: dict[str, tuple[float, set[str | None]]] = {}
        self._next_prune = 0.0

    def add(self, fields: dict[Any, Any], now_ms: float, *, entry_id: bytes | str | None = None
            ) -> tuple[str, str | None] | None:
        """Take in one cancel entry's fields; its (request id, token), or None when it names no id,
        or names a stream entry id later than the cancel's own ``entry_id`` (the id a later request
        sent without 'id' will get: remembered, it would cancel that request before it is sent)."""
        rid = _text(fields.get(b"id", fields.get("id")))
        if not rid:
            return None
        own = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
        if own is not None and is_later_entry_id(rid, own):
            return None
        token = _text(fields.get(b"token", fields.get("token"))) or None
        _when, tokens = self._seen.get(rid, (now_ms, set()))
        if len(tokens) < MAX_TOKENS_PER_ID:
            tokens.add(token)
        self._seen[rid] = (now_ms, tokens)
        return rid, token

    def matches(self, request_id: str, cancel_token: str | None) -> bool:
        """Whether a cancel seen for ``request_id`` applies to a request with ``cancel_token``."""
        seen = self._seen.get(request_id)
        if seen is None:
            return False
        return cancel_token is None or cancel_token in seen[1]

    def prune(self, now_ms: float) -> None:
        """Forget cancels older than the horizon (a pass at most once a minute)."""
        if now_ms < self._next_prune:
            return
        self._next_prune = now_ms + 60_000
        horizon = now_ms - self.horizon_ms
        self._seen = {k: v for k, v in self._seen.items() if v[0] >= horizon}

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._seen


def applies(cancel_token: str | None, token: str | None) -> bool:
    """Whether one cancel entry carrying ``token`` ends a request sent with ``cancel_token``."""
    return cancel_token is None or cancel_token == token
