"""Building a request's ingress entry, and reading the events that come back.

Plain Python, no Redis: the flat-field protocol of CONTRACT.md as the clients speak it.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, TypedDict

from broker.errors import InvalidRequest, RequestFailed
from broker.protocol import FINAL_EVENTS, ID_RE


class RequestOptions(TypedDict, total=False):
    """Everything a request may carry besides its prompt (CONTRACT.md, "Requests"); None = unset."""

    prompt_ids: Sequence[int] | None  # token ids instead of a prompt
    max_tokens: int | None
    temperature: float | None  # 0 = greedy
    top_p: float | None
    top_k: int | None  # 0 = off
    seed: int | None
    stop: str | Sequence[str] | None  # one stop string or several
    stop_token_ids: Sequence[int] | None  # generation ends on any of these token ids
    model: str | None  # a served model name; default: the only model served (or the configured default)
    stream: bool  # also send one `token` event per generated token
    priority: int | None  # lower is served earlier
    timeout_s: float | None  # server-side deadline from enqueue (not how long the client waits)
    request_id: str | None  # default: a fresh uuid4 hex
    reply_to: str | None  # default: the client's choice (see Client / AsyncClient)


@dataclass(frozen=True, slots=True)
class Handle:
    """A submitted request: its id and the stream its events go to."""

    id: str
    reply_to: str
    # The ingress entry that carried it (XADD's reply), when this client sent it: lets a reader tell
    # a result that expired from one not written yet (producer.expiry).
    entry_id: str | None = field(default=None, compare=False)
    # The request's cancel token (a secret: only a cancel carrying it ends the request).
    cancel_token: str | None = field(default=None, compare=False, repr=False)


@dataclass(frozen=True, slots=True)
class Completion:
    """The outcome of a request that ended with a ``done`` event."""

    id: str
    text: str
    token_ids: list[int]
    finish_reason: str  # stop | length | cancelled
    prompt_tokens: int
    completion_tokens: int

    @classmethod
    def from_event(cls, event: Event) -> Completion:
        """The completion a ``done`` event carries; RequestFailed for an ``error`` event."""
        event.raise_for_error()
        if event.kind != "done":
            raise ValueError(f"not a final event: {event.kind!r}")
        try:
            token_ids = json.loads(event.fields["token_ids"])
            if not isinstance(token_ids, list) or not all(isinstance(t, int) for t in token_ids):
                raise ValueError("token_ids is not a JSON array of integers")
            return cls(
                id=event.id,
                text=event.fields["text"],
                token_ids=token_ids,
                finish_reason=event.fields["finish_reason"],
                prompt_tokens=int(event.fields["prompt_tokens"]),
                completion_tokens=int(event.fields["completion_tokens"]),
            )
        except (KeyError, ValueError) as exc:
            raise RequestFailed(event.id, "internal", f"malformed done event: {exc!r}") from None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True, slots=True)
class Event:
    """One entry of a reply stream: ``kind`` is token, done or error; ``fields`` are all its fields."""

    id: str
    kind: str
    fields: dict[str, str]
    entry_id: str = ""  # the stream entry id it was read from

    @classmethod
    def from_entry(cls, entry_id: bytes | str, raw: dict[Any, Any]) -> Event | None:
        """Parse a reply-stream entry; None for an entry that is not an event (no id or event)."""
        fields = {_text(k): _text(v) for k, v in raw.items()}
        if "id" not in fields or "event" not in fields:
            return None
        return cls(id=fields["id"], kind=fields["event"], fields=fields, entry_id=_text(entry_id))

    @property
    def final(self) -> bool:
        """Whether this is the request's one final event (done or error)."""
        return self.kind in FINAL_EVENTS

    @property
    def text(self) -> str:
        """A token event's text delta, a done event's whole text; "" otherwise."""
        return self.fields.get("text", "")

    def raise_for_error(self) -> None:
        if self.kind == "error":
            raise RequestFailed(self.id, self.fields.get("code", "internal"), self.fields.get("message", ""))


def _text(value: bytes | str) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def event_id(entry_id: bytes | str) -> str:
    """A stream entry id as text."""
    return _text(entry_id)


def new_request_id() -> str:
    return uuid.uuid4().hex


def request_fields(
    prompt: str | None = None,
    *,
    request_id: str,
    prompt_ids: Sequence[int] | None = None,
    max_tokens: int | None = None,
    temperature: float | None = None,
    top_p: float | None = None,
    top_k: int | None = None,
    seed: int | None = None,
    stop: str | Sequence[str] | None = None,
    stop_token_ids: Sequence[int] | None = None,
    model: str | None = None,
    stream: bool = False,
    priority: int | None = None,
    timeout_s: float | None = None,
    reply_to: str | None = None,
    cancel_token: str | None = None,
) -> dict[str, str]:
    """The ingress entry for one request: flat string fields, only those that are set.

    Catches the mistakes that are the caller's alone (no prompt, a bad id); everything else is
    validated where every client's requests are, and comes back as an ``error`` event.
    """
    if (prompt is None) == (prompt_ids is None):
        raise InvalidRequest("exactly one of 'prompt' and 'prompt_ids' must be given")
    if not ID_RE.fullmatch(request_id):
        raise InvalidRequest(
            f"field 'id': must be 1-128 characters of [A-Za-z0-9_.:-], got {request_id!r:.60}"
        )
    fields = {"id": request_id}
    if prompt is not None:
        fields["prompt"] = prompt
    if prompt_ids is not None:
        fields["prompt_ids"] = json.dumps([int(t) for t in prompt_ids], separators=(",", ":"))
    for name, value in (("max_tokens", max_tokens), ("top_k", top_k), ("seed", seed), ("priority", priority)):
        if value is not None:
            fields[name] = str(int(value))
    for name, number in (("temperature", temperature), ("top_p", top_p), ("timeout_s", timeout_s)):
        if number is not None:
            fields[name] = repr(float(number))
    if stop is not None:
        fields["stop"] = json.dumps([stop] if isinstance(stop, str) else list(stop))
    if stop_token_ids is not None:
        fields["stop_token_ids"] = json.dumps([int(t) for t in stop_token_ids], separators=(",", ":"))
    if model is not None:
        fields["model"] = model
    if stream:
        fields["stream"] = "1"
    if reply_to is not None:
        fields["reply_to"] = reply_to
    if cancel_token is not None:
        fields["cancel_token"] = cancel_token
    return fields
