"""Serving benchmark: the Llama engine through Redis, next to transformers on the same weights.

    python benchmarks/serving.py                 (or: make bench-serving)
    python benchmarks/serving.py --requests 32   (a quicker look)
    python benchmarks/serving.py --model path/to/model.gguf --requests 8   (a real model)

One run on one machine measures:

- this machine's fp32 matmul peak (a large square matmul), the yardstick for the decode phase;
- ryzanstein: the whole stack (embedded Redis, a balancer, one worker group of ``--model``) serving
  ``--requests`` greedy requests, prompt lengths uniform in 16-512 and output lengths uniform in
  16-256 (seeded; random token ids), all submitted at once with streaming, each run to its output
  length (``ignore_eos``, as transformers' runs below: a trained model would end some early);
  output tok/s, TTFT and TPOT p50/p99;
- the engine alone decoding a batch of 64 (no Redis): ms per step and the share of the matmul peak
  its linear layers reach;
- transformers on the same weights and requests (a GGUF file through transformers' own GGUF
  loader, dequantized to fp32 as the engine does): ``generate`` in static batches of 32 in arrival
  order (the naive server: a batch runs until its longest request ends) and transformers' own
  continuous batching (``ContinuousBatchingManager``), timed per token, stopped after
  ``--hf-cb-limit-s`` (it is very slow on CPUs: the speedup over it is then a lower bound).

The decode share of the matmul peak compares the engine's steps with peak measurements taken
between them, so that both meet the same machine state.

Prints a table and writes JSON to benchmarks/results/serving-<timestamp>.json.

With ``--llama-cpp DIR`` it runs instead the side-by-side comparison with llama.cpp's llama-server on
the same GGUF weights (``--concurrency``, ``--prompt-tokens``, ``--max-tokens``): benchmarks/llama_cpp.py.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import queue
import random
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# Before torch: the engine measured in this process and transformers' runs wait for their OpenMP
# threads as the workers do (spinning on a loaded host made a 135M model's decode step 30x slower:
# gpu_workers/cpu_threads.py). Importing gpu_workers sets the policy and records that it was not the
# operator's, so that llama-server (--llama-cpp) runs on its own default (benchmarks/llama_cpp.py).
import gpu_workers  # noqa: F401, I001

import torch

from benchmarks import llama_cpp
from benchmarks.common import (
    Matmuls,
    linear_flops_per_token,
    log,
    matmul_peak_gflops,
    pct,
    print_targets,
    write_results,
)
from broker.settings import Settings
from producer.async_client import AsyncClient
from ryzanstein.stack import Stack


@dataclass
class Workload:
    prompts: list[list[int]]
    output_lens: list[int]

    @classmethod
    def make(cls, n: int, *, vocab: int, seed: int) -> Workload:
        rng = random.Random(seed)
        prompts = [[rng.randrange(3, vocab) for _ in range(rng.randint(16, 512))] for _ in range(n)]
        return cls(prompts, [rng.randint(16, 256) for _ in range(n)])


@dataclass
class Timings:
    """Per-request token times (seconds after all requests were submitted) of one system's run."""

    name: str
    wall_s: float = 0.0
    token_times: list[list[float]] = field(default_factory=list)

    def summary(self) -> dict[str, float]:
        tokens = sum(len(t) for t in self.token_times)
        ttft = [t[0] for t in self.token_times if t]
        tpot = [(t[-1] - t[0]) / (len(t) - 1) for t in self.token_times if len(t) > 1]
        return {
            "output_tokens": tokens,
            "wall_s": round(self.wall_s, 2),
            "output_tok_per_s": round(tokens / self.wall_s, 1),
            "ttft_p50_ms": round(pct(ttft, 50) * 1000, 1),
            "ttft_p99_ms": round(pct(ttft, 99) * 1000, 1),
            "tpot_p50_ms": round(pct(tpot, 50) * 1000, 1),
            "tpot_p99_ms": round(pct(tpot, 99) * 1000, 1),
        }


# --- ryzanstein -----------------------------------------------------------------------------------


