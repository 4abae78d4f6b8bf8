"""The staged fp8 KV cache's speed against the fp32 cache's, decode and prefill, interleaved in one process.

    python benchmarks/kv_staged_speed.py --model SmolLM2-135M-Instruct.Q4_1.gguf --batch 1,8,64

Three model runners on the same weights: ``fp32`` KV, ``fp8_e4m3`` (the staged cache, read and written
by the C kernels of gpu_workers/model/kv_staged_kernels.c) and ``fp8_e4m3 torch`` (the same cache with the
kernels off: its torch path, what the cache ran before the kernels). Each round times a few decode
steps of each in turn, so that all three see the same load on a shared machine; the figures are
medians over all rounds' steps, with the fp8 ones as a ratio of fp32's speed. Contexts are random
values (what a step costs does not depend on them), ``--context`` tokens long. Prefill: each round
prefills ``--prefill-seqs`` prompts of ``--context`` MAX tokens in chunks of ``--prefill-chunk`` (chunks
after the first read their context from the cache: ``gather``), each config in turn.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from gpu_workers.model.kv_staged import StagedKVCache
from gpu_workers.model.loader import resolve_model
from gpu_workers.model_runner import Chunk, ModelRunner

CONFIGS = ("fp32", "fp8_e4m3", "fp8_e4m3 torch")


class Bench:
    """One runner with ``seqs`` sequences' blocks (each room for ``tokens`` tokens), filled with random values."""

    def __init__(self, model: Path, config: str, *, seqs: int, tokens: int, block_size: int, seed: int) -> None:
        kv_dtype = config.split()[0]
        per_seq = -(-tokens // block_size)
        n = per_seq * seqs
        self.runner = ModelRunner(model, num_blocks=n, block_size=block_size, kv_dtype=kv_dtype)
        blocks = list(range(n))
        random.Random(seed).shuffle(blocks)
        self.tables = [blocks[i * per_seq : (i + 1) * per_seq] for i in range(seqs)]
        self.staging: list[tuple[int, ...]] = [()] * seqs
        cache = self.runner.kv_cache
        if self.runner.kv_format.staged:  # the sink and a staging block per sequence in bf16 (ids from n)
            self.runner.allocate_kv_cache(n, 2 * seqs)
            cache = self.runner.kv_cache
            assert isinstance(cache, StagedKVCache)
            self.tables = [[n + j, *t[1:]] for j, t in enumerate(self.tables)]
            self.staging = [(n + seqs + j,) for j in range(seqs)]
            cache.values.copy_(torch.randint(0, 120, cache.values.shape, dtype=torch.uint8))
            cache.dense.normal_()
            if config.endswith("torch"):
                cache.staged_kernels = None  # the torch path: reads and writes as before the kernels
        else:
            for layer in range(cache.num_layers):
                k = torch.randn(cache.num_blocks * cache.block_size, cache.num_kv_heads, cache.head_dim)
                cache.write(layer, torch.arange(k.shape[0]), k, k)
        self.vocab = self.runner.config.vocab_size
        self.rng = random.Random(seed)

    def decode(self, positions: list[int]) -> float:
        """Seconds of one decode step of sequences 0 .. len(positions) - 1 at ``positions`` (advanced)."""
        chunks = [Chunk([self.rng.randrange(self.vocab)], p, self.tables[j], True, staging=self.staging[j])
                  for j, p in enumerate(positions)]
        t = time.perf_counter()
        self.runner.run(chunks)
        took = time.perf_counter() - t
        positions[:] = [p + 1 for p in positions]
        return took

    def prefill(self, seqs: int, tokens: int, chunk: int) -> float:
        """Seconds to prefill ``seqs`` random prompts of ``tokens`` tokens together, ``chunk`` tokens a step."""
        prompts = [[self.rng.randrange(self.vocab) for _ in range(tokens)] for _ in range(seqs)]
        t = time.perf_counter()
        for start in range(0, tokens, chunk):
            self.runner.run([Chunk(p[start : start + chunk], start, self.tables[j], start + chunk >= tokens,
                                   staging=self.staging[j]) for j, p in enumerate(prompts)])
        return time.perf_counter() - t


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="random:small")
    parser.add_argument("--batch", default="1,8,64", help="decode batch sizes, comma-separated")
    parser.add_argument("--context", type=int, default=128, help="context tokens of each decode sequence")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3, help="decode steps per config per round")
    parser.add_argument("--prefill-rounds", type=int, default=4)
    parser.add_argument("--prefill-seqs", type=int, default=8)
    parser.add_argument("--prefill-chunk", type=int, default=32)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--configs", default=",".join(CONFIGS))
    parser.add_argument("--threads", type=int, default=None,
                        help="torch (and kernel) threads; 1 keeps figures steady on a host that others load")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    batches = [int(b) for b in args.batch.split(",")]
    configs = args.configs.split(",")
    model = resolve_model(args.model)
    room = args.context + args.rounds * args.steps + 2 * args.block_size
    benches = {c: Bench(model, c, seqs=max(batches + [args.prefill_seqs]), tokens=room, block_size=args.block_size,
                        seed=0) for c in configs}
    results: dict[str, object] = {"model": args.model, "threads": torch.get_num_threads(), "context": args.context,
                                  "load_before": os.getloadavg()[0], "decode": {}, "prefill": {}}
    for batch in batches:
        times: dict[str, list[float]] = {c: [] for c in configs}
        positions = {c: [args.context] * batch for c in configs}
        for bench in benches.values():  # warm-up
            bench.decode([args.context - 2] * batch)
        for _ in range(args.rounds):
            for c, bench in benches.items():
                times[c] += [bench.decode(positions[c]) for _ in range(args.steps)]
        report(results["decode"], f"batch {batch}", times, per=batch, unit="decode", load=os.getloadavg()[0])
    times = {c: [] for c in configs}
    for _ in range(args.prefill_rounds):
        for c, bench in benches.items():
            times[c].append(bench.prefill(args.prefill_seqs, args.context, args.prefill_chunk))
    report(results["prefill"], f"{args.prefill_seqs} x {args.context} tokens, chunks of {args.prefill_chunk}", times,
           per=args.prefill_seqs * args.context, unit="prefill", load=os.getloadavg()[0])
    if args.out:
        args.out.write_text(json.dumps(results, indent=2) + "\n")
    return 0


def report(into: object, label: str, times: dict[str, list[float]], *, per: int, unit: str, load: float) -> None:
    """Print and record each config's median seconds and tok/s, and each one's speed relative to the first's."""
    assert isinstance(into, dict)
    medians = {c: statistics.median(t) for c, t in times.items()}
    first = next(iter(medians.values()))
    row = {c: {"median_ms": m * 1e3, "best_ms": min(times[c]) * 1e3, "tok_s": per / m, "vs_first": first / m}
           for c, m in medians.items()}
    into[label] = {**row, "load_1min": load}
    print(f"{unit} {label} (load {load:.2f}): " + "; ".join(
        f"{c} {r['median_ms']:.1f} ms ({r['tok_s']:.0f} tok/s, {r['vs_first']:.2f}x)" for c, r in row.items()), flush=True)


if __name__ == "__main__":
    sys.exit(main())
