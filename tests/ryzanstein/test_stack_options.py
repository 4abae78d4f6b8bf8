"""``ryzanstein up`` hands each child distinct metrics ports and the log options (children not started)."""

from __future__ import annotations

import argparse

import pytest

from broker.cli_common import settings_from_args
from broker.errors import ConfigError
from broker.settings import Settings
from gpu_workers.cli import engine_argv
from ryzanstein.cli import build_parser
from ryzanstein.stack import Child, Stack, run


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


def test_several_models_get_their_groups_and_every_group_the_engine_flags() -> None:
    args = build_parser().parse_args([
        "up", "--model", "echo", "--model", "random:tiny", "--groups", "2", "--kv-dtype", "fp32",
        "--kv-memory", "64MiB", "--device", "cpu", "--tp-timeout", "7.5", "--default-model", "echo"])
    stack = Stack(Settings(redis_url="redis://127.0.0.1:1"), models=args.model, groups=args.groups,
                  worker_args=engine_argv(args), balancer_args=["--default-model", args.default_model])
    stack._spawn = lambda child: None  # type: ignore[method-assign]
    stack.start()
    parser = build_parser()
    workers = [parser.parse_args(["worker", *c.argv[3:]]) for c in stack.children[1:]]
    assert [w.model for w in workers] == ["echo", "echo", "random:tiny", "random:tiny"]
    assert len({w.group for w in workers}) == 4
    assert {(w.kv_dtype, w.kv_memory, w.device, w.tp_timeout, w.served_model_name) for w in workers} == {
        ("fp32", "64MiB", "cpu", 7.5, None)}
    balancer = parser.parse_args(["balancer", *stack.children[0].argv[3:]])
    assert balancer.default_model == "echo"


def test_up_takes_every_engine_flag_the_worker_has() -> None:
    parser = build_parser()
    worker = {a.dest for a in _subparser(parser, "worker")._actions}
    up = {a.dest for a in _subparser(parser, "up")._actions}
    assert {"served_model_name", "kv_dtype", "kv_memory", "device", "tp_timeout", "tp", "model"} <= worker & up


def test_one_served_name_for_several_models_is_refused() -> None:
    args = build_parser().parse_args(["up", "--model", "echo", "--model", "random:tiny",
                                      "--served-model-name", "chat"])
    with pytest.raises(ConfigError, match="--served-model-name names one model"):
        run(args)


def _subparser(parser: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser:
    [action] = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return action.choices[name]


def test_children_get_the_url_in_their_environment_not_on_their_command_line() -> None:
    """Command lines are world-readable (ps): a password in the URL must not be there."""
    url = "redis://app:s3cret@127.0.0.1:1"
    settings = Settings(redis_url=url)
    stack = Stack(settings, groups=1)
    stack._spawn = lambda child: None  # type: ignore[method-assign]
    stack.start()
    assert all("s3cret" not in " ".join(c.argv) for c in stack.children)
    assert stack.child_env["RYZ_REDIS_URL"] == url


def test_the_submit_hint_reaches_the_stack_it_is_printed_for() -> None:
    """Run as printed, the hint must reach this stack: its prefix, and a model when several are served."""
    from ryzanstein.stack import submit_hint

    url = "redis://127.0.0.1:7000"
    assert submit_hint(url, prefix="ryz", models=["echo"], default_model=None) == (
        f'try: ryzanstein submit --redis-url {url} "hello"')
    assert submit_hint(url, prefix="brk", models=["echo", "random:tiny"], default_model=None) == (
        f'try: ryzanstein submit --redis-url {url} --prefix brk --model echo "hello"')
    assert "--model" not in submit_hint(url, prefix="ryz", models=["echo", "random:tiny"], default_model="echo")
    secret = submit_hint("redis://:pw@127.0.0.1:7000", prefix="ryz", models=["echo"], default_model=None)
    assert "pw" not in secret and "RYZ_REDIS_URL" in secret