async def _serve(url: str, prefix: str, work: Workload) -> Timings:
    timings = Timings("ryzanstein", token_times=[[] for _ in work.prompts])
    async with AsyncClient(url, prefix=prefix) as client:
        await client.generate(prompt_ids=[5, 6, 7], max_tokens=2, temperature=0.0, timeout=300)  # warm

        start = time.perf_counter()

        async def one(i: int) -> None:
            handle = await client.submit(prompt_ids=work.prompts[i], max_tokens=work.output_lens[i],
                                         temperature=0.0, ignore_eos=True, stream=True)
            async for event in client.events(handle, timeout=3600):
                if event.kind == "token":
                    timings.token_times[i].append(time.perf_counter() - start)
                else:
                    event.raise_for_error()

        await asyncio.gather(*(one(i) for i in range(len(work.prompts))))
        timings.wall_s = time.perf_counter() - start
    return timings


def run_ryzanstein(model: str, kv_dtype: str, work: Workload) -> Timings:
    settings = Settings(prefix="bench-serving")
    with Stack(settings, model=model, groups=1, quiet=True,
               worker_args=["--kv-dtype", kv_dtype]) as stack:
        if stack.wait_until_serving(timeout_s=600) is None:
            raise RuntimeError("no worker group became ready within 600 s")
        return asyncio.run(_serve(stack.url, settings.prefix, work))


def engine_decode(model: str, kv_dtype: str, *, batch: int, context: int, steps: int) -> dict[str, float]:
    """ms per decode step of ``batch`` sequences at ~``context`` tokens, and linear-layer GFLOP/s."""
    from gpu_workers.engine import EngineRequest
    from gpu_workers.engine_spec import EngineOptions, build_engine
    from gpu_workers.sampling_params import SamplingParams

    engine = build_engine(model, EngineOptions(kv_dtype=kv_dtype, kv_memory="4GiB"))
    rng = random.Random(1)
    greedy = SamplingParams(max_tokens=10_000, temperature=0.0, ignore_eos=True)
    for i in range(batch):
        prompt = [rng.randrange(3, engine.info.vocab_size) for _ in range(context)]
        engine.add(EngineRequest(f"r{i}", prompt, greedy))
    while len(engine.step()) < batch:  # until every prompt is prefilled and all of them decode
        pass
    # Steps and matmul-peak measurements alternate, so that both meet the same machine state (on a
    # VM either alone moves by 1.5x from minute to minute); medians of each. The peak's operands are
    # allocated once (see Matmuls).
    yardstick = Matmuls(2048, 2048, 2048)
    times, peaks = [], []
    for _ in range(steps):
        peaks.append(yardstick.peak(iters=5))
        t0 = time.perf_counter()
        outputs = engine.step()
        times.append(time.perf_counter() - t0)
        assert len(outputs) == batch, "a sequence left the decode batch"
    per_step = statistics.median(times)
    flops = linear_flops_per_token(engine.config) * batch
    engine.close()
    return {"ms_per_step": round(per_step * 1000, 2), "gflops": flops / per_step / 1e9,
            "peak_gflops": statistics.median(peaks)}


# --- transformers ---------------------------------------------------------------------------------


def _hf_model(model_dir: Path):
    """transformers' model of ``model_dir``; for a GGUF model, transformers' own loading of the file."""
    from transformers import AutoModelForCausalLM

    gguf = model_dir / "model.gguf"  # a directory resolve_model made from a GGUF file
    if gguf.exists():
        file = gguf.resolve()
        return AutoModelForCausalLM.from_pretrained(file.parent, gguf_file=file.name, dtype=torch.float32).eval()
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    return model.eval()


