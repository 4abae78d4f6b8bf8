"""Log formats and the conventions of log lines about requests.

Every line about a request carries its id as the record attribute ``request_id`` (pass
``extra=request_extra(rid)``), so that ``--log-format json`` lines can be filtered by request and
text lines end with ``request_id=<id>``. Prompt text is kept out of logs: ``prompt_extra`` adds it
only when the operator asked for it (``--log-prompts`` / ``RYZ_LOG_PROMPTS``).
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import datetime, timezone
from typing import Any, Literal, TextIO

LogFormat = Literal["text", "json"]

# Attributes every LogRecord has; anything else on a record came in through ``extra``.
_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime", "taskName"}


def request_extra(request_id: str, **fields: Any) -> dict[str, Any]:
    """``extra=`` for a log call about one request."""
    return {"request_id": request_id, **fields}


def prompt_extra(prompt: str | None, prompt_ids: Any, *, log_prompts: bool) -> dict[str, Any]:
    """The prompt as log fields when ``log_prompts`` is set; nothing otherwise."""
    if not log_prompts:
        return {}
    if prompt is not None:
        return {"prompt": prompt}
    return {"prompt_ids": list(prompt_ids) if prompt_ids is not None else None}


def record_fields(record: logging.LogRecord) -> dict[str, Any]:
    """What the caller attached to ``record`` with ``extra``."""
    return {k: v for k, v in vars(record).items() if k not in _STANDARD and not k.startswith("_")}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, pid, message, then the ``extra`` fields."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "pid": record.process,
            "msg": record.getMessage(),
        }
        for key, value in record_fields(record).items():
            out.setdefault(key, value)
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    """``time LEVEL logger[pid]: message key=value ...`` with the ``extra`` fields at the end."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        fields = record_fields(record)
        if not fields:
            return line
        head, sep, tail = line.partition("\n")  # a traceback stays below the fields
        pairs = " ".join(f"{k}={json.dumps(v, default=str, ensure_ascii=False) if _quote(v) else v}"
                         for k, v in fields.items())
        return f"{head} {pairs}{sep}{tail}"


def _quote(value: Any) -> bool:
    return not isinstance(value, (int, float)) and (not isinstance(value, str) or not value
                                                     or any(c.isspace() or c in '"=' for c in value))


def configure_logging(*, level: str = "INFO", fmt: LogFormat = "text", stream: TextIO | None = None) -> None:
    """Route every logger to ``stream`` (stderr by default) in the chosen format."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    logging.basicConfig(level=level, handlers=[handler], force=True)
