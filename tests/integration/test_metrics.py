"""Metrics, probes and JSON logs of a live balancer and echo worker group (real processes, real Redis)."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families

from broker.keys import Keys
from broker.registry import read_groups
from tests.integration.conftest import Procs, all_finished, final_events, wait_for, wait_groups

pytestmark = pytest.mark.integration

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]
RYZANSTEIN = [sys.executable, "-m", "ryzanstein"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as answer:
            return answer.status, answer.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    except OSError:
        return 0, ""  # not listening (yet)


def scrape(port: int) -> Samples:
    status, body = get(port, "/metrics")
    assert status == 200, body
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(body) for s in family.samples}


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def test_metrics_appear_and_move_when_requests_flow(
        procs: Procs, r: redis.Redis, keys: Keys, subprocess_env: dict[str, str]) -> None:
    balancer_port = free_port()
    local = ("--metrics-host", "127.0.0.1")
    procs.spawn("balancer", "--metrics-port", str(balancer_port), *local)
    procs.worker("m1", "--metrics-port", "0", *local, "--log-format", "json", "--log-level", "DEBUG")
    wait_groups(r, keys, {"m1"})
    (group,) = read_groups(r, keys, dead_after_s=3.0)
    assert group.metrics_port is not None and group.metrics_port > 0  # port 0: chosen, then published
    group_port = group.metrics_port
    wait_for(lambda: get(balancer_port, "/readyz")[0] == 200, what="balancer ready")
    assert get(group_port, "/readyz")[0] == 200 and get(group_port, "/livez")[0] == 200

    wait_for(lambda: value(scrape(balancer_port), "ryz_group_up", group="m1") == 1, what="balancer sees m1")
    assert value(scrape(group_port), "ryz_request_success_total", group="m1", model_name="echo", finished_reason="stop") == 0

    prompts = {f"m{i}": f"private words {i}" for i in range(20)}
    pipe = r.pipeline(transaction=False)
    for rid, prompt in prompts.items():
        pipe.xadd(keys.requests, {"id": rid, "prompt": prompt, "stream": "1"})
    pipe.xadd(keys.requests, {"id": "bad", "prompt": "x", "max_tokens": "0"})
    pipe.execute()
    wait_for(lambda: all_finished(r, keys, [*prompts, "bad"]), what="all requests finished")
    assert final_events(r, keys.result("bad"))[0][b"code"] == b"invalid_request"

    generated = sum(len(p) for p in prompts.values())  # echo: one token per prompt byte
    # the leader records a request when it produces the final event, before the client sees it
    after_g = scrape(group_port)
    assert value(after_g, "ryz_request_success_total", group="m1", model_name="echo", finished_reason="stop") == 20
    assert value(after_g, "ryz_e2e_request_latency_seconds_count", group="m1", model_name="echo") == 20
    assert value(after_g, "ryz_time_to_first_token_seconds_count", group="m1", model_name="echo") == 20
    assert value(after_g, "ryz_request_queue_time_seconds_count", group="m1", model_name="echo") == 20
    assert value(after_g, "ryz_inter_token_latency_seconds_count", group="m1", model_name="echo") == generated - 20
    assert value(after_g, "ryz_generation_tokens_total", group="m1", model_name="echo") == generated
    assert 0 < value(after_g, "ryz_e2e_request_latency_seconds_sum", group="m1", model_name="echo") < 20 * 30
    assert value(after_g, "process_resident_memory_bytes") > 0

    after_b = scrape(balancer_port)
    assert value(after_b, "ryz_balancer_requests_total", outcome="dispatched") == 20
    assert value(after_b, "ryz_balancer_rejections_total", reason="invalid_request") == 1
    assert value(after_b, "ryz_balancer_batch_size_sum") == 21
    assert value(after_b, "ryz_group_up", group="m1") == 1

    def ryz(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*RYZANSTEIN, *args], env=subprocess_env, capture_output=True, text=True,
                              timeout=60, check=False)

    assert ryz("health", "--metrics-port", str(group_port), "--ready").returncode == 0
    assert ryz("health", "--group", "m1", "--ready").returncode == 0
    assert ryz("health").returncode == 0
    assert ryz("health", "--group", "nobody").returncode == 1
    assert ryz("health", "--metrics-port", str(free_port())).returncode == 1
    listed = json.loads(ryz("status", "--json").stdout)
    assert [(g["name"], g["metrics_port"]) for g in listed["groups"]] == [("m1", group_port)]

    # the worker's JSON log: every log line an object, request lines carry their id, no prompt text
    procs.stop_all()
    worker_log = next(p for p in Path(procs.log_dir).iterdir() if p.name.endswith("gpu_workers.log"))
    records = [json.loads(line) for line in worker_log.read_text().splitlines() if line.startswith("{")]
    others = [line for line in worker_log.read_text().splitlines() if not line.startswith("{")]
    assert others == [f"worker group m1 serving echo on {subprocess_env['RYZ_REDIS_URL']}"]  # stdout banner
    about_m3 = [rec for rec in records if rec.get("request_id") == "m3"]
    assert [rec["msg"].split(":")[0] for rec in about_m3] == ["request admitted", "request finished"]
    assert all(rec["group"] == "m1" for rec in about_m3)
    assert not any("private words" in json.dumps(rec) for rec in records)
