"""What the gateway serves besides generation, as vLLM's OpenAI server does: API keys on ``/v1``,
``/version``, and ``/metrics`` with the HTTP requests it answered.

Both middlewares are plain ASGI, around the whole application:

- ``ApiKeys``: with ``--api-key`` given (once or more), a request to ``/v1/...`` needs
  ``Authorization: Bearer <one of the keys>``, else 401 in OpenAI's error shape; ``/health``,
  ``/version`` and ``/metrics`` stay open (as vLLM's ``--api-key`` leaves everything outside ``/v1``).
- ``HttpMetrics``: counts and times every request by route, method and status, under the names of
  prometheus-fastapi-instrumentator, which vLLM's server uses: ``http_requests_total`` and
  ``http_request_duration_seconds`` (a histogram).
"""

from __future__ import annotations

import hmac
import time
from collections.abc import Sequence
from importlib import metadata

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from broker.metrics import new_registry

# Routes reported by name; any other path counts as "other" (one series, however many paths are tried).
ROUTES = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/version", "/metrics",
          "/tokenize", "/detokenize")


class ApiKeys:
    """Bearer-token check on ``/v1``; keys are compared in constant time."""

    def __init__(self, app: ASGIApp, keys: Sequence[str]) -> None:
        self.app = app
        self.keys = [k.encode() for k in keys]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith("/v1") or self._allowed(scope):
            await self.app(scope, receive, send)
            return
        body = {"error": {"message": "a valid API key is needed: 'Authorization: Bearer <key>'",
                          "type": "invalid_request_error", "param": None, "code": "invalid_api_key"}}
        await JSONResponse(body, status_code=401)(scope, receive, send)

    def _allowed(self, scope: Scope) -> bool:
        header = dict(scope["headers"]).get(b"authorization", b"")
        scheme, _, token = header.partition(b" ")
        if scheme.lower() != b"bearer":
            return False
        token = token.strip()
        # every key compared, so the time taken does not tell which one nearly matched
        matches = [hmac.compare_digest(token, key) for key in self.keys]
        return any(matches)


class HttpMetrics:
    """Counts and times the HTTP requests of ``app`` into ``registry``."""

    def __init__(self, app: ASGIApp, registry: CollectorRegistry) -> None:
        self.app = app
        self.requests = Counter("http_requests_total", "HTTP requests answered, by route, method and status",
                                ["handler", "method", "status"], registry=registry)
        self.latency = Histogram("http_request_duration_seconds",
                                 "Seconds from an HTTP request's arrival to the end of its response "
                                 "(a stream: its last chunk)", ["handler", "method"], registry=registry,
                                 buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500  # what the client gets if the application raises before it answers

        async def sending(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            path = scope["path"]
            handler = path if path in ROUTES else "/v1/models/{model}" if path.startswith("/v1/models/") else "other"
            method = scope["method"]
            self.requests.labels(handler, method, str(status)).inc()
            self.latency.labels(handler, method).observe(time.perf_counter() - started)


def gateway_registry() -> CollectorRegistry:
    return new_registry()


async def metrics_endpoint(request: Request) -> Response:
    registry: CollectorRegistry = request.app.state.metrics_registry
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)


async def version_endpoint(request: Request) -> Response:
    return JSONResponse({"version": package_version()})


def package_version() -> str:
    try:
        return metadata.version("ryzanstein")
    except metadata.PackageNotFoundError:  # running from a checkout that was never installed
        return "0+unknown"
