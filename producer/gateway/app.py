"""The OpenAI-compatible HTTP gateway on Starlette: its state and lifecycle, the routes table, and the
routes that read the registry: ``/v1/models``, ``/health``, ``/tokenize`` and ``/detokenize``
(bodies: producer.gateway.tokenize); ``/version`` and ``/metrics`` are producer.gateway.extras' (with
``--api-key``), ``/v1/completions`` and ``/v1/chat/completions`` producer.gateway.generate's.

Every request becomes one ryzanstein request on the ingress stream, sent through one ``AsyncClient``
(all replies on one shared stream, read by one task). Streaming responses are server-sent events in
OpenAI's chunk format, ending with ``data: [DONE]``. A client that goes away before its response is
complete gets its request cancelled (``XADD {p}:cancel``), so the worker group stops generating for
no one.

Errors that the request itself causes are found before anything is sent where possible (the same
validation the balancer runs), else from the request's first event: a streaming response starts
only once the first event is in, so a request the balancer or the group refuses still gets a plain
HTTP error rather than a stream that fails.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from redis.asyncio import Redis as AsyncRedis
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from broker.chat import template_text
from broker.connection import TRANSIENT_ERRORS, connect_async
from broker.errors import InvalidRequest, RyzansteinError
from broker.keys import Keys
from broker.path_health import judge, read_path_async
from broker.registry import GroupStatus, served_names
from broker.settings import Settings
from producer.async_client import AsyncClient
from producer.chat_template import ChatTemplate, TemplateSource, normalize_messages
from producer.gateway.config import GatewayConfig
from producer.gateway.errors import ApiError
from producer.gateway.extras import ApiKeys, HttpMetrics, gateway_registry, metrics_endpoint, version_endpoint
from producer.gateway.generate import Generating
from producer.gateway.groups import LiveGroups
from producer.gateway.schema import parse_json
from producer.gateway.tokenize import DetokenizeBody, TokenizeBody, TokenizerCache, parse_body

log = logging.getLogger(__name__)


class Gateway(Generating):
    """The application state: one AsyncClient, the registry view, the chat templates, the admission count."""

    def __init__(self, settings: Settings, url: str, config: GatewayConfig) -> None:
        self.settings = settings
        self.url = url
        self.config = config
        self.keys = Keys(settings.prefix)
        self.templates = TemplateSource(config.chat_template)
        self.tokenizers = TokenizerCache()
        self.started = int(time.time())
        self.in_flight = 0
        self._client: AsyncClient | None = None
        self._redis: AsyncRedis | None = None
        self._groups: LiveGroups | None = None
        self._drains: set[asyncio.Task[None]] = set()

    # --- lifecycle ----------------------------------------------------------------------------

    async def start(self) -> None:
        self._client = AsyncClient(self.url, settings=self.settings)
        self._redis = connect_async(self.url, self.settings)
        self._groups = LiveGroups(self._redis, self.keys, dead_after_s=self.settings.dead_after_s)

    async def stop(self) -> None:
        for task in list(self._drains):
            task.cancel()
        if self._client is not None:
            await self._client.close()
        if self._redis is not None:
            await self._redis.aclose()

    @property
    def client(self) -> AsyncClient:
        assert self._client is not None, "the gateway is not started"
        return self._client

    @property
    def groups(self) -> LiveGroups:
        assert self._groups is not None, "the gateway is not started"
        return self._groups

    @property
    def redis(self) -> AsyncRedis:
        assert self._redis is not None, "the gateway is not started"
        return self._redis

    # --- routes -------------------------------------------------------------------------------

    async def health(self, request: Request) -> Response:
        """200 while the path works (a balancer reads the ingress stream, a group serves), else 503
        with the reason (broker.path_health)."""
        try:
            view = await read_path_async(self.redis, self.keys, dead_after_s=self.settings.dead_after_s,
                                         shards=self.settings.ingress_shards)
        except TRANSIENT_ERRORS as exc:
            return JSONResponse({"status": "unavailable", "reason": f"Redis is unreachable: {exc}"}, 503)
        health = judge(view, balancer_dead_after_s=self.settings.balancer_dead_after_s)
        return JSONResponse({**health.to_json(), "in_flight": self.in_flight}, 200 if health.ok else 503)

    async def models(self, request: Request) -> Response:
        try:
            groups = await self.groups.get()
        except TRANSIENT_ERRORS as exc:
            return ApiError("unavailable", f"Redis is unreachable: {exc}").response()
        return JSONResponse({"object": "list", "data": [self._model_card(m, groups) for m in served_names(groups)]})

    async def model(self, request: Request) -> Response:
        try:
            groups = await self.groups.get()
            model = self._resolve_model(request.path_params["model"], served_names(groups))
        except TRANSIENT_ERRORS as exc:
            return ApiError("unavailable", f"Redis is unreachable: {exc}").response()
        except ApiError as exc:
            return exc.response()
        return JSONResponse(self._model_card(model, groups))

    async def tokenize(self, request: Request) -> Response:
        """vLLM's ``/tokenize``: a prompt or chat messages -> ``{"tokens", "count", "max_model_len"}``."""
        try:
            body = parse_body(TokenizeBody, parse_json(await request.body()))
            if (body.prompt is None) == (body.messages is None):
                raise ApiError("invalid_request", "exactly one of 'prompt' and 'messages' must be given")
            group = await self._group_of(body.model)
            text = body.prompt
            if body.messages is not None:
                messages = normalize_messages(body.messages)
                try:
                    text = (await self._chat_template(body.model)).render(messages)
                except InvalidRequest as exc:
                    raise ApiError.from_code(exc.code, str(exc)) from None
            tokenizer = await self.tokenizers.for_group(self.redis, self.keys, group)
            tokens = tokenizer.encode(text or "", add_special_tokens=body.add_special_tokens)
            return JSONResponse({"tokens": tokens, "count": len(tokens), "max_model_len": group.max_context})
        except InvalidRequest as exc:
            return ApiError.from_code(exc.code, str(exc)).response()
        except ApiError as exc:
            return exc.response()
        except TRANSIENT_ERRORS as exc:
            return ApiError("unavailable", f"Redis is unreachable: {exc}").response()

    async def detokenize(self, request: Request) -> Response:
        """vLLM's ``/detokenize``: token ids -> ``{"prompt"}``."""
        try:
            body = parse_body(DetokenizeBody, parse_json(await request.body()))
            group = await self._group_of(body.model)
            if bad := [t for t in body.tokens if not 0 <= t < group.vocab_size]:
                raise ApiError("invalid_request", f"field 'tokens': token id {bad[0]} is outside the vocabulary "
                                                  f"(size {group.vocab_size})", "tokens")
            tokenizer = await self.tokenizers.for_group(self.redis, self.keys, group)
            return JSONResponse({"prompt": tokenizer.decode(body.tokens)})
        except ApiError as exc:
            return exc.response()
        except TRANSIENT_ERRORS as exc:
            return ApiError("unavailable", f"Redis is unreachable: {exc}").response()

    async def _group_of(self, model: str) -> GroupStatus:
        """A live group serving ``model``; ApiError (404, 503) otherwise."""
        groups = await self.groups.get()
        model = self._resolve_model(model, served_names(groups))
        group = next((g for g in groups if g.serves(model)), None)
        if group is None:
            raise ApiError("unavailable", f"no live worker group serves model {model!r}")
        return group

    # --- models ---------------------------------------------------------------------------------

    def _model_card(self, model: str, groups: list[GroupStatus]) -> dict[str, Any]:
        """OpenAI's model object, with vLLM's ``max_model_len``: the longest context (prompt +
        max_tokens) a group serving ``model`` accepts."""
        max_len = max((g.max_context for g in groups if g.serves(model)), default=0)
        return {"id": model, "object": "model", "created": self.started, "owned_by": "ryzanstein",
                "max_model_len": max_len}

    @staticmethod
    def _resolve_model(requested: str, served: list[str]) -> str:
        """``requested`` when a routable group serves that name (``--served-model-name``); ApiError
        ``model_not_found`` otherwise, or ``unavailable`` with no routable group."""
        if requested in served:
            return requested
        if not served:
            raise ApiError("unavailable", "no live worker group")
        raise ApiError("model_not_found", f"model {requested!r} is not served here; served: {served}", "model")

    async def _chat_template(self, model: str) -> ChatTemplate:
        """The template of ``model``: --chat-template's, else the one its groups publish (read from
        Redis once per digest); ApiError when the model has none or Redis lacks it."""
        group = next((g for g in await self.groups.get() if g.serves(model)), None)
        if group is None:
            raise ApiError("unavailable", f"no live worker group serves model {model!r}")
        cached = self.templates.cached(group)
        if cached is not None:
            return cached
        try:
            raw = await self.redis.get(self.keys.chat_template(group.chat_template)) if group.chat_template else None
            return self.templates.for_group(group, lambda digest: template_text(raw, digest))
        except TRANSIENT_ERRORS as exc:
            raise ApiError("unavailable", f"Redis is unreachable: {exc}") from None
        except RyzansteinError as exc:
            raise ApiError.from_code(exc.code, str(exc)) from None


