"""The operations endpoint of a balancer or group leader: Prometheus metrics and health probes.

One small HTTP server per process, on ``--metrics-port`` (``RYZ_METRICS_PORT``):

- ``/metrics``: the process' metrics in the Prometheus text format (names under ``ryz_``, in the
  style of vLLM's; the reference table is in docs/OPERATIONS.md);
- ``/livez`` (also ``/healthz``): 200 while the process' loop makes progress, 503 once it has made
  none for ``liveness_timeout_s`` (a hung engine or a Redis that stayed unreachable);
- ``/readyz``: 200 while the last progress is younger than ``dead_after_s`` (the age at which
  balancers give a group up) and the process takes work (a draining group is not ready).

"Progress" is a successful step of the loop that talks to Redis: a group's heartbeat, a balancer's
read of the registry. So a probe that passes means the process is alive *and* reaches Redis, which a
TCP check or a bare HTTP answer from a side thread would not show.
"""

from __future__ import annotations

import bisect
import errno
import itertools
import json
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import HistogramMetricFamily
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.utils import floatToGoString

from broker.errors import ConfigError

log = logging.getLogger(__name__)

NAMESPACE = "ryz"

# Seconds; from sub-millisecond (the echo engine on one host) to minutes (long generations).
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0,
                   40.0, 80.0, 160.0, 320.0, 640.0)
# Seconds between two tokens of one request: a decode step, give or take batching.
INTER_TOKEN_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4,
                       0.5, 0.75, 1.0, 2.5, 5.0)
# Requests per batch (ingress reads of up to 128, engine steps of up to worker_max_batch).
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
TOKEN_COUNT_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10_000, 20_000, 50_000,
                       100_000, 200_000)


class BatchHistogram:
    """A histogram of one fixed label set that records many equal observations in one call.

    A decode step gives every request in the batch the same inter-token gap: recording it once with
    a count keeps the cost per step instead of per token (prometheus_client's ``observe`` takes one
    value at a time, ~2 us each). Exposed like any Prometheus histogram.
    """

    def __init__(self, name: str, documentation: str, *, buckets: Sequence[float], labels: dict[str, str],
                 registry: CollectorRegistry, namespace: str = NAMESPACE) -> None:
        self.name = f"{namespace}_{name}"
        self.documentation = documentation
        self.bounds = sorted(float(b) for b in buckets)
        self.labels = dict(labels)
        self._counts = [0] * (len(self.bounds) + 1)  # the last one is +Inf
        self._sum = 0.0
        self._lock = threading.Lock()
        registry.register(self)

    def observe(self, value: float, count: int = 1) -> None:
        with self._lock:
            self._counts[bisect.bisect_left(self.bounds, value)] += count
            self._sum += value * count

    def collect(self) -> list[HistogramMetricFamily]:
        with self._lock:
            counts, total = list(self._counts), self._sum
        family = HistogramMetricFamily(self.name, self.documentation, labels=list(self.labels))
        cumulative = list(itertools.accumulate(counts))
        bounds = [*(floatToGoString(b) for b in self.bounds), "+Inf"]
        family.add_metric(list(self.labels.values()), list(zip(bounds, cumulative, strict=True)), total)
        return [family]

    def describe(self) -> list[HistogramMetricFamily]:
        return [HistogramMetricFamily(self.name, self.documentation, labels=list(self.labels))]


def new_registry() -> CollectorRegistry:
    """A registry of one's own (not prometheus_client's global one), with process and platform metrics."""
    registry = CollectorRegistry(auto_describe=True)
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    return registry


@dataclass(frozen=True, slots=True)
class ProbeResult:
    live: bool
    ready: bool
    reason: str
    progress_age_s: float | None  # None before the first progress


