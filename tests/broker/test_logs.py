"""Log formats: JSON lines with the request id and other extra fields; prompts only when asked."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest

from broker.cli_common import settings_from_args
from broker.logs import configure_logging, prompt_extra, request_extra
from ryzanstein.cli import build_parser


@pytest.fixture
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def log_lines(fmt: str) -> list[str]:
    stream = io.StringIO()
    configure_logging(level="DEBUG", fmt=fmt, stream=stream)  # type: ignore[arg-type]
    log = logging.getLogger("ryz.test")
    log.info("plain line")
    log.debug("request finished: %s", "stop", extra=request_extra("r-1", group="g 1", e2e_s=0.25))
    try:
        raise ValueError("boom")
    except ValueError:
        log.exception("request failed", extra=request_extra("r-2"))
    return stream.getvalue().splitlines()


def test_json_format_is_one_object_per_line_with_extra_fields(restore_logging: None) -> None:
    lines = log_lines("json")

    plain, finished, failed = (json.loads(line) for line in lines)  # the traceback stays inside its object
    assert plain["msg"] == "plain line" and plain["level"] == "INFO" and plain["logger"] == "ryz.test"
    assert "request_id" not in plain and isinstance(plain["pid"], int) and plain["ts"].endswith("+00:00")
    assert finished["msg"] == "request finished: stop" and finished["level"] == "DEBUG"
    assert (finished["request_id"], finished["group"], finished["e2e_s"]) == ("r-1", "g 1", 0.25)
    assert failed["request_id"] == "r-2" and "ValueError: boom" in failed["exc"]


def test_text_format_ends_lines_with_the_extra_fields(restore_logging: None) -> None:
    lines = log_lines("text")

    assert " INFO ryz.test[" in lines[0] and lines[0].endswith("]: plain line")
    assert lines[1].endswith('request finished: stop request_id=r-1 group="g 1" e2e_s=0.25')
    assert lines[2].endswith("request failed request_id=r-2")
    assert lines[3] == "Traceback (most recent call last):"  # below the fields, not inside them


def test_prompts_are_logged_only_when_asked() -> None:
    assert prompt_extra("secret", None, log_prompts=False) == {}
    assert prompt_extra("secret", None, log_prompts=True) == {"prompt": "secret"}
    assert prompt_extra(None, (1, 2), log_prompts=True) == {"prompt_ids": [1, 2]}


def test_log_format_from_flags_or_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    parse = build_parser().parse_args
    monkeypatch.delenv("RYZ_LOG_FORMAT", raising=False)
    monkeypatch.delenv("RYZ_LOG_PROMPTS", raising=False)
    assert settings_from_args(parse(["status"])).log_format == "text"
    assert settings_from_args(parse(["status", "--log-format", "json"])).log_format == "json"
    assert settings_from_args(parse(["status", "--log-json"])).log_format == "json"
    assert settings_from_args(parse(["worker"])).log_prompts is False
    monkeypatch.setenv("RYZ_LOG_FORMAT", "json")
    monkeypatch.setenv("RYZ_LOG_PROMPTS", "1")
    settings = settings_from_args(parse(["worker"]))
    assert (settings.log_format, settings.log_prompts) == ("json", True)
    assert settings_from_args(parse(["worker", "--log-format", "text"])).log_format == "text"
