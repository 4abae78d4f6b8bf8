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


class DuplicateId(RyzansteinError):
    """The request's id is in use by another request."""

    code = "duplicate_id"


class RequestFailed(RyzansteinError):
    """Raised by clients when a request ended with an ``error`` event. ``RequestFailed.of`` gives the
    subclass of the event's code, which is also the named kind: ``except InvalidRequest`` catches a
    request refused by the server as well as one the client refused before sending it."""

    def __init__(self, request_id: str, code: str, message: str) -> None:
        super().__init__(f"request {request_id} failed: {code}: {message}")
        self.request_id = request_id
        self.code = code
        self.message = message

    @staticmethod
    def of(request_id: str, code: str, message: str) -> RequestFailed:
        """The exception for an ``error`` event with this code (a plain RequestFailed for others)."""
        return _FAILED_BY_CODE.get(code, RequestFailed)(request_id, code, message)


class InvalidRequestFailed(RequestFailed, InvalidRequest):
    """An ``error`` event with code ``invalid_request``."""


class OverloadedFailed(RequestFailed, Overloaded):
    """An ``error`` event with code ``overloaded``: retry after a backoff."""


class TimeoutFailed(RequestFailed, RequestTimeout):
    """An ``error`` event with code ``timeout``: the request's ``timeout_s`` passed on the server."""


class UnavailableFailed(RequestFailed, Unavailable):
    """An ``error`` event with code ``unavailable``: retry once groups are up."""


class ModelNotFoundFailed(RequestFailed, ModelNotFound):
    """An ``error`` event with code ``model_not_found``."""


class DuplicateIdFailed(RequestFailed, DuplicateId):
    """An ``error`` event with code ``duplicate_id``."""


_FAILED_BY_CODE: dict[str, type[RequestFailed]] = {
    cls.code: cls for cls in (InvalidRequestFailed, OverloadedFailed, TimeoutFailed, UnavailableFailed,
                              ModelNotFoundFailed, DuplicateIdFailed)
}


class WaitTimeout(RequestTimeout, TimeoutError):
    """A client stopped waiting for a request after its ``timeout`` (and cancelled it, unless told
    not to). A ``TimeoutError`` too, as clients raised before."""


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
