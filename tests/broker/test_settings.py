"""Settings: one place for every default, each overridable by ``RYZ_<FIELD>`` and by explicit values."""

from __future__ import annotations

import os

import pytest
from pydantic import ValidationError

from broker.settings import Settings, load_settings


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.upper().startswith("RYZ_"):
            monkeypatch.delenv(name)


def test_defaults() -> None:
    s = Settings()
    assert s.redis_url is None
    assert s.prefix == "ryz"
    assert s.max_request_bytes == 1 << 20
    assert s.default_max_tokens == 16
    assert s.result_ttl_s == 3600  # CONTRACT.md: result streams expire, default 1 hour
    assert s.dead_after_s > s.heartbeat_interval_s > 0
    assert s.reconnect_cap_s >= s.reconnect_base_s > 0


def test_environment_overrides(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RYZ_PREFIX", "envp")
    monkeypatch.setenv("RYZ_REDIS_URL", "redis://env:1/0")
    monkeypatch.setenv("RYZ_HEARTBEAT_INTERVAL_S", "0.25")
    monkeypatch.setenv("RYZ_MAX_REQUEST_BYTES", "4096")
    s = Settings()
    assert (s.prefix, s.redis_url, s.heartbeat_interval_s, s.max_request_bytes) == (
        "envp",
        "redis://env:1/0",
        0.25,
        4096,
    )


def test_unknown_environment_variables_are_ignored(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RYZ_NO_SUCH_SETTING", "1")
    assert Settings().prefix == "ryz"


def test_a_malformed_environment_value_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RYZ_MAX_REQUEST_BYTES", "lots")
    with pytest.raises(ValidationError):
        Settings()


def test_explicit_values_win_over_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RYZ_PREFIX", "envp")
    monkeypatch.setenv("RYZ_REDIS_URL", "redis://env")
    s = load_settings(prefix="flag", redis_url="redis://flag")
    assert (s.prefix, s.redis_url) == ("flag", "redis://flag")


def test_load_settings_ignores_none(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RYZ_PREFIX", "envp")
    s = load_settings(prefix=None, redis_url=None, result_ttl_s=None)
    assert (s.prefix, s.redis_url, s.result_ttl_s) == ("envp", None, 3600)
    assert load_settings().prefix == "envp"


def test_load_settings_keeps_falsy_values_that_are_not_none() -> None:
    s = load_settings(prefix="", claim_idle_ms=0)
    assert (s.prefix, s.claim_idle_ms) == ("", 0)
