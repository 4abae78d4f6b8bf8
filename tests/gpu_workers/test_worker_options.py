"""``ryzanstein worker``'s engine limits: flags over RYZ_ settings over defaults, refused before a model
loads when the scheduler could not work with them, and passed on by ``up`` and to tensor-parallel ranks."""

from __future__ import annotations

from pathlib import Path

import pytest

from broker.errors import ConfigError
from broker.settings import Settings
from gpu_workers.cli import _follower_argv, engine_argv, worker_options
from gpu_workers.engine_spec import EngineOptions
from ryzanstein.cli import build_parser
from ryzanstein.stack import Stack


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("RYZ_MAX_NUM_SEQS", "RYZ_MAX_NUM_BATCHED_TOKENS", "RYZ_TP_TIMEOUT_S"):
        monkeypatch.delenv(name, raising=False)


def options_of(*argv: str) -> tuple[Settings, EngineOptions]:
    args = build_parser().parse_args(["worker", *argv])
    return worker_options(args, Settings(redis_url="redis://127.0.0.1:1"), tp=1)


def test_defaults_are_vllms_and_the_engine_gets_them() -> None:
    settings, options = options_of()
    assert (settings.max_num_seqs, settings.max_num_batched_tokens) == (128, 512)
    llama = options.llama()
    assert (llama.max_num_seqs, llama.max_num_batched_tokens) == (128, 512)


def test_environment_then_flags_override(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RYZ_MAX_NUM_SEQS", "16")
    monkeypatch.setenv("RYZ_MAX_NUM_BATCHED_TOKENS", "2048")
    settings, options = options_of()
    assert (settings.max_num_seqs, settings.max_num_batched_tokens) == (16, 2048)
    settings, options = options_of("--max-num-seqs", "8", "--tp-timeout", "9")
    llama = options.llama()
    assert (llama.max_num_seqs, llama.max_num_batched_tokens, settings.tp_timeout_s) == (8, 2048, 9.0)


@pytest.mark.parametrize(("argv", "message"), [
    (["--max-num-seqs", "0"], "--max-num-seqs"),
    (["--max-num-seqs", "64", "--max-num-batched-tokens", "32"], "must be at least --max-num-seqs"),
    (["--max-num-batched-tokens", "100"], r"--max-num-batched-tokens \(RYZ_MAX_NUM_BATCHED_TOKENS\) is 100"),
])
def test_limits_the_scheduler_cannot_use_are_refused(argv: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        options_of(*argv)


def test_up_passes_the_limits_to_every_group_and_the_leader_to_its_ranks() -> None:
    args = build_parser().parse_args(["up", "--model", "random:tiny", "--groups", "2", "--max-num-seqs", "4",
                                      "--max-num-batched-tokens", "64"])
    stack = Stack(Settings(redis_url="redis://127.0.0.1:1"), models=args.model, groups=args.groups,
                  worker_args=engine_argv(args))
    stack._spawn = lambda child: None  # type: ignore[method-assign]
    stack.start()
    parser = build_parser()
    workers = [parser.parse_args(["worker", *c.argv[3:]]) for c in stack.children[1:]]
    assert [(w.max_num_seqs, w.max_num_batched_tokens) for w in workers] == [(4, 64), (4, 64)]
    assert "--max-num-seqs" not in engine_argv(build_parser().parse_args(["up"]))  # unset: the settings decide

    worker = parser.parse_args(["worker", "--model", "random:tiny", "--tp", "2", "--max-num-seqs", "4"])
    settings, options = worker_options(worker, Settings(redis_url="redis://127.0.0.1:1"), tp=2)
    rank = parser.parse_args(["worker", *_follower_argv(worker, settings, Path("/m"), options)])
    assert (rank.tp, rank.max_num_seqs, rank.max_num_batched_tokens) == (2, 4, 512)


def test_threads_flag_reaches_the_settings_and_the_ranks_a_leader_starts(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RYZ_THREADS", raising=False)
    settings, _ = options_of()
    assert settings.threads is None  # unset: the usable CPUs decide (gpu_workers.cpu_threads)
    monkeypatch.setenv("RYZ_THREADS", "3")
    assert options_of()[0].threads == 3
    parser = build_parser()
    worker = parser.parse_args(["worker", "--model", "random:tiny", "--tp", "2", "--threads", "1"])
    settings, options = worker_options(worker, Settings(redis_url="redis://127.0.0.1:1"), tp=2)
    assert settings.threads == 1
    assert parser.parse_args(["worker", *_follower_argv(worker, settings, Path("/m"), options)]).threads == 1
    assert "--threads" in engine_argv(parser.parse_args(["up", "--threads", "2"]))


def test_compilation_level_flags_over_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    """``--compilation-config`` (vLLM's level) over RYZ_COMPILATION_LEVEL over 0 (eager);
    ``--enforce-eager`` wins over both; ``up`` passes them on to its workers."""
    monkeypatch.delenv("RYZ_COMPILATION_LEVEL", raising=False)
    assert options_of()[1].compilation_level == 0
    assert options_of()[1].llama().compilation_level == 0
    assert options_of("--compilation-config", '{"level": 3}')[1].llama().compilation_level == 3
    monkeypatch.setenv("RYZ_COMPILATION_LEVEL", "3")
    assert options_of()[1].compilation_level == 3
    assert options_of("-O", "0")[1].compilation_level == 0
    assert options_of("--enforce-eager")[1].compilation_level == 0
    up = engine_argv(build_parser().parse_args(["up", "-O", "3", "--enforce-eager"]))
    assert options_of(*up)[1].compilation_level == 0
    assert options_of(*engine_argv(build_parser().parse_args(["up", "-O", "3"])))[1].compilation_level == 3
