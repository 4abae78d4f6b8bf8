"""fp32 matmul libraries on this CPU, at the shapes of a model's linear layers.

    python benchmarks/matmul.py                      random:small's layers, 1-256 rows (~1 minute)
    python benchmarks/matmul.py --rows 64 --model random:tiny

For each layer shape [rows, in] x [in, out] it times torch's matmul (MKL's sgemm on CPUs), oneDNN's
linear on the dense weight, oneDNN's linear on the weight packed in its own layout, and our panel
kernel (what the engine runs, ``gpu_workers.model.panel_matmul``), and prints GFLOP/s next to each library's speed on a
2048x2048 square. The libraries are timed in turns, shape by shape, so that a VM's minute-to-minute
swings meet all of them alike. Writes JSON under benchmarks/results/.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch

from benchmarks.common import Matmuls, linear_shapes, log, write_results
from gpu_workers.model import cpu_matmul
from gpu_workers.model.config import load_config
from gpu_workers.model.loader import resolve_model


def gflops_by_library(rows: int, k: int, n: int, iters: int, rounds: int = 3) -> dict[str, float]:
    """Each library's best of ``rounds``, the libraries taking turns."""
    operands = Matmuls(rows, k, n)
    best = dict.fromkeys(operands.libraries, 0.0)
    for _ in range(rounds):
        for lib in operands.libraries:
            best[lib] = max(best[lib], operands.gflops(lib, iters))
    return best


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="random:small", help="random:<preset> or a model directory")
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 8, 64, 256], help="rows (tokens in a step)")
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default: benchmarks/results/...)")
    args = parser.parse_args(argv)
    if not cpu_matmul.onednn_available():
        print("this torch has no oneDNN linear: nothing to compare", file=sys.stderr)
        return 1

    libraries = Matmuls(1, 16, 16).libraries  # those this machine has
    log("2048x2048 squares ...")
    square = gflops_by_library(2048, 2048, 2048, iters=5)
    shapes = linear_shapes(load_config(resolve_model(args.model)))
    rows_out = []
    for rows in args.rows:
        for name, (k, n, count) in shapes.items():
            log(f"{rows} rows, {name} [{k} -> {n}] ...")
            speeds = gflops_by_library(rows, k, n, args.iters)
            rows_out.append({"rows": rows, "layer": name, "in": k, "out": n, "per_forward": count,
                             **{lib: round(v, 1) for lib, v in speeds.items()}})

    print(f"\n{args.model}: fp32 GFLOP/s, {torch.get_num_threads()} threads")
    print(f"{'rows':>5} {'layer':>8} {'shape':>12} " + " ".join(f"{lib:>14}" for lib in libraries))
    print(f"{'':>5} {'square':>8} {'2048x2048':>12} "
          + " ".join(f"{square[lib]:>14.0f}" for lib in libraries))
    for r in rows_out:
        print(f"{r['rows']:>5} {r['layer']:>8} {str(r['in']) + 'x' + str(r['out']):>12} "
              + " ".join(f"{r[lib]:>14.0f}" for lib in libraries))
    # a forward's matmul time by library, per row count: what the layer mix costs as the engine runs it
    print("\nper forward (all layers), ms:")
    totals = {}
    for rows in args.rows:
        mix = [r for r in rows_out if r["rows"] == rows]
        totals[rows] = {
            lib: round(sum(2 * rows * r["in"] * r["out"] * r["per_forward"] / (r[lib] * 1e9) for r in mix) * 1e3, 2)
            for lib in libraries}
        print(f"{rows:>5} rows: " + ", ".join(f"{lib} {ms}" for lib, ms in totals[rows].items()))
    write_results({"benchmark": "matmul", "model": args.model, "threads": torch.get_num_threads(),
                   "torch": torch.__version__, "square_2048": {k: round(v, 1) for k, v in square.items()},
                   "layers": rows_out, "forward_ms": totals}, "matmul", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
