"""Start-up is never silent: a line per phase, load progress, and a ``loading`` registry entry."""

from __future__ import annotations

import argparse
import logging

import pytest
import redis

from broker.errors import ConfigError
from broker.keys import Keys
from broker.registry import read_groups
from broker.settings import Settings
from gpu_workers import cli, startup
from gpu_workers.startup import LoadingBeacon, loading_load, phase, track
from tests.gpu_workers.helpers import FakeMonotonic


def test_each_phase_logs_a_line_when_it_starts_and_ends(caplog: pytest.LogCaptureFixture) -> None:
    mono = FakeMonotonic()
    caplog.set_level(logging.INFO, logger="gpu_workers.startup")
    with phase("pack", monotonic=mono):
        assert startup.current_phase() == "pack"
        with phase("kernel compile", "head_dim 64", monotonic=mono):
            assert startup.current_phase() == "kernel compile"
            mono.advance(1.25)
        assert startup.current_phase() == "pack"
        mono.advance(2.0)
    assert startup.current_phase() == ""
    assert [r.getMessage() for r in caplog.records] == [
        "start-up: pack...", "start-up: kernel compile (head_dim 64)...", "start-up: kernel compile done in 1.2s",
        "start-up: pack done in 3.2s"]


def test_progress_without_a_terminal_is_a_log_line_every_few_seconds(caplog: pytest.LogCaptureFixture) -> None:
    mono = FakeMonotonic()
    caplog.set_level(logging.INFO, logger="gpu_workers.startup")
    seen = []
    for item in track(range(10), total=10, what="loading weights", terminal=False, monotonic=mono):
        seen.append(item)
        mono.advance(1.0)  # one tensor a second: a line at 5 s
    assert seen == list(range(10))
    assert [r.getMessage() for r in caplog.records] == [
        "loading weights: 5/10 tensors (50%), 5.0s, about 5s left"]


def test_progress_on_a_terminal_is_a_tqdm_bar(capsys: pytest.CaptureFixture[str]) -> None:
    assert list(track(range(3), total=3, what="loading weights", terminal=True)) == [0, 1, 2]
    err = capsys.readouterr().err
    assert err.startswith("\rloading weights:") and "/3 [" in err  # a bar redrawn in place (carriage returns)


def test_a_loading_group_is_listed_with_its_phase_then_withdrawn(r: redis.Redis, keys: Keys) -> None:
    beacon = LoadingBeacon(r, keys, loading_load("g1", model="random:tiny", tp=2, kv_dtype="bf16"), interval_s=0.05)
    with phase("load"):
        beacon.beat()
    (group,) = read_groups(r, keys, dead_after_s=3.0)
    assert (group.name, group.state, group.phase, group.model, group.tp, group.alive) == (
        "g1", "loading", "load", "random:tiny", 2, True)
    assert not group.routable  # balancers never route to a loading group
    beacon.start()
    beacon.withdraw()
    assert read_groups(r, keys, dead_after_s=3.0) == []


def test_a_start_up_that_fails_while_loading_leaves_no_registry_entry(r: redis.Redis, keys: Keys,
                                                                       settings: Settings, redis_url: str) -> None:
    args = argparse.Namespace(group="g1", model="random:tiny", kv_dtype="fp8_e4m3", served_model_name=None)
    with pytest.raises(ConfigError), cli._announce_loading(settings, redis_url, args, tp=1):
        args.loading_beacon.beat()
        assert [(g.state, g.served_models) for g in read_groups(r, keys, dead_after_s=3.0)] == [
            ("loading", ["random:tiny"])]  # the names it will serve: health and status group by them
        raise ConfigError("the model cannot be loaded")
    assert read_groups(r, keys, dead_after_s=3.0) == []
