"""A balancer's metrics and request log lines, driven in-process on the real test Redis."""

from __future__ import annotations

import logging
from typing import Any

import pytest
import redis

from balancer.service import Balancer
from broker.keys import Keys
from broker.settings import Settings
from tests.balancer.test_service import MakeBalancer, fake_group, queued, submit
from tests.gpu_workers.helpers import FakeClock, FakeMonotonic


@pytest.fixture
def make_balancer(r: redis.Redis, redis_url: str, prefix: str, mono: FakeMonotonic) -> MakeBalancer:
    def make(name: str = "b1", *, metrics: bool = True, **overrides: Any) -> Balancer:
        settings = Settings(redis_url=redis_url, prefix=prefix, balancer_block_ms=1,
                            metrics_port=0 if metrics else None, **overrides)
        balancer = Balancer(r, settings=settings, name=name, monotonic=mono, redis_uptime_s=lambda: 1e9)
        balancer.setup()
        return balancer

    return make


def sample(balancer: Balancer, name: str, **labels: str) -> float | None:
    return balancer.telemetry.registry.get_sample_value(name, labels)


def test_dispatches_rejections_and_batches_are_counted(
        r: redis.Redis, keys: Keys, make_balancer: MakeBalancer) -> None:
    fake_group(r, keys, "g1")
    balancer = make_balancer()
    for n in range(3):
        submit(r, keys, id=f"ok{n}", prompt="hello")
    submit(r, keys, id="bad", prompt="hi", temperature=-1)
    r.xadd(keys.cancel, {"id": "gone"})
    balancer.tick()  # the cancel is read along with this batch
    submit(r, keys, id="gone", prompt="cancelled before dispatch")
    balancer.tick()

    assert len(queued(r, keys, "g1")) == 3
    assert sample(balancer, "ryz_balancer_requests_total", outcome="dispatched") == 3
    assert sample(balancer, "ryz_balancer_requests_total", outcome="invalid_request") == 1
    assert sample(balancer, "ryz_balancer_requests_total", outcome="cancelled") == 1
    assert sample(balancer, "ryz_balancer_rejections_total", reason="invalid_request") == 1
    assert sample(balancer, "ryz_balancer_rejections_total", reason="cancelled") is None  # not a rejection
    assert sample(balancer, "ryz_balancer_batch_size_count") == 2
    assert sample(balancer, "ryz_balancer_batch_size_sum") == 5
    assert sample(balancer, "ryz_balancer_migrations_total") == 0


def test_no_group_is_an_unavailable_rejection(r: redis.Redis, keys: Keys, make_balancer: MakeBalancer) -> None:
    balancer = make_balancer(no_group_wait_s=5.0)
    t0 = 1_700_000_000_000
    balancer.clock = FakeClock(t0)  # type: ignore[assignment]
    submit(r, keys, id="w", prompt="anyone?")
    balancer.tick()
    balancer.refresh_groups()
    assert sample(balancer, "ryz_balancer_waiting_requests") == 1
    balancer.clock.ms = t0 + 5_000
    balancer.process([])
    assert sample(balancer, "ryz_balancer_rejections_total", reason="unavailable") == 1


def test_group_health_failover_and_migration(r: redis.Redis, keys: Keys, make_balancer: MakeBalancer) -> None:
    fake_group(r, keys, "doomed")
    fake_group(r, keys, "drains", state="draining")
    balancer = make_balancer(dead_after_s=3.0, forget_dead_after_s=600.0)
    for n in range(2):
        submit(r, keys, id=f"f{n}", prompt="x")
    balancer.tick()
    assert len(queued(r, keys, "doomed")) == 2
    assert sample(balancer, "ryz_group_up", group="doomed") == 1
    assert sample(balancer, "ryz_group_draining", group="drains") == 1

    fake_group(r, keys, "doomed", age_s=10)
    fake_group(r, keys, "alive")
    balancer.refresh_groups()  # fails "doomed" over
    balancer.tick()  # routes its requests to "alive", taking them over

    assert sample(balancer, "ryz_group_up", group="doomed") == 0
    assert sample(balancer, "ryz_group_heartbeat_age_seconds", group="doomed") >= 10.0
    assert sample(balancer, "ryz_group_up", group="alive") == 1
    assert sample(balancer, "ryz_balancer_failovers_total") == 1
    assert sample(balancer, "ryz_balancer_failover_requests_total") == 2
    assert sample(balancer, "ryz_balancer_migrations_total") == 2
    assert len(queued(r, keys, "alive")) == 2

    fake_group(r, keys, "doomed", age_s=700)  # long dead: forgotten, and its series go with it
    balancer.refresh_groups()  # removes it from the registry
    balancer.refresh_groups()
    assert sample(balancer, "ryz_group_up", group="doomed") is None
    assert balancer.telemetry.probe.check().ready


def test_request_log_lines_carry_the_request_id(
        r: redis.Redis, keys: Keys, make_balancer: MakeBalancer, caplog: pytest.LogCaptureFixture) -> None:
    fake_group(r, keys, "g1")
    balancer = make_balancer(metrics=False)
    caplog.set_level(logging.DEBUG, logger="balancer")
    submit(r, keys, id="good-1", prompt="a secret prompt")
    submit(r, keys, id="bad-1", prompt="hi", top_p=7)
    balancer.tick()

    lines = {getattr(rec, "request_id", None): rec.getMessage() for rec in caplog.records}
    assert lines["good-1"] == "request dispatched to g1 (epoch 1)"
    assert lines["bad-1"].startswith("request ended by the balancer: invalid_request: field 'top_p'")
    assert all("secret" not in rec.getMessage() for rec in caplog.records)
    assert sample(balancer, "ryz_balancer_requests_total", outcome="dispatched") is None  # metrics off
