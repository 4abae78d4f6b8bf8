"""What every benchmark here shares: progress lines, percentiles, the matmul yardstick, and how a
run's targets are printed and its results written under benchmarks/results/."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


def matmul_peak_gflops(size: int = 2048, iters: int = 20) -> float:
    """GFLOP/s of an fp32 [size, size] @ [size, size] matmul: this machine's practical peak."""
    import torch

    a, b = torch.randn(size, size), torch.randn(size, size)
    for _ in range(3):
        a @ b
    start = time.perf_counter()
    for _ in range(iters):
        a @ b
    return 2 * size**3 * iters / (time.perf_counter() - start) / 1e9


def print_targets(targets: dict[str, bool]) -> None:
    print("\nTargets:")
    for name, ok in targets.items():
        print(f"  [{'met' if ok else 'MISSED'}] {name}")


def write_results(results: dict[str, Any], name: str, out: Path | None = None) -> Path:
    """Write ``results`` as JSON to ``out`` (default benchmarks/results/<name>-<timestamp>.json)."""
    out = out or RESULTS / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(f"\nwrote {out.relative_to(ROOT) if out.is_relative_to(ROOT) else out}")
    return out
