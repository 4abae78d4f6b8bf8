"""Decode-step benchmark of the model runner alone (no engine, no Redis).

    python benchmarks/model_decode.py                       random:small, batch 64, contexts 300-700
    python benchmarks/model_decode.py --kv-dtype fp8_e4m3 --context 300 300

Builds a ModelRunner, fills the KV cache of ``--batch`` sequences with random contexts (or really
prefills them with ``--prefill``), then times decode steps. Prints ms per step and the share of
this machine's fp32 matmul peak that the linear layers reach (linear FLOPs / step time / peak),
the peak being measured in the same process, before and after, on a large square matmul.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch

from benchmarks.common import linear_flops_per_token, matmul_peak_gflops
from gpu_workers.model.kv_staged import StagedKVCache
from gpu_workers.model.loader import resolve_model
from gpu_workers.model_runner import Chunk, ModelRunner


def prefill(runner: ModelRunner, tables: list[list[int]], staging: list[tuple[int, ...]], lengths: list[int], *,
            chunk: int | None, rng: random.Random, label: str) -> None:
    """Prefill each sequence's random prompt of ``lengths`` tokens, 8 sequences a step, in chunks of
    ``chunk`` tokens (None: whole); with ``chunk``, print the time taken and the prefill tok/s."""
    vocab = runner.config.vocab_size
    prompts = [[rng.randrange(vocab) for _ in range(n)] for n in lengths]
    step = chunk or max(lengths)
    t = time.perf_counter()
    for i in range(0, len(prompts), 8):
        group = range(i, min(len(prompts), i + 8))
        for start in range(0, max(lengths[j] for j in group), step):
            runner.run([Chunk(prompts[j][start : start + step], start, tables[j], start + step >= lengths[j],
                              staging=staging[j]) for j in group if start < lengths[j]])
    took = time.perf_counter() - t
    if chunk:
        print(f"{label}: prefill of {sum(lengths)} tokens in chunks of {chunk}: {took * 1e3:.0f} ms = "
              f"{sum(lengths) / took:.0f} tok/s")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="random:small")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--context", type=int, nargs=2, default=(300, 700), metavar=("MIN", "MAX"))
    parser.add_argument("--kv-dtype", default="fp32")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--group-tokens", type=int, default=None, help="decode attention group budget (tokens)")
    parser.add_argument("--prefill", action="store_true", help="really prefill the contexts (slow)")
    parser.add_argument("--prefill-chunk", type=int, default=None, metavar="N",
                        help="prefill in chunks of N tokens (chunks after the first read their context from the "
                             "cache), timed and reported as prefill tok/s (implies --prefill)")
    parser.add_argument("--profile", action="store_true", help="print a torch profile of a few steps")
    args = parser.parse_args(argv)

    rng = random.Random(0)
    bs, batch = args.block_size, args.batch
    lengths = [rng.randint(*args.context) for _ in range(batch)]
    per_seq = [-(-(n + args.steps + 8) // bs) for n in lengths]
    runner = ModelRunner(resolve_model(args.model), num_blocks=sum(per_seq), block_size=bs,
                         kv_dtype=args.kv_dtype, decode_group_tokens=args.group_tokens)
    blocks = list(range(sum(per_seq)))
    rng.shuffle(blocks)
    tables = [blocks[sum(per_seq[:i]) : sum(per_seq[: i + 1])] for i in range(batch)]
    staging: list[tuple[int, ...]] = [()] * batch
    if runner.kv_format.staged:  # block 0 (the sink) and a staging block per sequence in bf16 (ids from num_blocks)
        runner.allocate_kv_cache(sum(per_seq), 2 * batch)
        tables = [[sum(per_seq) + j, *t[1:]] for j, t in enumerate(tables)]
        staging = [(sum(per_seq) + batch + j,) for j in range(batch)]
    vocab = runner.config.vocab_size
    if args.prefill or args.prefill_chunk:
        prefill(runner, tables, staging, lengths, chunk=args.prefill_chunk, rng=rng, label=f"{args.model} {args.kv_dtype} KV")
    elif runner.kv_format.staged:  # codes like a model's: what a decode step costs does not depend on them
        staged = runner.kv_cache
        assert isinstance(staged, StagedKVCache)
        staged.values.copy_(torch.randint(0, 120, staged.values.shape, dtype=torch.uint8))
        staged.dense.normal_()
    else:  # values like a model's: what a decode step costs does not depend on them
        cache = runner.kv_cache
        for layer in range(cache.num_layers):
            k = torch.randn(cache.num_blocks * cache.block_size, cache.num_kv_heads, cache.head_dim)
            slots = torch.arange(k.shape[0])
            cache.write(layer, slots, k, k)

    positions = list(lengths)

    def step() -> float:
        chunks = [Chunk([rng.randrange(vocab)], positions[j], tables[j], True, staging=staging[j]) for j in range(batch)]
        t = time.perf_counter()
        runner.run(chunks)
        for j in range(batch):
            positions[j] += 1
        return time.perf_counter() - t

    peak_before = matmul_peak_gflops()
    step(), step()
    times = [step() for _ in range(args.steps)]
    peak = max(peak_before, matmul_peak_gflops())
    flops = linear_flops_per_token(runner.config) * batch
    median, best = statistics.median(times), min(times)
    print(f"{args.model} {args.kv_dtype} KV, batch {batch}, contexts {args.context[0]}-{args.context[1]}: "
          f"median {median * 1e3:.1f} ms/step (best {best * 1e3:.1f}); linear layers {flops / 1e9:.2f} GFLOP/step "
          f"= {flops / median / 1e9:.0f} GFLOP/s = {flops / median / 1e9 / peak:.0%} of the {peak:.0f} GFLOP/s "
          f"matmul peak (best step {flops / best / 1e9 / peak:.0%})")
    if args.profile:
        from torch.profiler import profile

        with profile() as prof:
            for _ in range(3):
                step()
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))
    return 0


if __name__ == "__main__":
    sys.exit(main())
