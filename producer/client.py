"""The Python client: put requests on the ingress stream, read their events from reply streams.

``Client`` blocks: each wait is its own XREAD on the request's reply stream. Its asyncio twin,
``AsyncClient``, lives in producer.async_client; what both share (settings, deadlines, retries,
reading reply streams) is here.

Both speak only the flat-field protocol of CONTRACT.md, so their requests look like any other
client's.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import random
import secrets
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from broker.connection import TRANSIENT_ERRORS, backoff_delays, connect, resolve_url
from broker.errors import RequestFailed, RyzansteinError, WaitTimeout
from broker.keys import Keys
from broker.settings import Settings, load_settings
from producer.chat_template import TemplateSource, render_chat
from producer.expiry import ExpiryCheck
from producer.request import (
    Choice,
    Completion,
    Event,
    GenerationOptions,
    Handle,
    RequestOptions,
    new_request_id,
    request_fields,
)

if TYPE_CHECKING:
    import redis
    import redis.asyncio
    from typing_extensions import Self, Unpack

__all__ = ["Choice", "Client", "ClientClosed", "Completion", "Event", "Handle", "RequestOptions"]

log = logging.getLogger(__name__)

# Most entries one XREAD returns; a reader loops for more.
READ_COUNT = 512
# The dispatcher's blocking read: short, so that close() never needs to cancel a blocked read.
DISPATCH_BLOCK_MS = 200
# The stream id before every real entry: read from the start.
STREAM_START = "0-0"
# How many request ids a client remembers the non-default reply stream of, for result(id).
REMEMBER_REPLY_STREAMS = 4096


def _client_settings(redis_url: str | None, prefix: str | None, settings: Settings | None) -> Settings:
    base = settings if settings is not None else load_settings()
    updates = {k: v for k, v in (("redis_url", redis_url), ("prefix", prefix)) if v is not None}
    return base.model_copy(update=updates) if updates else base


def _stream_entries(reply: Any) -> list[tuple[Any, Any]]:
    """The entries of an XREAD reply on one stream (RESP2 list or RESP3 map)."""
    if not reply:
        return []
    if isinstance(reply, dict):  # RESP3: {stream: [entries]}
        return [entry for value in reply.values() for entry in value[0]]
    return [entry for _stream, entries in reply for entry in entries]


class _Deadline:
    """When a wait gives up, and how long the next blocking read may last."""

    def __init__(self, timeout: float | None, *, max_block_ms: int, request_id: str) -> None:
        self.at = None if timeout is None else time.monotonic() + timeout
        self.timeout = timeout
        self.max_block_ms = max_block_ms
        self.request_id = request_id

    def remaining(self) -> float | None:
        """Seconds left (None: no deadline); TimeoutError once none are."""
        if self.at is None:
            return None
        left = self.at - time.monotonic()
        if left <= 0:
            raise WaitTimeout(f"no final event for request {self.request_id} within {self.timeout}s")
        return left

    def block_ms(self) -> int:
        left = self.remaining()
        if left is None:
            return self.max_block_ms
        return max(1, min(self.max_block_ms, int(left * 1000)))


# Error codes worth sending a request again for, after a backoff (PROTOCOL.md, "Error codes").
RETRY_CODES = frozenset({"overloaded", "unavailable"})
MAX_RETRY_DELAY_S = 8.0


def retry_delay(attempt: int, base_s: float) -> float:
    """Seconds before retry ``attempt`` (0-based): ``base_s * 2**attempt`` up to 8 s, less up to a
    quarter at random so that clients refused together do not come back together (as the openai
    package's backoff)."""
    delay = min(MAX_RETRY_DELAY_S, base_s * 2.0**attempt)
    return delay * (1.0 - 0.25 * random.random())


def _retry_options(options: RequestOptions, attempt: int) -> RequestOptions:
    """The options of retry ``attempt`` (1-based): a fresh id (an id is taken once it was used)."""
    given = options.get("request_id")
    return {**options, "request_id": f"{given}.retry{attempt}" if given else None}


def _consume(future: asyncio.Future[None]) -> None:
    if not future.cancelled() and future.exception() is not None:
        log.warning("cancel not sent: %s", future.exception())


class _ClientBase:
    def __init__(self, redis_url: str | None, prefix: str | None, settings: Settings | None, *,
                 max_retries: int = 0, retry_backoff_s: float = 0.5) -> None:
        self.max_retries = max_retries
        self.retry_backoff_s = retry_backoff_s
        self.settings = _client_settings(redis_url, prefix, settings)
        self.keys = Keys(self.settings.prefix)
        self.url = resolve_url(self.settings)
        # A blocking read must end before the socket timeout, or an idle wait would look like a dead
        # connection.
        self._max_block_ms = max(1, int(self.settings.socket_timeout_s * 500))
        # Reply streams of the latest requests submitted with an explicit (or the shared) reply_to, so
        # that result(id) finds them; oldest first.
        self._reply_streams: dict[str, str] = {}
        self._tokens: dict[str, str] = {}  # cancel tokens of the latest requests, oldest first

    def _prepare(
        self, prompt: str | None, options: RequestOptions, *, default_reply: str | None
    ) -> tuple[Handle, dict[str, str]]:
        request_id = options.pop("request_id", None) or new_request_id()
        reply_to = options.pop("reply_to", None)
        # what is left: the generation options, prompt_ids and stream (request_fields' own arguments)
        rest: GenerationOptions = options
        tenant = self.settings.tenant
        default_reply = default_reply or (self.keys.reply_stream(request_id, tenant=tenant) if tenant else None)
        token = secrets.token_hex(16)  # only this client can cancel the request (broker.cancellation)
        fields = request_fields(prompt, request_id=request_id, reply_to=reply_to or default_reply,
                                cancel_token=token, **rest)
        self._tokens[request_id] = token
        while len(self._tokens) > REMEMBER_REPLY_STREAMS:
            del self._tokens[next(iter(self._tokens))]
        if reply_to is not None:
            self._remember(request_id, reply_to)
        reply = reply_to or default_reply or self.keys.result(request_id)
        return Handle(request_id, reply, cancel_token=token), fields

    @property
    def requests_stream(self) -> str:
        """Where this client sends requests: its tenant's own ingress stream (broker.sources), else the
        shared one, or one of its shards picked at random (``ingress_shards`` > 1)."""
        tenant = self.settings.tenant
        if tenant:
            return self.keys.tenant_requests(tenant)
        if self.settings.ingress_shards > 1:
            return self.keys.requests_shard(random.randrange(self.settings.ingress_shards))
        return self.keys.requests

    @property
    def cancel_stream(self) -> str:
        """Where this client sends cancels: its tenant's own cancel stream, or the shared one."""
        tenant = self.settings.tenant
        return self.keys.tenant_cancel(tenant) if tenant else self.keys.cancel

    def _cancel_fields(self, request: Handle | str) -> dict[str, str]:
        """The cancel entry for a request: its id, and its token when this client sent it."""
        handle = self._handle(request)
        token = handle.cancel_token or self._tokens.get(handle.id)
        return {"id": handle.id, **({"token": token} if token else {})}

    def _remember(self, request_id: str, reply_to: str) -> None:
        self._reply_streams[request_id] = reply_to
        while len(self._reply_streams) > REMEMBER_REPLY_STREAMS:
            del self._reply_streams[next(iter(self._reply_streams))]

    def _handle(self, request: Handle | str) -> Handle:
        if isinstance(request, Handle):
            return request
        return Handle(request, self._reply_streams.get(request)
                      or self.keys.reply_stream(request, tenant=self.settings.tenant))

    def _deadline(self, timeout: float | None, request_id: str) -> _Deadline:
        return _Deadline(timeout, max_block_ms=self._max_block_ms, request_id=request_id)


class Client(_ClientBase):
    """A blocking client. Requests reply to their own stream, ``{prefix}:result:{id}``, by default.

    ``redis_url`` and ``prefix`` override ``settings`` (which default to the environment); without a
    URL the client finds the embedded broker of a running ``ryzanstein up``. ``max_retries``:
    how often ``generate`` sends a request again that ended with ``overloaded`` or ``unavailable``,
    after ``retry_delay`` (0: never, the default).

    A request the caller abandons is cancelled on the server: ``result``/``generate`` past their
    ``timeout`` or interrupted (Ctrl-C) (unless ``cancel_abandoned=False``), a ``stream`` closed or
    left before its end. Errors are ``RequestFailed.of`` the event's code (``InvalidRequest``,
    ``Overloaded``, ``RequestTimeout``, ... all ``RyzansteinError`` with ``.code``); a wait past
    its ``timeout`` raises ``WaitTimeout`` (a ``RequestTimeout`` and a ``TimeoutError``).
    """

    def __init__(
        self, redis_url: str | None = None, *, prefix: str | None = None, settings: Settings | None = None,
        max_retries: int = 0, retry_backoff_s: float = 0.5,
    ) -> None:
        super().__init__(redis_url, prefix, settings, max_retries=max_retries, retry_backoff_s=retry_backoff_s)
        self._redis: redis.Redis = connect(self.url, self.settings)
        self._templates = TemplateSource()  # chat templates read from the registry, by digest

    def submit(self, prompt: str | None = None, **options: Unpack[RequestOptions]) -> Handle:
        """Put a request on the ingress stream; returns at once with the handle to wait on."""
        handle, fields = self._prepare(prompt, options, default_reply=None)
        stream = self.requests_stream
        entry_id = self._redis.xadd(stream, fields)  # type: ignore[arg-type]
        return dataclasses.replace(handle, entry_id=entry_id.decode() if isinstance(entry_id, bytes) else entry_id,
                                   ingress=stream)

    def events(self, request: Handle | str, *, timeout: float | None = None) -> Iterator[Event]:
        """The request's events in order, from the first, up to and including its final one.

        Raises TimeoutError when ``timeout`` seconds pass before the final event, ResultExpired when
        the request has no result any more (producer.expiry).
        """
        handle = self._handle(request)
        deadline = self._deadline(timeout, handle.id)
        last_id = STREAM_START
        delays: Iterator[float] | None = None
        expiry = ExpiryCheck(self.keys, handle, result_ttl_s=self.settings.result_ttl_s,
                             ingress=handle.ingress or self.requests_stream)
        while True:
            block_ms = deadline.block_ms()  # TimeoutError is an OSError: not in the try
            try:
                reply = self._redis.xread({handle.reply_to: last_id}, count=READ_COUNT, block=block_ms)
            except TRANSIENT_ERRORS as exc:
                delays = delays or backoff_delays(self.settings)
                delay = next(delays)
                log.warning("reading %s failed (%s); retrying in %.2fs", handle.reply_to, exc, delay)
                left = deadline.remaining()
                time.sleep(delay if left is None else min(delay, left))
                continue
            delays = None
            if not reply and last_id == STREAM_START:
                pipe = self._redis.pipeline(transaction=False)
                expiry.add(pipe)
                expiry.verdict(pipe.execute(raise_on_error=False))
            for entry_id, raw in _stream_entries(reply):
                last_id = entry_id
                event = Event.from_entry(entry_id, raw)
                if event is None or event.id != handle.id:
                    continue
                yield event
                if event.final:
                    return

    def result(self, request: Handle | str, *, timeout: float | None = None,
               cancel_abandoned: bool = True) -> Completion:
        """Wait for the request's final event: its Completion, or RequestFailed for an error.

        Past ``timeout`` seconds: WaitTimeout; ResultExpired (code ``expired``) when it has no result
        any more. A wait given up on, past its timeout or interrupted (KeyboardInterrupt), cancels
        the request unless ``cancel_abandoned`` is False (then a later call can wait on).
        """
        handle = self._handle(request)
        try:
            for event in self.events(handle, timeout=timeout):
                if event.final:
                    return Completion.from_event(event)
        except (WaitTimeout, KeyboardInterrupt):
            if cancel_abandoned:
                self._abandon(handle)
            raise
        raise AssertionError("unreachable: events() ends with a final event")

    def _abandon(self, handle: Handle) -> None:
        """Cancel a request no one waits for any more; best effort (Redis may be gone)."""
        with contextlib.suppress(*TRANSIENT_ERRORS):
            self.cancel(handle)

    def stream(
        self, prompt: str | None = None, *, timeout: float | None = None, **options: Unpack[RequestOptions]
    ) -> Iterator[str]:
        """Submit with ``stream=True`` (now, not on first iteration); iterate the text deltas.
        Closing the iterator (or leaving a ``for`` loop over it) before the end cancels the request."""
        options["stream"] = True
        handle = self.submit(prompt, **options)
        return _Deltas(self._deltas(handle, timeout), lambda: self._abandon(handle))

    def _deltas(self, handle: Handle, timeout: float | None) -> Iterator[str]:
        finished = False
        try:
            for event in self.events(handle, timeout=timeout):
                finished = event.final
                event.raise_for_error()
                if event.kind == "token" and event.text:
                    yield event.text
        finally:
            if not finished:  # closed, left with break, timed out or interrupted: no one reads on
                self._abandon(handle)

    def generate(
        self, prompt: str | None = None, *, timeout: float | None = None, **options: Unpack[RequestOptions]
    ) -> Completion:
        """Submit and wait: the Completion, RequestFailed on an error event (after ``max_retries``
        retries for ``overloaded``/``unavailable``, each with a fresh request id)."""
        for attempt in range(self.max_retries + 1):
            try:
                return self.result(self.submit(prompt, **_retry_options(options, attempt) if attempt else options),
                                   timeout=timeout)
            except RequestFailed as exc:
                if exc.code not in RETRY_CODES or attempt == self.max_retries:
                    raise
                time.sleep(retry_delay(attempt, self.retry_backoff_s))
        raise AssertionError("unreachable: the last attempt returns or raises")

    def chat(
        self, messages: Sequence[Mapping[str, Any]], *, timeout: float | None = None,
        **options: Unpack[RequestOptions],
    ) -> Completion:
        """Render OpenAI-style ``messages`` with the chat template of the model (``model``, else the
        only one served, else the balancers' default) as its groups publish it, then generate.

        Needs no model files: the template comes from the registry (broker.chat). Raises
        InvalidRequest for bad messages or a model without a template, ModelNotFound for a name no
        group serves, Unavailable when no group is registered; RequestFailed as ``generate``.
        """
        prompt = self.render_chat(messages, model=options.get("model"))
        return self.generate(prompt, timeout=timeout, **options)

    def render_chat(self, messages: Sequence[Mapping[str, Any]], *, model: str | None = None) -> str:
        """The prompt ``chat`` would send for ``messages`` (with the generation prompt)."""
        return render_chat(self._redis, self.keys, self.settings, messages, model=model, source=self._templates)

    def cancel(self, request: Handle | str) -> None:
        """Ask for the request to end; it finishes with ``finish_reason`` ``cancelled``."""
        self._redis.xadd(self.cancel_stream, self._cancel_fields(request))  # type: ignore[arg-type]

    def close(self) -> None:
        self._redis.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class _Deltas(Iterator[str]):
    """A stream's text deltas; ``close`` cancels the request also before the first delta (a
    generator that never started runs nothing when closed)."""

    def __init__(self, deltas: Iterator[str], abandon: Callable[[], None]) -> None:
        self._deltas = deltas
        self._abandon: Callable[[], None] | None = abandon

    def __next__(self) -> str:
        self._abandon = None  # started: the generator itself cancels when it is left early
        return next(self._deltas)

    def close(self) -> None:
        if self._abandon is not None:
            self._abandon()
            self._abandon = None
        self._deltas.close()  # type: ignore[attr-defined]


class ClientClosed(RyzansteinError):
    """The AsyncClient was closed while a request was still being waited for."""