def run_hf_static(model_dir: Path, work: Workload, *, batch_size: int) -> Timings:
    from transformers import LogitsProcessor, LogitsProcessorList

    model = _hf_model(model_dir)
    timings = Timings(f"transformers generate, static batches of {batch_size}")
    steps: list[float] = []

    class StepClock(LogitsProcessor):
        def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
            steps.append(time.perf_counter() - start)
            return scores

    start = time.perf_counter()
    for first in range(0, len(work.prompts), batch_size):
        prompts = work.prompts[first : first + batch_size]
        lens = work.output_lens[first : first + batch_size]
        width = max(len(p) for p in prompts)
        ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])  # left padding
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        steps.clear()
        with torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max(lens), min_new_tokens=max(lens),
                                 do_sample=False, logits_processor=LogitsProcessorList([StepClock()]), pad_token_id=0)
        assert out.shape[1] - width == max(lens)
        for n in lens:  # a request is served once its own n tokens exist
            timings.token_times.append(steps[:n])
        log(f"  static batch {first // batch_size + 1}: {time.perf_counter() - start:.0f}s")
    timings.wall_s = time.perf_counter() - start
    return timings


def run_hf_continuous_limited(model_dir: Path, work: Workload, *, limit_s: float) -> Timings | None:
    """transformers' continuous batching over the workload, in a child process that is killed when it
    is not done in ``limit_s`` (None then): its generation thread cannot be stopped mid-step."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    results = ctx.Queue()
    child = ctx.Process(target=_hf_continuous_child, args=(model_dir, work, results), daemon=True)
    child.start()
    try:
        return results.get(timeout=limit_s)
    except queue.Empty:
        log(f"  not done after {limit_s:.0f}s; stopped")
        return None
    finally:
        child.kill()
        child.join()
        results.close()


def _hf_continuous_child(model_dir: Path, work: Workload, results: Any) -> None:
    results.put(run_hf_continuous(model_dir, work))


def run_hf_continuous(model_dir: Path, work: Workload) -> Timings:
    from transformers import GenerationConfig

    model = _hf_model(model_dir)
    config = GenerationConfig(do_sample=False, max_new_tokens=max(work.output_lens), eos_token_id=None)
    timings = Timings("transformers continuous batching")
    manager = model.init_continuous_batching(generation_config=config)
    manager.start()
    try:
        start = time.perf_counter()
        ids = [manager.add_request(p, max_new_tokens=n, record_timestamps=True)
               for p, n in zip(work.prompts, work.output_lens)]
        results = {}
        while len(results) < len(ids):
            result = manager.get_result(timeout=1)
            if result is not None and result.is_finished():
                results[result.request_id] = result
            elif result is None and not manager.is_running():
                raise RuntimeError("transformers' continuous batching stopped early")
        timings.wall_s = time.perf_counter() - start
        for rid in ids:
            stamps = results[rid].timestamps or []
            timings.token_times.append([t - start for t in stamps])
    finally:
        manager.stop(block=True)
    return timings


# --- main -----------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="random:small", help="random:<preset>, a model directory or a .gguf file "
                        "(transformers then loads the same file with its own GGUF loader)")
    parser.add_argument("--kv-dtype", default="fp32", help="KV cache dtype of the worker group (default fp32, "
                                                           "the same as transformers' cache)")
    parser.add_argument("--requests", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--static-batch", type=int, default=32)
    parser.add_argument("--decode-batch", type=int, default=64)
    parser.add_argument("--skip-transformers", action="store_true", help="only ryzanstein's numbers")
    parser.add_argument("--hf-cb-limit-s", type=float, default=600.0,
                        help="stop transformers' continuous batching after this long (on CPUs it is very slow); "
                             "the speedup over it is then reported as a lower bound")
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default: benchmarks/results/...)")
    llama_cpp.add_arguments(parser)
    args = parser.parse_args(argv)
    args.started = time.strftime("%Y-%m-%dT%H:%M:%S")
    if args.llama_cpp is not None:
        return llama_cpp.compare(args)

    from gpu_workers.model.loader import resolve_model
    from gpu_workers.model.presets import materialize

    model_dir = materialize(args.model.removeprefix("random:")) if args.model.startswith("random:") else resolve_model(args.model)
    vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]
    work = Workload.make(args.requests, vocab=vocab, seed=args.seed)
    results: dict[str, object] = {
        "benchmark": "serving", "model": args.model, "kv_dtype": args.kv_dtype, "requests": args.requests,
        "prompt_tokens": sum(map(len, work.prompts)), "max_output_tokens": sum(work.output_lens),
        "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform()},
        "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    log("measuring the fp32 matmul peak ...")
    peak = matmul_peak_gflops()
    results["matmul_peak_gflops"] = round(peak, 1)

    runs: list[Timings] = []
    log(f"ryzanstein: {args.requests} requests through Redis ...")
    runs.append(run_ryzanstein(args.model, args.kv_dtype, work))
    log(f"  {runs[-1].summary()}")
    log(f"engine alone: decode at batch {args.decode_batch} ...")
    decode = engine_decode(args.model, args.kv_dtype, batch=args.decode_batch, context=300, steps=15)
    decode["share_of_peak"] = round(decode["gflops"] / decode["peak_gflops"], 3)
    decode["gflops"], decode["peak_gflops"] = round(decode["gflops"], 1), round(decode["peak_gflops"], 1)
    results["decode"] = {"batch": args.decode_batch, **decode}
    if not args.skip_transformers:
        log(f"transformers generate, static batches of {args.static_batch} ...")
        runs.append(run_hf_static(model_dir, work, batch_size=args.static_batch))
        log(f"  {runs[-1].summary()}")
        log(f"transformers continuous batching (at most {args.hf_cb_limit_s:.0f}s) ...")
        cb = run_hf_continuous_limited(model_dir, work, limit_s=args.hf_cb_limit_s)
        if cb is not None:
            runs.append(cb)
            log(f"  {runs[-1].summary()}")
    results["runs"] = {t.name: t.summary() for t in runs}

    ours = runs[0].summary()["output_tok_per_s"]
    targets: dict[str, bool] = {
        f"decode at batch {args.decode_batch} >= 60% of the matmul peak": decode["share_of_peak"] >= 0.6,
    }
    if not args.skip_transformers:
        static = runs[1].summary()["output_tok_per_s"]
        # Not done within the limit: it needs more than limit_s for all the tokens, so its throughput is
        # below tokens / limit_s, and ours over that is a lower bound of the speedup.
        continuous = runs[2].summary()["output_tok_per_s"] if len(runs) > 2 else sum(work.output_lens) / args.hf_cb_limit_s
        results["speedup"] = {"vs_static": round(ours / static, 2), "vs_continuous": round(ours / continuous, 2),
                              "vs_continuous_is_lower_bound": len(runs) <= 2}
        if len(runs) <= 2:
            results["transformers_continuous_not_done_in_s"] = args.hf_cb_limit_s
        targets[">= 2.5x transformers static batching"] = ours >= 2.5 * static
        targets[">= 2x transformers continuous batching"] = ours >= 2 * continuous
    results["targets"] = targets

    print(f"\nServing benchmark: {args.model}, fp32 weights, {args.kv_dtype} KV cache, {args.requests} requests "
          f"({results['prompt_tokens']} prompt tokens), {os.cpu_count()} CPUs")
    print(f"{'system':<44} {'tok/s':>8} {'wall s':>7} {'TTFT p50':>9} {'p99':>8} {'TPOT p50':>9} {'p99':>7}")
    for t in runs:
        s = t.summary()
        print(f"{t.name:<44} {s['output_tok_per_s']:>8} {s['wall_s']:>7} {s['ttft_p50_ms']:>9} "
              f"{s['ttft_p99_ms']:>8} {s['tpot_p50_ms']:>9} {s['tpot_p99_ms']:>7}")
    print(f"\nfp32 matmul peak {peak:.0f} GFLOP/s at the start, {decode['peak_gflops']:.0f} while decoding; decode at "
          f"batch {args.decode_batch}: {decode['ms_per_step']} ms/step, {decode['gflops']} GFLOP/s in linear layers "
          f"= {decode['share_of_peak']:.0%} of the peak measured alongside")
    if not args.skip_transformers and len(runs) <= 2:
        print(f"transformers continuous batching: not done in {args.hf_cb_limit_s:.0f}s, so ryzanstein is at least "
              f"{results['speedup']['vs_continuous']}x faster")  # type: ignore[index]
    print("(times in ms; TTFT counts from the moment all requests were submitted)")
    print_targets(targets)

    write_results(results, "serving", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
