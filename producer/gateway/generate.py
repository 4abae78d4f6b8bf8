"""The gateway's generation path (``/v1/completions``, ``/v1/chat/completions``): a request validated
and admitted, submitted through the shared ``AsyncClient``, and answered as one JSON response or as
server-sent events; a request whose client goes away is cancelled and its final event drained. Part
of ``Gateway`` (producer.gateway.app; a mixin: the state it uses is the gateway's, declared below).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable
from typing import TYPE_CHECKING, Any, TypeVar

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from broker.connection import TRANSIENT_ERRORS
from broker.errors import InvalidRequest, RequestFailed
from broker.validation import parse_request
from producer.async_client import AsyncClient
from producer.client import Completion, Event, Handle
from producer.gateway.errors import ApiError
from producer.gateway.responses import SSE_DONE, Responder, sse, vllm_prompt_logprobs
from producer.gateway.schema import Generation, parse_chat, parse_completion, parse_json
from producer.gateway.streams import Disconnect, Disconnected, EventStream, StreamState
from producer.request import request_fields

if TYPE_CHECKING:
    from redis.asyncio import Redis as AsyncRedis

    from broker.keys import Keys
    from broker.registry import GroupStatus
    from broker.settings import Settings
    from producer.chat_template import ChatTemplate
    from producer.gateway.config import GatewayConfig
    from producer.gateway.groups import LiveGroups
    from producer.gateway.tokenize import TokenizerCache

log = logging.getLogger("producer.gateway.app")
T = TypeVar("T")

# How much longer than a request's server-side deadline the gateway waits for its final event.
WAIT_GRACE_S = 10.0


class Generating:
    settings: Settings
    config: GatewayConfig
    keys: Keys
    tokenizers: TokenizerCache
    in_flight: int
    _drains: set[asyncio.Task[None]]

    if TYPE_CHECKING:  # the Gateway's own
        @property
        def client(self) -> AsyncClient: ...

        @property
        def groups(self) -> LiveGroups: ...

        @property
        def redis(self) -> AsyncRedis: ...

        @staticmethod
        def _resolve_model(requested: str, served: list[str]) -> str: ...

        async def _group_of(self, model: str) -> GroupStatus: ...

        async def _chat_template(self, model: str) -> ChatTemplate: ...

    async def completions(self, request: Request) -> Response:
        return await self._generate(request, "completion")

    async def chat_completions(self, request: Request) -> Response:
        return await self._generate(request, "chat")

    async def _prepare(self, request: Request, kind: str) -> Generation:
        """The validated request, its model resolved and its chat prompt rendered; ApiError otherwise."""
        body = parse_json(await request.body())
        if kind == "completion":
            gen = parse_completion(body)
        else:
            gen = parse_chat(body, default_max_tokens=self.config.chat_max_tokens)
        try:
            served = await self.groups.models()
        except TRANSIENT_ERRORS as exc:
            raise ApiError("unavailable", f"Redis is unreachable: {exc}") from None
        gen.model = self._resolve_model(gen.model, served)
        gen.options["model"] = gen.model  # the balancer routes by it
        if kind == "chat":
            template = await self._chat_template(gen.model)
            try:
                gen.prompt = template.render(gen.messages)
            except InvalidRequest as exc:
                raise ApiError.from_code(exc.code, str(exc)) from None
        if gen.echo and gen.prompt_ids is not None:  # the echoed text of token ids, as the groups decode them
            tokenizer = await self.tokenizers.for_group(self.redis, self.keys, await self._group_of(gen.model))
            gen.echo_text = tokenizer.decode(gen.prompt_ids)
        deadline = gen.options.get("timeout_s")
        limit = self.config.request_timeout_s
        gen.options["timeout_s"] = limit if deadline is None else min(deadline, limit)
        return gen

    def _check_fields(self, gen: Generation, request_id: str) -> None:
        """Run the balancer's validation here, so that a bad request is a 400 at once."""
        try:
            fields = request_fields(gen.prompt, request_id=request_id, prompt_ids=gen.prompt_ids,
                                    stream=gen.stream, **gen.options)
            parse_request(fields, entry_id="0-0", prefix=self.keys.prefix,
                          max_request_bytes=self.settings.max_request_bytes,
                          default_max_tokens=self.settings.default_max_tokens)
        except InvalidRequest as exc:
            raise ApiError.from_code(exc.code, str(exc)) from None
        except (TypeError, ValueError, OverflowError) as exc:
            raise ApiError("invalid_request", f"request could not be built: {exc}") from None

    async def _generate(self, request: Request, kind: str) -> Response:
        request_id = ("cmpl-" if kind == "completion" else "chatcmpl-") + uuid.uuid4().hex
        headers = {"x-request-id": request_id}
        admitted = False
        try:
            gen = await self._prepare(request, kind)
            self._check_fields(gen, request_id)
            if self.in_flight >= self.config.max_concurrency:
                raise ApiError("overloaded", f"the gateway has {self.in_flight} requests in flight, its limit "
                                             f"(--max-concurrency {self.config.max_concurrency}); retry later")
            self.in_flight += 1
            admitted = True
            responder = Responder(kind, request_id, int(time.time()), gen.model)  # type: ignore[arg-type]
            handle = await self.client.submit(gen.prompt, request_id=request_id, prompt_ids=gen.prompt_ids,
                                              stream=gen.stream, **gen.options)
            wait_s = float(gen.options["timeout_s"] or self.config.request_timeout_s) + WAIT_GRACE_S
            if gen.stream:
                response = await self._start_stream(request, gen, responder, handle, wait_s, headers)
                admitted = False  # the stream releases its slot when it ends
                return response
            return await self._complete(request, gen, responder, handle, wait_s, headers)
        except ApiError as exc:
            if exc.status >= 500:
                log.warning("request %s: %s: %s", request_id, exc.code, exc.message)
            return exc.response(headers)
        except Disconnected:
            return Response(status_code=499, headers=headers)  # nginx's "client closed request"; no one reads it
        except TRANSIENT_ERRORS as exc:
            return ApiError("unavailable", f"Redis is unreachable: {exc}").response(headers)
        except Exception:
            log.exception("request %s failed", request_id)
            return ApiError("internal", "internal error in the gateway").response(headers)
        finally:
            if admitted:
                self.in_flight -= 1

    async def _race(self, awaitable: Awaitable[T], disconnect: Disconnect) -> T:
        """``awaitable``'s result, or Disconnected if the client goes away first."""
        task = asyncio.ensure_future(awaitable)
        try:
            await asyncio.wait({task, disconnect.task}, return_when=asyncio.FIRST_COMPLETED)
        except BaseException:
            task.cancel()
            raise
        if task.done():
            return task.result()
        task.cancel()
        with contextlib.suppress(BaseException):
            await task
        raise Disconnected()

    async def _complete(self, request: Request, gen: Generation, responder: Responder, handle: Handle,
                        wait_s: float, headers: dict[str, str]) -> Response:
        disconnect = Disconnect(request.receive)
        try:
            # the gateway cancels and drains what it abandons itself (_abandon)
            done = await self._race(self.client.result(handle, timeout=wait_s, cancel_abandoned=False), disconnect)
        except Disconnected:
            await self._abandon(handle, "the client went away")
            raise
        except RequestFailed as exc:
            raise ApiError.from_code(exc.code, exc.message) from None
        except TimeoutError:
            await self._abandon(handle, "no final event in time")
            raise ApiError("timeout", f"no result within {wait_s:g}s") from None
        finally:
            disconnect.close()
        return JSONResponse(responder.full(done, echo=gen.echo_text if gen.echo else None,
                                          prompt_entries=done.prompt_logprobs, prompt_logprobs=gen.prompt_logprobs),
                            headers=headers)

    async def _start_stream(self, request: Request, gen: Generation, responder: Responder, handle: Handle,
                            wait_s: float, headers: dict[str, str]) -> Response:
        events = aiter(self.client.events(handle, timeout=wait_s))
        disconnect = Disconnect(request.receive)
        try:
            first = await self._race(anext(events), disconnect)
        except Disconnected:
            disconnect.close()
            await self._abandon(handle, "the client went away")
            raise
        except TimeoutError:
            disconnect.close()
            await self._abandon(handle, "no event in time")
            raise ApiError("timeout", f"no result within {wait_s:g}s") from None
        except BaseException:
            disconnect.close()
            raise
        if first.kind == "error":
            disconnect.close()
            raise ApiError.from_code(first.fields.get("code", "internal"), first.fields.get("message", ""))
        state = StreamState(handle, disconnect)
        body = self._stream(gen, responder, events, first, state)
        return EventStream(body, on_close=lambda: self._end_stream(state),
                            headers={**headers, "cache-control": "no-cache"})

    async def _stream(self, gen: Generation, responder: Responder, events: AsyncIterator[Event], first: Event,
                      state: StreamState) -> AsyncIterator[bytes]:
        """The SSE body: chunks until the final event, or until the client goes away. With n > 1
        each token event's ``choice`` is its chunk's ``index``, and a completion's finish reason goes
        out as soon as its last token event says it (the rest at the done event)."""
        usage_field = gen.include_usage
        for index in range(gen.n):
            if gen.kind == "chat":
                yield sse(responder.chunk("", first=True, with_usage_field=usage_field, index=index))
            elif gen.echo:
                yield sse(responder.chunk(gen.echo_text, with_usage_field=usage_field, index=index))
        sent: dict[int, list[str]] = {}
        ended: set[int] = set()
        wants_logprobs = bool(gen.options.get("logprobs"))
        offsets: dict[int, int] = {}  # text offset of each choice's next token (completions' logprobs.text_offset)
        event = first
        while True:
            if event.kind == "token":
                index = event.choice
                texts = sent.setdefault(index, [])
                entry = event.logprobs if wants_logprobs else None
                if entry is not None:  # a chunk per token, each with its logprobs, text or not
                    texts.append(event.text)
                    yield sse(responder.chunk(event.text, with_usage_field=usage_field, index=index,
                                              logprobs=responder.logprobs([entry], text_offset=offsets.get(index, 0))))
                    offsets[index] = offsets.get(index, 0) + len(entry["text"])
                elif event.text:
                    texts.append(event.text)
                    yield sse(responder.chunk(event.text, with_usage_field=usage_field, index=index))
                reason = event.fields.get("finish_reason")
                if reason is not None and not (gen.prompt_logprobs and index == 0):  # (those end with the done)
                    ended.add(index)
                    yield sse(responder.chunk(None if gen.kind == "chat" else "", finish_reason=reason,
                                              with_usage_field=usage_field, index=index))
            elif event.kind == "done":
                state.finished = True
                done = Completion.from_event(event)
                for choice in done.all_choices():
                    if choice.index in ended:
                        continue
                    joined = "".join(sent.get(choice.index, []))
                    # The deltas joined equal the done text (PROTOCOL.md); should they not, send the rest.
                    rest = choice.text[len(joined):] if choice.text.startswith(joined) else ""
                    extra: dict[str, Any] = {}
                    if gen.prompt_logprobs and choice.index == 0:  # known only now (vLLM sends them first)
                        extra["prompt_logprobs"] = vllm_prompt_logprobs(done.prompt_logprobs)
                    yield sse(responder.chunk(rest or None if gen.kind == "chat" else rest,
                                              finish_reason=choice.finish_reason, with_usage_field=usage_field,
                                              index=choice.index, **extra))
                if gen.include_usage:
                    yield sse(responder.usage_chunk(done))
                yield SSE_DONE
                return
            elif event.kind == "error":
                state.finished = True
                error = ApiError.from_code(event.fields.get("code", "internal"), event.fields.get("message", ""))
                yield sse(error.body())
                return
            try:
                event = await self._race(anext(events), state.disconnect)
            except Disconnected:
                return
            except TimeoutError:
                yield sse(ApiError("timeout", "no further event in time").body())
                return

    async def _end_stream(self, state: StreamState) -> None:
        """Runs once per stream however it ended: frees the slot, cancels an unfinished request."""
        state.disconnect.close()
        self.in_flight -= 1
        if not state.finished:
            await self._abandon(state.handle, "the stream ended before the request did")

    async def _abandon(self, handle: Handle, why: str) -> None:
        """Cancel a request whose response no one will read, and take its final event off the client."""
        log.info("request %s: %s; cancelling it", handle.id, why)
        try:
            await self.client.cancel(handle)
        except TRANSIENT_ERRORS as exc:
            log.warning("request %s: cancel not sent: %s", handle.id, exc)
        task = asyncio.get_running_loop().create_task(self._drain(handle))
        self._drains.add(task)
        task.add_done_callback(self._drains.discard)

    async def _drain(self, handle: Handle) -> None:
        # The shared-stream client holds a request's events until someone reads the final one.
        try:
            done = await self.client.result(handle, timeout=self.config.request_timeout_s + WAIT_GRACE_S)
            log.info("request %s ended %s after it was abandoned", handle.id, done.finish_reason)
        except RequestFailed as exc:
            log.info("request %s ended with error %s after it was abandoned", handle.id, exc.code)
        except (TimeoutError, asyncio.CancelledError, Exception) as exc:  # noqa: BLE001 - nothing to report to
            log.debug("request %s: no final event read after it was abandoned (%r)", handle.id, exc)