def create_app(settings: Settings, url: str, config: GatewayConfig | None = None) -> Starlette:
    """The ASGI application of a gateway on ``url`` (the Redis to enqueue on)."""
    gateway = Gateway(settings, url, config or GatewayConfig())

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await gateway.start()
        try:
            yield
        finally:
            await gateway.stop()

    routes = [
        Route("/health", gateway.health, methods=["GET"]),
        Route("/v1/models", gateway.models, methods=["GET"]),
        Route("/v1/models/{model:path}", gateway.model, methods=["GET"]),
        Route("/v1/completions", gateway.completions, methods=["POST"]),
        Route("/v1/chat/completions", gateway.chat_completions, methods=["POST"]),
        Route("/version", version_endpoint, methods=["GET"]),
        Route("/metrics", metrics_endpoint, methods=["GET"]),
        Route("/tokenize", gateway.tokenize, methods=["POST"]),
        Route("/detokenize", gateway.detokenize, methods=["POST"]),
    ]
    registry = gateway_registry()
    middleware = [Middleware(HttpMetrics, registry=registry)]  # outermost: refused requests count too
    if gateway.config.api_keys:
        middleware.append(Middleware(ApiKeys, keys=gateway.config.api_keys))
    app = Starlette(routes=routes, lifespan=lifespan, middleware=middleware)
    app.state.gateway = gateway
    app.state.metrics_registry = registry
    return app
