"""The operations endpoint: probes from loop progress (time passed in) and the HTTP server itself."""

from __future__ import annotations

import json
import socket
import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest
from prometheus_client import Counter

from broker.errors import ConfigError
from broker.metrics import BatchHistogram, MetricsServer, Probe, new_registry, serve_metrics
from tests.gpu_workers.helpers import FakeMonotonic


def probe(mono: FakeMonotonic) -> Probe:
    return Probe(ready_within_s=3.0, live_within_s=60.0, monotonic=mono)


def test_a_starting_process_is_live_but_not_ready() -> None:
    result = probe(FakeMonotonic()).check()
    assert (result.live, result.ready, result.reason, result.progress_age_s) == (True, False, "starting", None)


@pytest.mark.parametrize(
    ("age_s", "live", "ready"),
    [(0.0, True, True), (3.0, True, True), (3.1, True, False), (60.0, True, False), (60.1, False, False)],
)
def test_probes_follow_the_age_of_the_last_progress(age_s: float, live: bool, ready: bool) -> None:
    mono = FakeMonotonic()
    p = probe(mono)
    p.progress()
    mono.advance(age_s)
    result = p.check()
    assert (result.live, result.ready) == (live, ready)
    assert result.progress_age_s == pytest.approx(age_s)


def test_a_draining_process_is_live_and_not_ready() -> None:
    mono = FakeMonotonic()
    p = probe(mono)
    p.progress(accepting=False)
    result = p.check()
    assert (result.live, result.ready, result.reason) == (True, False, "draining")
    p.progress(accepting=True)
    assert p.check().ready


def test_a_long_step_keeps_the_process_ready_until_the_liveness_limit() -> None:
    mono = FakeMonotonic()
    p = probe(mono)
    p.progress()
    p.step_started()
    mono.advance(6.7)  # past the ready window: a step slowed down by a starved CPU
    result = p.check()
    assert (result.live, result.ready, result.reason) == (True, True, "busy: one step has run for 6.7s")
    mono.advance(53.4)  # 60.1 s into one step: hung
    result = p.check()
    assert (result.live, result.ready) == (False, False) and result.reason.startswith("one step has run for 60.1s")
    p.step_ended()
    p.progress()
    assert p.check().ready


def test_between_steps_the_ready_window_applies_again() -> None:
    mono = FakeMonotonic()
    p = probe(mono)
    p.progress()
    p.step_started()
    mono.advance(1.0)
    p.step_ended()  # the step ended, but the loop has not reached Redis since: stalled elsewhere
    mono.advance(2.5)
    assert not p.check().ready


def test_a_draining_process_in_a_long_step_is_not_ready() -> None:
    mono = FakeMonotonic()
    p = probe(mono)
    p.progress(accepting=False)
    p.step_started()
    mono.advance(10)
    assert (p.check().live, p.check().ready, p.check().reason) == (True, False, "draining")


def get(url: str) -> tuple[int, str, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as answer:
            return answer.status, answer.headers["Content-Type"], answer.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers["Content-Type"], exc.read().decode()


@pytest.fixture
def served() -> Iterator[tuple[MetricsServer, Counter, Probe, FakeMonotonic]]:
    registry = new_registry()
    counter = Counter("test_things", "Things counted.", namespace="ryz", registry=registry)
    mono = FakeMonotonic()
    p = probe(mono)
    server = serve_metrics(registry, p, host="127.0.0.1", port=0)
    assert server is not None
    yield server, counter, p, mono
    server.close()


def test_server_serves_metrics_and_probes(served: tuple[MetricsServer, Counter, Probe, FakeMonotonic]) -> None:
    server, counter, p, mono = served
    base = f"http://127.0.0.1:{server.port}"
    assert server.port > 0

    counter.inc(3)
    status, ctype, body = get(f"{base}/metrics")
    assert status == 200 and ctype.startswith("text/plain")
    assert "ryz_test_things_total 3.0" in body.splitlines()
    assert any(line.startswith("process_") for line in body.splitlines())  # process metrics come along

    assert get(f"{base}/livez")[0] == 200 and get(f"{base}/readyz")[0] == 503  # starting
    p.progress()
    status, ctype, body = get(f"{base}/readyz")
    assert (status, ctype) == (200, "application/json") and json.loads(body)["reason"] == "ok"
    assert get(f"{base}/healthz")[0] == 200
    mono.advance(61.0)
    status, _, body = get(f"{base}/livez")
    assert status == 503 and json.loads(body)["live"] is False
    assert get(f"{base}/nothing")[0] == 404


def test_no_port_no_server() -> None:
    assert serve_metrics(new_registry(), probe(FakeMonotonic()), host="127.0.0.1", port=None) is None


def test_a_port_in_use_is_a_config_error() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        with pytest.raises(ConfigError, match=f"metrics port {taken.getsockname()[1]} .* in use"):
            MetricsServer(new_registry(), probe(FakeMonotonic()), host="127.0.0.1", port=taken.getsockname()[1])


def test_batch_histogram_records_many_equal_observations_at_once() -> None:
    registry = new_registry()
    hist = BatchHistogram("gap_seconds", "Gaps.", buckets=(0.01, 0.1, 1.0), labels={"group": "g"},
                          registry=registry)
    hist.observe(0.01, 3)  # on a bound: counted in that bucket (le is inclusive)
    hist.observe(0.5)
    hist.observe(100.0, 2)

    def value(suffix: str, **labels: str) -> float | None:
        return registry.get_sample_value(f"ryz_gap_seconds{suffix}", {"group": "g", **labels})

    assert [value("_bucket", le=le) for le in ("0.01", "0.1", "1.0", "+Inf")] == [3, 3, 4, 6]
    assert value("_count") == 6 and value("_sum") == pytest.approx(0.03 + 0.5 + 200.0)
