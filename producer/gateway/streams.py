"""The gateway's server-sent-event responses and their end: watching for the client going away, and
closing (cancelling the request) whatever ended the response."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import anyio
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from producer.client import Handle


class Disconnect:
    """Watches an HTTP request's ``receive`` channel for the client going away."""

    def __init__(self, receive: Receive) -> None:
        self.task = asyncio.ensure_future(self._listen(receive))

    @staticmethod
    async def _listen(receive: Receive) -> None:
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return

    def close(self) -> None:
        self.task.cancel()


class Disconnected(Exception):
    """The client went away while its response was being prepared."""


@dataclass
class StreamState:
    handle: Handle
    disconnect: Disconnect
    finished: bool = False  # the final event was read: nothing to cancel


class EventStream(StreamingResponse):
    """A server-sent-event response that runs ``on_close`` when it ends, whatever ended it.

    The body generator's own ``finally`` is not enough: a generator that never started (the client
    left before the first chunk) never runs it.
    """

    media_type = "text/event-stream"

    def __init__(self, body: AsyncIterator[bytes], *, on_close: Callable[[], Awaitable[None]],
                 headers: dict[str, str]) -> None:
        super().__init__(body, headers=headers)
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            with anyio.CancelScope(shield=True):
                with contextlib.suppress(Exception):
                    await self.body_iterator.aclose()  # type: ignore[attr-defined]
                await self._on_close()
