"""docs/OPERATIONS.md against the code: the metrics reference lists exactly the metrics served, and the
KV sizing table follows its own formula."""

from __future__ import annotations

import re

import pytest
from prometheus_client import CollectorRegistry

from balancer.telemetry import BalancerTelemetry
from gpu_workers.telemetry import GroupTelemetry
from tests.deploy.commands import REPO

OPERATIONS = (REPO / "docs" / "OPERATIONS.md").read_text()


def served(registry: CollectorRegistry) -> dict[str, str]:
    """Metric name as scraped (counters with ``_total``) -> type, for the ryz_ families."""
    return {m.name + ("_total" if m.type == "counter" else ""): m.type
            for m in registry.collect() if m.name.startswith("ryz_")}


def test_metrics_reference_lists_exactly_the_served_metrics() -> None:
    metrics = {
        **served(BalancerTelemetry(enabled=True, ready_within_s=3, live_within_s=60).registry),
        **served(GroupTelemetry("g", enabled=True, now_ms=lambda: 0.0, ready_within_s=3, live_within_s=60).registry),
    }
    rows = dict(re.findall(r"^\| `(ryz_\w+)` \| (\w+) \|", OPERATIONS, flags=re.MULTILINE))
    assert rows == metrics
    mentioned = {re.sub(r"_(bucket|sum|count)$", "", n) for n in re.findall(r"\bryz_\w+", OPERATIONS)
                 if not n.endswith("_")}  # not `ryz_group_*`
    assert mentioned <= set(metrics), f"OPERATIONS.md names metrics that do not exist: {mentioned - set(metrics)}"


KIB = 1024
ROW = re.compile(r"^\| ([^|]+) \| (\d+) \| (\d+) x (\d+) \| ([\d.]+) KiB \| ([\d.]+) KiB \| ([\d.]+) KiB \| ~([\d,]+) "
                 r"\| ([\d.]+) KiB \| ~([\d,]+) \|$", re.MULTILINE)


@pytest.mark.parametrize("row", ROW.findall(OPERATIONS), ids=lambda row: row[0])
def test_kv_sizing_table_follows_the_formula(row: tuple[str, ...]) -> None:
    _model, layers, heads, head_dim = row[0], int(row[1]), int(row[2]), int(row[3])
    fp32, bf16, staged, staged_tokens = float(row[4]), float(row[5]), float(row[6]), int(row[7].replace(",", ""))
    block, block_tokens = float(row[8]), int(row[9].replace(",", ""))

    def per_token(dtype_bytes: int) -> int:
        return layers * 2 * heads * head_dim * dtype_bytes

    assert fp32 == per_token(4) / KIB and bf16 == per_token(2) / KIB
    # fp8_e4m3 (staged, gpu_workers/model/kv_staged.py), per 16-token block and KV head: K's 16 x D
    # codes, D centre codes, a 4-byte centre scale and D bf16 channel scales; V's 16 x D codes and
    # 16 bf16 token scales
    staged_bytes = layers * heads * (16 * head_dim + head_dim + 4 + 2 * head_dim + 16 * head_dim + 32) / 16
    assert staged == pytest.approx(staged_bytes / KIB, abs=0.05)  # rounded in the table
    assert staged_tokens == pytest.approx(20 * KIB**3 / staged_bytes, rel=0.005)
    # fp8_e4m3_block: one fp32 scale per 16-token block per KV head, K and V
    block_bytes = per_token(1) + layers * 2 * heads * 4 / 16
    assert block == pytest.approx(block_bytes / KIB, abs=0.05)
    assert block_tokens == pytest.approx(20 * KIB**3 / block_bytes, rel=0.005)


def test_the_kv_table_was_found() -> None:
    assert len(ROW.findall(OPERATIONS)) >= 3
