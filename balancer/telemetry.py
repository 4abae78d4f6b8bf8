"""What a balancer tells operators: Prometheus metrics, probe progress, request log lines.

The balancer loop calls the small recording methods below at the points where it decides something
(a batch read, a request dispatched or finished by the balancer itself, a group failed over, the
registry read). With ``enabled=False`` (no ``--metrics-port``) the metrics are not recorded; the
DEBUG log lines about requests are written either way when DEBUG is on.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping

from prometheus_client import Counter, Gauge, Histogram

from broker.logs import request_extra
from broker.metrics import BATCH_BUCKETS, NAMESPACE, Probe, new_registry
from broker.registry import GroupStatus

log = logging.getLogger("balancer")

# Outcomes that mean the request was not accepted for generation.
REJECTIONS = frozenset({"invalid_request", "overloaded", "unavailable"})


class BalancerTelemetry:
    def __init__(self, *, enabled: bool, ready_within_s: float, live_within_s: float,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        self.enabled = enabled
        self.registry = new_registry()
        self.probe = Probe(ready_within_s=ready_within_s, live_within_s=live_within_s, monotonic=monotonic)
        ns, reg = NAMESPACE, self.registry
        self.requests = Counter(
            "balancer_requests", "Requests a balancer finished handling, by outcome: dispatched to a group, "
            "or ended by the balancer itself (invalid_request, cancelled, timeout, unavailable, overloaded).",
            ["outcome"], namespace=ns, registry=reg)
        self.rejections = Counter(
            "balancer_rejections", "Requests not accepted for generation, by reason.",
            ["reason"], namespace=ns, registry=reg)
        self.migrations = Counter(
            "balancer_migrations", "Requests dispatched taking over from another owner (a failed-over, "
            "draining or closed group).", namespace=ns, registry=reg)
        self.failovers = Counter(
            "balancer_failovers", "Dead groups whose queues this balancer moved back to the ingress stream.",
            namespace=ns, registry=reg)
        self.failover_requests = Counter(
            "balancer_failover_requests", "Requests moved back to the ingress stream by failovers.",
            namespace=ns, registry=reg)
        self.dead_letters = Counter(
            "dead_letters", "Entries given up after bounded attempts: moved to the {p}:dead stream.",
            namespace=ns, registry=reg)
        self.batch_size = Histogram(
            "balancer_batch_size", "Ingress entries per read (up to balancer_batch_max).",
            namespace=ns, registry=reg, buckets=BATCH_BUCKETS)
        self.waiting = Gauge(
            "balancer_waiting_requests", "Validated requests waiting in this balancer for a routable group.",
            namespace=ns, registry=reg)
        self.group_up = Gauge(
            "group_up", "1 while a registered group heartbeats (younger than dead_after_s), else 0.",
            ["group"], namespace=ns, registry=reg)
        self.group_draining = Gauge(
            "group_draining", "1 while a group drains (takes no new work).", ["group"], namespace=ns, registry=reg)
        self.group_heartbeat_age = Gauge(
            "group_heartbeat_age_seconds", "Age of a group's last heartbeat, on the Redis clock.",
            ["group"], namespace=ns, registry=reg)
        self._groups: set[str] = set()

    def read(self, entries: int) -> None:
        """An ingress read returned ``entries`` (> 0) entries."""
        if self.enabled:
            self.batch_size.observe(entries)

    def dispatched(self, request_id: str, group: str, *, epoch: int, taken_from: str | None) -> None:
        if self.enabled:
            self.requests.labels("dispatched").inc()
            if taken_from is not None:
                self.migrations.inc()
        if log.isEnabledFor(logging.DEBUG):
            log.debug("request dispatched to %s (epoch %d%s)", group, epoch,
                      f", taken over from {taken_from}" if taken_from else "",
                      extra=request_extra(request_id, group=group))

    def finished(self, request_id: str, event: Mapping[str, str]) -> None:
        """The balancer itself decided the final event of a request (never reached a group)."""
        outcome = event["code"] if event["event"] == "error" else event.get("finish_reason", "done")
        if self.enabled:
            self.requests.labels(outcome).inc()
            if outcome in REJECTIONS:
                self.rejections.labels(outcome).inc()
        if log.isEnabledFor(logging.DEBUG):
            log.debug("request ended by the balancer: %s%s", outcome,
                      f": {event['message']}" if "message" in event else "",
                      extra=request_extra(request_id, outcome=outcome))

    def dead_lettered(self) -> None:
        """An entry went to the dead-letter stream (broker.dead_letter)."""
        if self.enabled:
            self.dead_letters.inc()

    def failed_over(self, group: str, moved: int) -> None:
        if self.enabled:
            self.failovers.inc()
            self.failover_requests.inc(moved)

    def groups(self, groups: Iterable[GroupStatus], *, waiting: int) -> None:
        """The registry was read just now: per-group health gauges, and progress for the probes."""
        self.probe.progress()
        if not self.enabled:
            return
        self.waiting.set(waiting)
        seen = set()
        for g in groups:
            seen.add(g.name)
            self.group_up.labels(g.name).set(1 if g.alive else 0)
            self.group_draining.labels(g.name).set(1 if g.state == "draining" else 0)
            self.group_heartbeat_age.labels(g.name).set(round(g.heartbeat_age_s, 3))
        for name in self._groups - seen:  # forgotten (removed from the registry)
            for gauge in (self.group_up, self.group_draining, self.group_heartbeat_age):
                gauge.remove(name)
        self._groups = seen