class Probe:
    """Liveness and readiness of one process, from when its loop last made progress.

    The loop calls ``progress`` after each successful round trip to Redis; the HTTP thread calls
    ``check``. Both read and write single attributes, which is safe across threads in CPython.
    """

    def __init__(self, *, ready_within_s: float, live_within_s: float,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        self.ready_within_s = ready_within_s
        self.live_within_s = live_within_s
        self._monotonic = monotonic
        self._last: float | None = None
        self._accepting = False
        self._step_started: float | None = None

    def step_started(self) -> None:
        """One long unit of work began (an engine step): until it ends, the loop is alive and ready
        for up to ``live_within_s``, however late its next round trip to Redis comes. A step slowed
        down by a starved CPU is not a dead process; one that runs past the limit is hung."""
        self._step_started = self._monotonic()

    def step_ended(self) -> None:
        self._step_started = None

    def progress(self, *, accepting: bool = True) -> None:
        """The loop reached Redis just now; ``accepting`` is False while the process drains."""
        self._last = self._monotonic()
        self._accepting = accepting

    def check(self, now: float | None = None) -> ProbeResult:
        now = self._monotonic() if now is None else now
        if self._last is None:
            return ProbeResult(live=True, ready=False, reason="starting", progress_age_s=None)
        age = max(0.0, now - self._last)
        started = self._step_started
        if started is not None and age > self.ready_within_s:
            running = max(0.0, now - started)
            if running > self.live_within_s:
                return ProbeResult(False, False, f"one step has run for {running:.1f}s (limit "
                                   f"{self.live_within_s:g}s)", age)
            if not self._accepting:
                return ProbeResult(True, False, "draining", age)
            return ProbeResult(True, True, f"busy: one step has run for {running:.1f}s", age)
        if age > self.live_within_s:
            return ProbeResult(False, False, f"no progress for {age:.1f}s (limit {self.live_within_s:g}s)", age)
        if age > self.ready_within_s:
            return ProbeResult(True, False, f"no progress for {age:.1f}s (Redis unreachable or loop stalled)", age)
        if not self._accepting:
            return ProbeResult(True, False, "draining", age)
        return ProbeResult(True, True, "ok", age)


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def do_GET(self) -> None:  # http.server's naming
        path = self.path.split("?", 1)[0]
        if path == "/metrics":
            self._send(200, CONTENT_TYPE_LATEST, generate_latest(self.server.registry))
        elif path in ("/livez", "/healthz", "/readyz"):
            result = self.server.probe.check()
            ok = result.ready if path == "/readyz" else result.live
            body = {"live": result.live, "ready": result.ready, "reason": result.reason,
                    "progress_age_s": None if result.progress_age_s is None else round(result.progress_age_s, 3)}
            self._send(200 if ok else 503, "application/json", json.dumps(body).encode())
        else:
            self._send(404, "text/plain; charset=utf-8", b"not found: try /metrics, /livez, /readyz\n")

    def _send(self, status: int, content_type: str, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass  # scrapes every few seconds would drown the process' own log


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], registry: CollectorRegistry, probe: Probe) -> None:
        self.registry = registry
        self.probe = probe
        super().__init__(address, _Handler)


class MetricsServer:
    """The endpoint, serving from a daemon thread until ``close``."""

    def __init__(self, registry: CollectorRegistry, probe: Probe, *, host: str, port: int) -> None:
        try:
            self._server = _Server((host, port), registry, probe)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise ConfigError(f"metrics port {port} on {host} is in use: pass another --metrics-port "
                                  f"(0 picks a free one)") from exc
            raise ConfigError(f"cannot serve metrics on {host}:{port}: {exc}") from exc
        self.host = host
        self.port: int = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, name="metrics", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def serve_metrics(registry: CollectorRegistry, probe: Probe, *, host: str, port: int | None) -> MetricsServer | None:
    """Start the endpoint when a port is configured (``None``: no endpoint); logs where it serves."""
    if port is None:
        return None
    server = MetricsServer(registry, probe, host=host, port=port)
    log.info("metrics on http://%s:%d/metrics (probes: /livez, /readyz)", host, server.port)
    return server
