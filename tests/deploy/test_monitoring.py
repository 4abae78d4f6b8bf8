"""The shipped Grafana dashboard and Prometheus alert rules use only metrics and labels that exist:
every ``ryz_`` name in their queries is served by a balancer or a group leader, and every label
they group or filter by is one of that metric's labels."""

from __future__ import annotations

import json
import re

import pytest
import yaml
from prometheus_client.metrics import MetricWrapperBase

from balancer.telemetry import BalancerTelemetry
from broker.metrics import BatchHistogram
from gpu_workers.telemetry import GroupTelemetry
from tests.deploy.commands import DEPLOY

SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}


def served() -> dict[str, set[str]]:
    """Every scrapable ryz_ series name -> the labels it carries (histograms' ``le`` included)."""
    names: dict[str, set[str]] = {}
    for telemetry in (BalancerTelemetry(enabled=True, ready_within_s=3, live_within_s=60),
                      GroupTelemetry("g", enabled=True, now_ms=lambda: 0.0, ready_within_s=3, live_within_s=60,
                                     model_name="m")):
        for metric in vars(telemetry).values():
            if isinstance(metric, MetricWrapperBase):
                base, kind, labels = metric._name, metric._type, set(metric._labelnames)
            elif isinstance(metric, BatchHistogram):
                base, kind, labels = metric.name, "histogram", set(metric.labels)
            else:
                continue
            for suffix in SUFFIXES[kind]:
                names[base + suffix] = labels | ({"le"} if suffix == "_bucket" else set())
    return names


def queries() -> list[tuple[str, str]]:
    """(where, PromQL) of every query in the dashboard and the alert rules."""
    dashboard = json.loads((DEPLOY / "monitoring" / "grafana-dashboard.json").read_text())
    found = [(f"dashboard: {p['title']}", t["expr"]) for p in dashboard["panels"] for t in p["targets"]]
    found += [("dashboard: variable", v["query"]["query"]) for v in dashboard["templating"]["list"]
              if isinstance(v.get("query"), dict)]
    rules = yaml.safe_load((DEPLOY / "monitoring" / "alerts.yml").read_text())
    found += [(f"alert: {r['alert']}", r["expr"]) for g in rules["groups"] for r in g["rules"]]
    return found


SERVED = served()


def test_the_group_metrics_carry_model_name_and_group() -> None:
    assert {"model_name", "group"} <= SERVED["ryz_num_requests_running"]
    for name in ("ryz_num_preemptions_total", "ryz_prefix_cache_hits_total", "ryz_prefix_cache_queries_total",
                 "ryz_request_prefill_time_seconds_bucket", "ryz_request_decode_time_seconds_bucket",
                 "ryz_request_inference_time_seconds_bucket"):
        assert name in SERVED


@pytest.mark.parametrize(("where", "expr"), queries(), ids=lambda v: v if isinstance(v, str) and ":" in v else "")
def test_each_query_uses_served_metrics_and_their_labels(where: str, expr: str) -> None:
    metrics = re.findall(r"\bryz_\w+", expr)
    assert metrics, f"{where}: no ryz_ metric in {expr!r}"
    missing = [m for m in metrics if m not in SERVED]
    assert not missing, f"{where}: not served: {missing}"
    available = set().union(*(SERVED[m] for m in metrics))
    grouped = {label.strip() for clause in re.findall(r"\bby \(([^)]*)\)", expr) for label in clause.split(",")}
    matched = set(re.findall(r"(\w+)\s*(?:=~|!~|!=|=)\s*\"", expr))
    used = (grouped | matched) - {""}
    assert used <= available, f"{where}: labels {sorted(used - available)} are on none of {metrics}"
    if "label_values(" in expr:
        assert re.search(r"label_values\(\w+, (\w+)\)", expr)[1] in available  # type: ignore[index]


def test_the_alerts_and_dashboard_were_found() -> None:
    kinds = {where.split(":")[0] for where, _ in queries()}
    assert kinds == {"dashboard", "alert"} and len(queries()) > 20


@pytest.mark.parametrize("bad", ["sum by (model) (ryz_num_requests_running)", "rate(ryz_num_preemptions[5m])",
                                 'ryz_balancer_rejections_total{model_name="m"}'])
def test_the_check_catches_a_wrong_name_or_label(bad: str) -> None:
    with pytest.raises(AssertionError):
        test_each_query_uses_served_metrics_and_their_labels("probe", bad)
