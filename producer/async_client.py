"""The asyncio Python client: ``AsyncClient`` gives every request it submits the same reply stream
(``Keys.client_replies``) and reads it with one dispatcher task that hands events to the waiting
requests, so a thousand requests in flight cost one blocking read instead of a thousand. Same
methods as the blocking ``producer.client.Client``; it speaks only the flat-field protocol of
CONTRACT.md, so its requests look like any other client's.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from broker.connection import TRANSIENT_ERRORS, backoff_delays, connect_async
from broker.errors import InvalidRequest, RequestFailed, WaitTimeout
from broker.settings import Settings
from producer.chat_template import TemplateSource, render_chat_async
from producer.expiry import ExpiryCheck
from producer.request import (
    Completion,
    Event,
    Handle,
    RequestOptions,
    event_id,
    new_request_id,
)

if TYPE_CHECKING:
    import redis
    import redis.asyncio
    from typing_extensions import Self, Unpack

from producer.client import (
    DISPATCH_BLOCK_MS,
    READ_COUNT,
    RETRY_CODES,
    STREAM_START,
    ClientClosed,
    _ClientBase,
    _consume,
    _Deadline,
    _retry_options,
    _stream_entries,
    retry_delay,
)

__all__ = ["AsyncClient"]

log = logging.getLogger("producer.client")


class AsyncClient(_ClientBase):
    """An asyncio client whose requests all reply to one stream of its own.

    ``reply_to`` (``{prefix}:client:<uuid>``) is read by one dispatcher task, started with the first
    request, that routes each event by its ``id`` to the queue of the request it belongs to, and
    trims the stream behind itself every ``trim_every`` entries. Events of a request are held until
    ``result``/``events``/``stream`` take them, so each request should be waited for once.
    A request submitted with an explicit ``reply_to``, or an id this client did not submit, is read
    from its own stream instead.
    """

    def __init__(
        self,
        redis_url: str | None = None,
        *,
        prefix: str | None = None,
        settings: Settings | None = None,
        trim_every: int = 256,
        max_retries: int = 0,
        retry_backoff_s: float = 0.5,
    ) -> None:
        super().__init__(redis_url, prefix, settings, max_retries=max_retries, retry_backoff_s=retry_backoff_s)
        self._redis: redis.asyncio.Redis = connect_async(self.url, self.settings)
        self._templates = TemplateSource()  # chat templates read from the registry, by digest
        self.client_id = new_request_id()
        self.reply_to = self.keys.client_replies(self.client_id, tenant=self.settings.tenant)
        self.trim_every = trim_every
        self._pending: dict[str, asyncio.Queue[Event | BaseException]] = {}
        self._dispatcher: asyncio.Task[None] | None = None
        # XADDs waiting for the writer task: (stream, fields, settled when sent).
        self._outbox: list[tuple[str, dict[str, str], asyncio.Future[None]]] = []
        self._writer: asyncio.Task[None] | None = None
        # The last entry the dispatcher consumed: a restarted read resumes after it, losing nothing.
        self._last_id = STREAM_START
        self._closed = False
        # Requests abandoned by their waiter: their events are dropped, up to the final one.
        self._abandoned: set[str] = set()

    async def submit(self, prompt: str | None = None, **options: Unpack[RequestOptions]) -> Handle:
        """Put a request on the ingress stream; returns at once with the handle to wait on."""
        if self._closed:
            raise ClientClosed("the client is closed")
        shared = options.get("reply_to") in (None, self.reply_to)
        handle, fields = self._prepare(prompt, options, default_reply=self.reply_to if shared else None)
        if shared:
            self._remember(handle.id, self.reply_to)
            if handle.id in self._pending:
                raise InvalidRequest(f"request {handle.id} is already in flight on this client")
            # Registered before the XADD: its first event may be read before xadd() returns.
            self._pending[handle.id] = asyncio.Queue()
            self._ensure_dispatcher()
        try:
            await self._send(self.requests_stream, fields)
        except BaseException:
            self._pending.pop(handle.id, None)
            raise
        return handle

    def _handle(self, request: Handle | str) -> Handle:
        if isinstance(request, str) and request in self._pending:
            return Handle(request, self.reply_to)
        return super()._handle(request)

    async def events(self, request: Handle | str, *, timeout: float | None = None) -> AsyncIterator[Event]:
        """The request's events in order, up to and including its final one.

        Raises TimeoutError when ``timeout`` seconds pass before the final event; the events that
        arrive later are kept for the next call.
        """
        handle = self._handle(request)
        deadline = self._deadline(timeout, handle.id)
        queue = self._pending.get(handle.id) if handle.reply_to == self.reply_to else None
        self._abandoned.discard(handle.id)  # waited for again
        if queue is None:
            async for event in self._read_stream(handle, deadline):
                yield event
            return
        while True:
            try:
                item = await asyncio.wait_for(queue.get(), deadline.remaining())
            except asyncio.TimeoutError:  # not the builtin TimeoutError before Python 3.11
                raise WaitTimeout(f"no final event for request {handle.id} within {timeout}s") from None
            if isinstance(item, BaseException):
                raise item
            if item.final:
                self._pending.pop(handle.id, None)
            yield item
            if item.final:
                return

    async def _read_stream(self, handle: Handle, deadline: _Deadline) -> AsyncIterator[Event]:
        """Events of one request read straight from its reply stream (not the shared one)."""
        last_id = STREAM_START
        delays: Iterator[float] | None = None
        expiry = ExpiryCheck(self.keys, handle, result_ttl_s=self.settings.result_ttl_s,
                             ingress=handle.ingress or self.requests_stream)
        while True:
            block_ms = deadline.block_ms()  # TimeoutError is an OSError: not in the try
            try:
                reply = await self._redis.xread({handle.reply_to: last_id}, count=READ_COUNT, block=block_ms)
            except TRANSIENT_ERRORS as exc:
                delays = delays or backoff_delays(self.settings)
                delay = next(delays)
                log.warning("reading %s failed (%s); retrying in %.2fs", handle.reply_to, exc, delay)
                left = deadline.remaining()
                await asyncio.sleep(delay if left is None else min(delay, left))
                continue
            delays = None
            if not reply and last_id == STREAM_START:
                pipe = self._redis.pipeline(transaction=False)
                expiry.add(pipe)
                expiry.verdict(await pipe.execute(raise_on_error=False))
            for entry_id, raw in _stream_entries(reply):
                last_id = entry_id
                event = Event.from_entry(entry_id, raw)
                if event is None or event.id != handle.id:
                    continue
                yield event
                if event.final:
                    return

    async def result(self, request: Handle | str, *, timeout: float | None = None,
                     cancel_abandoned: bool = True) -> Completion:
        """Wait for the request's final event: its Completion, or RequestFailed for an error.

        Past ``timeout`` seconds: WaitTimeout. A wait given up on, past its timeout or by
        cancelling the waiting task (``asyncio`` cancellation, ``wait_for``), cancels the request
        unless ``cancel_abandoned`` is False (its events are then kept for a later call).
        """
        handle = self._handle(request)
        try:
            async for event in self.events(handle, timeout=timeout):
                if event.final:
                    return Completion.from_event(event)
        except (WaitTimeout, asyncio.CancelledError):
            if cancel_abandoned:
                self._abandon(handle)
            raise
        raise AssertionError("unreachable: events() ends with a final event")

    def _abandon(self, handle: Handle) -> None:
        """Cancel a request no one waits for any more, and drop its events from now on. Does not
        wait (it may run while a task is being cancelled): the writer sends the cancel."""
        if self._closed:
            return
        self._send(self.cancel_stream, self._cancel_fields(handle)).add_done_callback(_consume)
        queue = self._pending.get(handle.id)
        if queue is None:
            return
        while not queue.empty():  # its final event may be in already
            item = queue.get_nowait()
            if isinstance(item, BaseException) or item.final:
                self._pending.pop(handle.id, None)
                return
        self._abandoned.add(handle.id)

    async def stream(
        self, prompt: str | None = None, *, timeout: float | None = None, **options: Unpack[RequestOptions]
    ) -> AsyncIterator[str]:
        """Submit with ``stream=True`` and iterate the text deltas as they arrive."""
        options["stream"] = True
        handle = await self.submit(prompt, **options)
        finished = False
        try:
            async for event in self.events(handle, timeout=timeout):
                finished = event.final
                event.raise_for_error()
                if event.kind == "token" and event.text:
                    yield event.text
        finally:
            if not finished:  # closed, left with break, timed out or cancelled: no one reads on
                self._abandon(handle)

    async def generate(
        self, prompt: str | None = None, *, timeout: float | None = None, **options: Unpack[RequestOptions]
    ) -> Completion:
        """Submit and wait: the Completion, RequestFailed on an error event (after ``max_retries``
        retries for ``overloaded``/``unavailable``, each with a fresh request id)."""
        for attempt in range(self.max_retries + 1):
            handle = await self.submit(prompt, **_retry_options(options, attempt) if attempt else options)
            try:
                return await self.result(handle, timeout=timeout)
            except RequestFailed as exc:
                if exc.code not in RETRY_CODES or attempt == self.max_retries:
                    raise
                await asyncio.sleep(retry_delay(attempt, self.retry_backoff_s))
        raise AssertionError("unreachable: the last attempt returns or raises")

    async def chat(
        self, messages: Sequence[Mapping[str, Any]], *, timeout: float | None = None,
        **options: Unpack[RequestOptions],
    ) -> Completion:
        """``Client.chat`` for asyncio: render ``messages`` with the model's published template, generate."""
        prompt = await self.render_chat(messages, model=options.get("model"))
        return await self.generate(prompt, timeout=timeout, **options)

    async def render_chat(self, messages: Sequence[Mapping[str, Any]], *, model: str | None = None) -> str:
        """The prompt ``chat`` would send for ``messages`` (``Client.render_chat``)."""
        return await render_chat_async(self._redis, self.keys, self.settings, messages, model=model,
                                       source=self._templates)

    async def cancel(self, request: Handle | str) -> None:
        """Ask for the request to end; it finishes with ``finish_reason`` ``cancelled``."""
        await self._send(self.cancel_stream, self._cancel_fields(request))

    # --- the writer -------------------------------------------------------------------------

    def _send(self, stream: str, fields: dict[str, str]) -> asyncio.Future[None]:
        """XADD through the writer, which sends what piles up meanwhile as one pipeline."""
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._outbox.append((stream, fields, future))
        if self._writer is None or self._writer.done():
            self._writer = asyncio.get_running_loop().create_task(self._write())
        return future

    async def _write(self) -> None:
        """Send the outbox until it is empty, one pipeline (one round trip) per batch.

        One writer at a time keeps the XADDs in submission order and the connections in use few:
        a thousand concurrent submits would otherwise each take a connection from the pool.
        """
        while self._outbox:
            batch, self._outbox = self._outbox, []
            pipe = self._redis.pipeline(transaction=False)
            for stream, fields, _ in batch:
                pipe.xadd(stream, fields)  # type: ignore[arg-type]
            try:
                results = await pipe.execute(raise_on_error=False)
            except Exception as exc:  # noqa: BLE001 - redis-py already retried blips; the submitters get the error
                for *_, future in batch:
                    if not future.done():
                        future.set_exception(exc)
                continue
            except BaseException:
                for *_, future in batch:
                    future.cancel()
                raise
            for (*_, future), result in zip(batch, results, strict=True):
                if future.done():
                    continue
                if isinstance(result, Exception):
                    future.set_exception(result)
                else:
                    future.set_result(None)

    # --- the dispatcher ---------------------------------------------------------------------

    def _ensure_dispatcher(self) -> None:
        if self._dispatcher is None or self._dispatcher.done():
            self._dispatcher = asyncio.get_running_loop().create_task(
                self._dispatch(), name=f"ryzanstein-dispatch-{self.client_id}"
            )

    async def _dispatch(self) -> None:
        """Read the shared reply stream forever, routing each event to its request's queue."""
        delays: Iterator[float] | None = None
        since_trim = 0
        try:
            while not self._closed:
                try:
                    reply = await self._redis.xread(
                        {self.reply_to: self._last_id}, count=READ_COUNT, block=DISPATCH_BLOCK_MS
                    )
                    entries = _stream_entries(reply)
                    for entry_id, raw in entries:
                        self._route(Event.from_entry(entry_id, raw))
                        self._last_id = event_id(entry_id)
                    since_trim += len(entries)
                    if since_trim >= self.trim_every:
                        # Everything before the last consumed entry is in the queues already.
                        await self._redis.xtrim(self.reply_to, minid=self._last_id, approximate=True)
                        since_trim = 0
                except TRANSIENT_ERRORS as exc:
                    delays = delays or backoff_delays(self.settings)
                    delay = next(delays)
                    log.warning("reading %s failed (%s); retrying in %.2fs", self.reply_to, exc, delay)
                    await asyncio.sleep(delay)
                    continue
                delays = None
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            # Not a blip: fail the waiting requests rather than leave them hanging; the next
            # submit starts a fresh dispatcher that resumes after self._last_id.
            log.exception("the reply dispatcher of %s stopped", self.reply_to)
            self._fail_pending(exc)

    def _route(self, event: Event | None) -> None:
        if event is None:
            return
        if event.id in self._abandoned:
            if event.final:
                self._abandoned.discard(event.id)
                self._pending.pop(event.id, None)
            return
        queue = self._pending.get(event.id)
        if queue is None:
            log.debug("event for request %s that no one here waits for; dropped", event.id)
            return
        queue.put_nowait(event)

    def _fail_pending(self, exc: BaseException) -> None:
        for queue in self._pending.values():
            queue.put_nowait(exc)
        self._pending.clear()

    async def close(self) -> None:
        """Stop the dispatcher, fail requests still waited for, delete the shared stream."""
        if self._closed:
            return
        self._closed = True
        if self._writer is not None:
            with contextlib.suppress(Exception):
                await self._writer  # submits already made are sent, not dropped
        if self._dispatcher is not None:
            # The dispatcher sees _closed within one short read; cancelling a blocked XREAD can hang
            # in redis-py, so it is only the fallback.
            done, _ = await asyncio.wait([self._dispatcher], timeout=2.0)
            if not done:
                self._dispatcher.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._dispatcher
        self._fail_pending(ClientClosed("the client was closed before the request finished"))
        with contextlib.suppress(*TRANSIENT_ERRORS):
            await self._redis.delete(self.reply_to)
        await self._redis.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()
