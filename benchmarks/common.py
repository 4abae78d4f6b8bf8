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


MATMUL_LIBRARIES = ("mkl", "onednn", "onednn-packed")


def matmul_gflops(library: str, m: int, k: int, n: int, iters: int = 20) -> float:
    """GFLOP/s of an fp32 [m, k] x [k, n] product through ``library``: "mkl" (torch's matmul, MKL's
    sgemm on CPUs), "onednn" (oneDNN's linear on a dense weight) or "onednn-packed" (on a weight
    packed in oneDNN's layout: what the engine's large layers run)."""
    import torch

    from gpu_workers.model import layers

    x, w = torch.randn(m, k), torch.randn(n, k)  # w as a linear layer holds it: [out, in]
    w_t = w.t()
    packed = layers.pack_weight(w) if library == "onednn-packed" else w
    fn = (lambda: x @ w_t) if library == "mkl" else (lambda: layers.onednn_linear(x, packed))
    for _ in range(3):
        fn()
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    return 2 * m * k * n * iters / (time.perf_counter() - start) / 1e9


def matmul_peak_gflops(size: int = 2048, iters: int = 20) -> float:
    """This machine's practical fp32 peak: the fastest library on a [size, size] square matmul (on
    the AMD CPUs measured here oneDNN is ~20% faster than MKL: benchmarks/matmul.py)."""
    from gpu_workers.model.layers import onednn_available

    libraries = MATMUL_LIBRARIES if onednn_available() else MATMUL_LIBRARIES[:1]
    return max(matmul_gflops(lib, size, size, size, iters) for lib in libraries)


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
