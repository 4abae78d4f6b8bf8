"""The project's exceptions: one base, a few named kinds, each with the error code clients see."""

from __future__ import annotations


class RyzansteinError(Exception):
    """Base of every ryzanstein error. ``code`` is the ``error`` event code a client receives."""

    code = "internal"


class InvalidRequest(RyzansteinError):
    """The request breaks the protocol or a limit; the message says which field and why."""

    code = "invalid_request"


class ModelNotFound(InvalidRequest):
    """The request names a model that no registered worker group serves."""

    code = "model_not_found"


class Overloaded(RyzansteinError):
    code = "overloaded"


class RequestTimeout(RyzansteinError):
    code = "timeout"


class Unavailable(RyzansteinError):
    """No live worker group could take the request."""

    code = "unavailable"


class RequestFailed(RyzansteinError):
    """Raised by clients when a request ended with an ``error`` event."""

    def __init__(self, request_id: str, code: str, message: str) -> None:
        super().__init__(f"request {request_id} failed: {code}: {message}")
        self.request_id = request_id
        self.code = code
        self.message = message


class ResultExpired(RequestFailed):
    """Raised by clients reading a request that has no result any more: it expired (results last
    ``result_ttl_s``), or the id was never handled. Code ``expired``."""

    def __init__(self, request_id: str, message: str) -> None:
        super().__init__(request_id, "expired", message)


class ConfigError(RyzansteinError):
    """Bad configuration or environment (no Redis reachable, unknown model, ...)."""


class EngineFailed(RyzansteinError):
    """The engine can no longer step: a rank of its tensor-parallel group died or stopped
    answering. The group must stop (no heartbeat, no more events) and leave its work to failover."""
