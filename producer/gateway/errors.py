"""Errors as OpenAI clients expect them: an HTTP status and ``{"error": {message, type, param, code}}``.

ryzanstein's error codes (CONTRACT.md) map to statuses the way users of OpenAI-style APIs expect:
a bad request is 400, an overloaded server 429 (clients back off and retry), a deadline that passed
504, no live worker group 503, anything else 500.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from starlette.responses import JSONResponse

# ryzanstein error code -> (HTTP status, OpenAI error type)
STATUS_BY_CODE: dict[str, tuple[int, str]] = {
    "invalid_request": (400, "invalid_request_error"),
    "model_not_found": (404, "invalid_request_error"),
    "overloaded": (429, "rate_limit_error"),
    "timeout": (504, "timeout_error"),
    "unavailable": (503, "service_unavailable_error"),
    "internal": (500, "server_error"),
}
_FIELD_RE = re.compile(r"field '([A-Za-z0-9_.]+)'")


@dataclass
class ApiError(Exception):
    """An error response. ``code`` is ryzanstein's error code; ``param`` the request field at fault."""

    code: str
    message: str
    param: str | None = None

    @property
    def status(self) -> int:
        return STATUS_BY_CODE.get(self.code, STATUS_BY_CODE["internal"])[0]

    @property
    def type(self) -> str:
        return STATUS_BY_CODE.get(self.code, STATUS_BY_CODE["internal"])[1]

    @classmethod
    def from_code(cls, code: str, message: str) -> ApiError:
        """From an ``error`` event or a RyzansteinError; the field its message names becomes ``param``."""
        match = _FIELD_RE.search(message)
        return cls(code, message, match.group(1) if match else None)

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self, headers: dict[str, str] | None = None) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=headers)
