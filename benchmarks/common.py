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
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def linear_shapes(cfg: Any) -> dict[str, tuple[int, int, int]]:
    """name -> (in, out, count per forward) of a model's linear layers (``ModelConfig`` ``cfg``; one
    rank, merged as the engine runs them)."""
    h, q, kv = cfg.hidden_size, cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    n = cfg.num_hidden_layers
    return {"qkv": (h, q + 2 * kv, n), "o": (q, h, n), "gate_up": (h, 2 * cfg.intermediate_size, n),
            "down": (cfg.intermediate_size, h, n), "lm_head": (h, cfg.vocab_size, 1)}


def linear_flops_per_token(cfg: Any) -> int:
    """FLOPs of one token through every linear layer (the LM head included)."""
    return sum(2 * k * n * count for k, n, count in linear_shapes(cfg).values())


MATMUL_LIBRARIES = ("mkl", "onednn", "onednn-packed", "panel")


class Matmuls:
    """The operands of an fp32 [m, k] x [k, n] product, allocated once: measuring it again and again
    (between an engine's steps) then allocates and frees nothing. Freeing 16 MB operands between
    steps moved glibc's malloc thresholds so that the engine's next step page-faulted ~2,000 times
    (+10 ms per decode step here): the yardstick must not disturb what it measures."""

    def __init__(self, m: int, k: int, n: int) -> None:
        import torch

        from gpu_workers.model import cpu_matmul

        self.flops = 2 * m * k * n
        self.x, self.w = torch.randn(m, k), torch.randn(n, k)  # w as a linear layer holds it: [out, in]
        self.w_t = self.w.t()
        from gpu_workers.model import panel_matmul

        self.packed = cpu_matmul.pack_weight(self.w) if cpu_matmul.onednn_available() else None
        self.panel_kernels = panel_matmul.load()
        self.panels = None if self.panel_kernels is None else self.panel_kernels.pack(self.w)
        self.libraries = tuple(lib for lib in MATMUL_LIBRARIES
                               if lib == "mkl" or (lib == "panel" and self.panels is not None)
                               or (lib.startswith("onednn") and self.packed is not None))

    def gflops(self, library: str, iters: int = 20) -> float:
        """GFLOP/s through ``library``: "mkl" (torch's matmul, MKL's sgemm on CPUs), "onednn"
        (oneDNN's linear on a dense weight), "onednn-packed" (on a weight packed in oneDNN's
        layout) or "panel" (our kernel on 16-feature panels: what the engine's large layers run,
        gpu_workers.model.panel_matmul)."""
        from gpu_workers.model import cpu_matmul

        if library == "mkl":
            def fn() -> object:
                return self.x @ self.w_t
        elif library == "panel":
            kernels, panels, n = self.panel_kernels, self.panels, self.w.shape[0]
            assert kernels is not None and panels is not None

            def fn() -> object:
                return kernels.matmul(self.x, panels, n)
        else:
            weight = self.packed if library == "onednn-packed" else self.w
            assert weight is not None

            def fn() -> object:
                return cpu_matmul.onednn_linear(self.x, weight)
        for _ in range(3):
            fn()
        start = time.perf_counter()
        for _ in range(iters):
            fn()
        return self.flops * iters / (time.perf_counter() - start) / 1e9

    def peak(self, iters: int = 20) -> float:
        """The fastest library's GFLOP/s."""
        return max(self.gflops(lib, iters) for lib in self.libraries)


def matmul_peak_gflops(size: int = 2048, iters: int = 20) -> float:
    """This machine's practical fp32 peak: the fastest library on a [size, size] square matmul (on
    the AMD CPUs measured here oneDNN is ~20% faster than MKL: benchmarks/matmul.py)."""
    return Matmuls(size, size, size).peak(iters)


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
