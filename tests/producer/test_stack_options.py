"""``ryzanstein up`` hands each child distinct metrics ports and the log options (children not started)."""

from __future__ import annotations

import pytest

from broker.cli_common import settings_from_args
from broker.settings import Settings
from producer.cli import build_parser
from producer.stack import Child, Stack


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("RYZ_METRICS_PORT", "RYZ_METRICS_HOST", "RYZ_LOG_FORMAT", "RYZ_LOG_PROMPTS"):
        monkeypatch.delenv(name, raising=False)


def children(settings: Settings, groups: int) -> list[Child]:
    stack = Stack(settings, groups=groups)
    stack._spawn = lambda child: None  # type: ignore[method-assign]
    stack.start()
    return stack.children


def child_settings(child: Child) -> Settings:
    """The settings the child would run with: its argv through the same options as `ryzanstein`."""
    module, *args = child.argv[2:]  # [python, -m, module, ...]
    command = {"balancer": "balancer", "gpu_workers": "worker"}[module]
    return settings_from_args(build_parser().parse_args([command, *args]))


def test_balancer_gets_the_base_port_and_group_i_the_next_ones() -> None:
    settings = Settings(redis_url="redis://127.0.0.1:1", metrics_port=9300, metrics_host="127.0.0.1",
                        log_format="json", log_prompts=True)
    started = children(settings, groups=3)

    assert [c.name for c in started] == ["balancer", "worker0", "worker1", "worker2"]
    child = [child_settings(c) for c in started]
    assert [s.metrics_port for s in child] == [9300, 9301, 9302, 9303]
    assert {(s.metrics_host, s.log_format, s.log_prompts) for s in child} == {("127.0.0.1", "json", True)}


@pytest.mark.parametrize(("port", "expected"), [(None, None), (0, 0)])
def test_no_port_or_free_ports(port: int | None, expected: int | None) -> None:
    started = children(Settings(redis_url="redis://127.0.0.1:1", metrics_port=port), groups=2)
    assert [child_settings(c).metrics_port for c in started] == [expected] * 3


def test_children_get_the_url_in_their_environment_not_on_their_command_line() -> None:
    """Command lines are world-readable (ps): a password in the URL must not be there."""
    url = "redis://app:s3cret@127.0.0.1:1"
    settings = Settings(redis_url=url)
    stack = Stack(settings, groups=1)
    stack._spawn = lambda child: None  # type: ignore[method-assign]
    stack.start()
    assert all("s3cret" not in " ".join(c.argv) for c in stack.children)
    assert stack.child_env["RYZ_REDIS_URL"] == url
