"""Adaptive batching: no wait when idle or sequential, a bounded wait under load; histogram buckets."""

from __future__ import annotations

import pytest

from balancer.batching import AdaptiveBatcher, bucket


def test_a_lone_request_after_idle_time_never_waits() -> None:
    b = AdaptiveBatcher(max_batch=128, max_wait_s=0.005)
    b.observe(0, now=0.0)
    b.observe(1, now=0.5)
    assert b.wait_s(1) == 0.0


def test_a_client_sending_one_request_after_another_never_waits() -> None:
    b = AdaptiveBatcher(max_batch=128, max_wait_s=0.005)
    t = 0.0
    for _ in range(200):  # ~1,000 req/s, but one at a time: waiting would never bring a second one
        t += 0.001
        b.observe(1, now=t)
        assert b.wait_s(1) == 0.0
    assert b.rate > 500


def test_under_load_it_waits_a_bounded_time_for_a_larger_batch() -> None:
    b = AdaptiveBatcher(max_batch=128, max_wait_s=0.005)
    t = 0.0
    for _ in range(200):  # 4 entries every 2 ms: 2,000 req/s, queuing up while the balancer works
        t += 0.002
        b.observe(4, now=t)
    assert b.rate == pytest.approx(2000, rel=0.1)
    assert b.wait_s(4) == pytest.approx(0.005)
    assert b.wait_s(128) == 0.0  # a full batch goes at once
    assert b.wait_s(0) == 0.0


def test_the_wait_is_no_longer_than_the_batch_needs_to_fill() -> None:
    b = AdaptiveBatcher(max_batch=128, max_wait_s=0.005)
    t = 0.0
    for _ in range(50):  # 64 entries per ms: the remaining 28 arrive in well under 5 ms
        t += 0.001
        b.observe(64, now=t)
    assert 0.0 < b.wait_s(100) < 0.001


def test_load_that_stops_stops_the_waiting() -> None:
    b = AdaptiveBatcher(max_batch=128, max_wait_s=0.005)
    t = 0.0
    for _ in range(50):
        t += 0.002
        b.observe(4, now=t)
    b.observe(0, now=t + 0.5)
    b.observe(1, now=t + 1.0)
    assert b.wait_s(1) == 0.0


def test_disabled_by_a_zero_wait() -> None:
    b = AdaptiveBatcher(max_batch=128, max_wait_s=0.0)
    for n in range(50):
        b.observe(10, now=n * 0.001)
    assert b.wait_s(10) == 0.0


@pytest.mark.parametrize(("size", "label"), [(1, "1"), (2, "2"), (3, "3-4"), (4, "3-4"), (5, "5-8"),
                                             (64, "33-64"), (65, "65-128"), (128, "65-128")])
def test_buckets(size: int, label: str) -> None:
    assert bucket(size) == label


def test_histogram_counts_batches_per_bucket() -> None:
    b = AdaptiveBatcher(max_batch=128, max_wait_s=0.005)
    for size in (1, 1, 3, 4, 100, 0):
        b.record(size)
    assert b.histogram() == {"1": 2, "3-4": 2, "65-128": 1}
