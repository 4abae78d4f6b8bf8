"""KV cache formats compared: memory, decode speed and accuracy against the fp32 cache.

    python benchmarks/kv_cache.py                   (everything: ~15 minutes on 2 cores)
    python benchmarks/kv_cache.py --quick           (fewer steps, 64-token generations: ~2 minutes)
    python benchmarks/kv_cache.py --parts memory,accuracy
    python benchmarks/kv_cache.py --model model.gguf --parts memory,accuracy   (a real model: ~5 minutes)

Formats: fp32, bf16, fp8_e4m3 (the default: keys centred per (block, channel), values per token, each
sequence's sink and newest block in bf16: gpu_workers/model/kv_staged.py), fp8_e4m3_block (a
power-of-two scale per block and KV head: the default until issue 17), fp8_e5m2 (the same in e5m2),
fp8_e4m3_per_tensor (one static scale of 1.0 per layer for K and V, vLLM's uncalibrated default)
and fp8_e4m3_per_token (a scale per token and KV head: what per-block scales were chosen over).

- memory: cache bytes per token of --model (all layers, K and V, scales included) and how many
  sequences of --seq-len tokens fit in --kv-memory (the engine's own sizing: whole blocks);
- speed: decode tok/s of the model runner (no engine, no Redis) at equal batch (--batch sequences,
  contexts uniform in --context) and at equal memory (as many sequences as the memory that holds
  --memory-batch fp32 sequences holds in each format); formats run interleaved, several rounds, so
  that other load on the machine hits them alike; the load average is recorded. Block-scaled fp8 on a
  CPU reads blocks through the fused kernels; "fp8_e4m3_block (torch)" is the fallback without them;
  fp8_e4m3 gathers its blocks and reads them back in torch (gpu_workers/model/decode_backends.py);
- accuracy: on each model, the fp32 cache generates --gen-tokens greedy tokens after random prompts;
  every other format is teacher-forced through the same tokens and its next-token distributions are
  compared position by position with the fp32 cache's: mean KL(fp32 || format), top-1 agreement
  (also at the positions where fp32's top-1 is clear: a top-1/top-2 logit gap of at least 0.1 of the
  logits' standard deviation), greedy tokens kept before the first divergence (free-running greedy
  generation follows the teacher-forced path up to its first top-1 disagreement), and the logits'
  relative L2 error. Models: random presets at their default init scale (nearly uniform outputs)
  and at larger ones; random transformers checkpoints saved here (CHECKPOINTS) with an lm_head
  scaled up for peaked next-token distributions, at transformers' default initializer_range and a
  larger one, plus variants whose K/V magnitudes resemble trained models' (small V values; outlier
  K channels), built so that their outputs equal the plain checkpoint's in exact arithmetic:
  per-block scales do not care about magnitudes, static per-tensor scales do. With a real model
  (--model a checkpoint directory or a GGUF file, not random:), accuracy runs on that model alone,
  over varied text prompts (chat turns through its chat template, code, prose, a long context:
  benchmarks/real_model.py), --gen-tokens each (128 unless given). Every format runs in the
  engine's own model runner and cache (prompts prefilled whole, then teacher-forced decode steps);
- schemes (a real model only): the same comparison for KV quantization schemes simulated in
  transformers' forward, block by block as a cache applies them (benchmarks/kv_schemes.py): fp32,
  bf16, fp8_e4m3 and fp8_e5m2 as the engine stores them today, per-tensor 1.0, and the centred
  scheme of gpu_workers/model/kv_quant.py (with the sink and newest blocks in bf16), with each
  scheme's capacity against fp32 and where top-1 flips, fp32's own top-1/top-2 logit gap.

Prints tables; writes JSON to benchmarks/results/kv_cache-<timestamp>.json.
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch

from benchmarks.common import log, write_results
from benchmarks.real_model import model_dir_of, text_prompts
from gpu_workers.kv_memory import parse_size
from gpu_workers.model.config import load_config
from gpu_workers.model.kv_cache import KVCache, kv_bytes_per_block, kv_bytes_per_token
from gpu_workers.model.kv_format import kv_format
from gpu_workers.model.kv_staged import StagedKVCache, dense_pool_blocks
from gpu_workers.model.presets import default_cache_dir, materialize
from gpu_workers.model_runner import Chunk, ModelRunner

BLOCK = 16
DEFAULT = "fp8_e4m3"
FORMATS = ["fp32", "bf16", "fp8_e4m3", "fp8_e4m3_block", "fp8_e5m2", "fp8_e4m3_per_tensor", "fp8_e4m3_per_token"]
TORCH_FALLBACK = "fp8_e4m3_block (torch)"
MAX_NUM_SEQS = 128  # the engine's default: the staged format's bf16 blocks are sized for as many sequences
# benchmarks/kv_schemes.py's names: the engine's formats and the centred scheme of kv_quant.py
SCHEMES = ["fp32", "bf16", "fp8_e4m3 (block-pow2)", "fp8_e5m2 (block-pow2)", "per-tensor 1.0", "kv_quant + own + sink"]
CLEAR_GAP = 0.1  # a "clear" top-1: logit gap to the runner-up >= this x the logits' std


def load_average() -> float:
    return round(os.getloadavg()[0], 2)


# --- memory ---------------------------------------------------------------------------------------


def memory_table(model_dir: Path, kv_memory: str, seq_len: int) -> dict[str, dict[str, float]]:
    config = load_config(model_dir)
    budget = parse_size(kv_memory)
    rows = {}
    for fmt in FORMATS:
        per_block = kv_bytes_per_block(config, fmt, block_size=BLOCK)
        kv = kv_format(fmt)
        blocks_per_seq = -(-seq_len // BLOCK)
        if kv.staged:  # as gpu_workers/rank.py sizes it: bf16 blocks (sink, staging) first, 2 per sequence
            dense_bytes = (config.num_hidden_layers * 2 * config.num_key_value_heads
                           * kv.dense_bytes_per_head_block(BLOCK, config.head_dim))
            dense = dense_pool_blocks(budget, dense_bytes, num_groups=1, max_num_seqs=MAX_NUM_SEQS)
            blocks = (budget - dense * dense_bytes) // per_block
            # a sequence's block 0 is its (dense) sink: the rest are fp8, its newest one staged besides
            sequences = min(blocks // max(1, blocks_per_seq - 1), dense // 2)
        else:
            blocks = budget // per_block
            sequences = blocks // blocks_per_seq
        rows[fmt] = {
            "bytes_per_token": kv_bytes_per_token(config, fmt, block_size=BLOCK),
            "bytes_per_token_per_layer": kv_bytes_per_token(config, fmt, block_size=BLOCK) / config.num_hidden_layers,
            "capacity_tokens": blocks * BLOCK,
            "sequences": sequences,
        }
    for fmt, row in rows.items():
        row["vs_fp32"] = round(row["capacity_tokens"] / rows["fp32"]["capacity_tokens"], 3)
        row["vs_bf16"] = round(row["capacity_tokens"] / rows["bf16"]["capacity_tokens"], 3)
    return rows


# --- speed ----------------------------------------------------------------------------------------


@dataclass
class DecodeRun:
    """One format's cache and sequences on the shared model runner."""

    name: str
    cache: KVCache
    tables: list[list[int]]
    positions: list[int]
    times: list[float]
    staging: list[tuple[int, ...]]


def make_run(runner: ModelRunner, name: str, lengths: list[int], steps: int, rng: random.Random) -> DecodeRun:
    kv_dtype = name.split(" ")[0]
    per_seq = [-(-(n + steps + 2) // BLOCK) for n in lengths]
    cfg = runner.config
    shape: dict[str, Any] = {"num_layers": cfg.num_hidden_layers, "num_blocks": sum(per_seq), "block_size": BLOCK,
                             "num_kv_heads": cfg.num_key_value_heads, "head_dim": cfg.head_dim, "kv_dtype": kv_dtype,
                             "dtype": runner.dtype}
    blocks = list(range(sum(per_seq)))
    rng.shuffle(blocks)
    tables = [blocks[sum(per_seq[:i]) : sum(per_seq[: i + 1])] for i in range(len(lengths))]
    staging: list[tuple[int, ...]] = [()] * len(lengths)
    cache: KVCache
    if kv_format(kv_dtype).staged:  # block 0 (the sink) and a staging block per sequence in bf16
        n = len(lengths)
        cache = StagedKVCache(num_dense_blocks=2 * n, **shape)
        tables = [[sum(per_seq) + i, *t[1:]] for i, t in enumerate(tables)]
        staging = [(sum(per_seq) + n + i,) for i in range(n)]
        # codes and scales like a model's (a decode step's cost does not depend on them)
        cache.values.copy_(torch.randint(0, 120, cache.values.shape, dtype=torch.uint8))
        cache.dense.normal_()
        return DecodeRun(name, cache, tables, list(lengths), [], staging)
    cache = KVCache(fused_kernels=name != TORCH_FALLBACK, **shape)
    for layer in range(cache.num_layers):  # values like a model's: a decode step's cost does not depend on them
        k = torch.randn(cache.num_blocks * BLOCK, cache.num_kv_heads, cache.head_dim)
        cache.write(layer, torch.arange(k.shape[0]), k, k)
    return DecodeRun(name, cache, tables, list(lengths), [], staging)


def decode_steps(runner: ModelRunner, run: DecodeRun, steps: int, rng: random.Random) -> None:
    runner.use_kv_cache(run.cache)
    vocab = runner.config.vocab_size
    for _ in range(steps):
        chunks = [Chunk([rng.randrange(vocab)], p, t, True, staging=s)
                  for p, t, s in zip(run.positions, run.tables, run.staging)]
        start = time.perf_counter()
        runner.run(chunks)
        run.times.append(time.perf_counter() - start)
        run.positions = [p + 1 for p in run.positions]


def speed(model_dir: Path, *, batch: int, context: tuple[int, int], memory_batch: int, steps: int,
          rounds: int) -> dict[str, object]:
    rng = random.Random(0)
    names = [*FORMATS, TORCH_FALLBACK]
    runner = ModelRunner(model_dir, num_blocks=1, block_size=BLOCK)
    lengths = [rng.randint(*context) for _ in range(batch)]
    config = load_config(model_dir)
    # equal memory: what --memory-batch fp32 sequences of the longest context take, in each format
    longest = -(-(context[1] + steps * rounds + 2) // BLOCK)
    budget = memory_batch * longest * kv_bytes_per_block(config, "fp32", block_size=BLOCK)
    def per_seq(name: str) -> int:  # bytes one sequence takes (the staged format: 2 of its blocks in bf16)
        kv = kv_format(name.split(" ")[0])
        if not kv.staged:
            return longest * kv_bytes_per_block(config, kv, block_size=BLOCK)
        dense = config.num_hidden_layers * 2 * config.num_key_value_heads * kv.dense_bytes_per_head_block(BLOCK, config.head_dim)
        return (longest - 1) * kv_bytes_per_block(config, kv, block_size=BLOCK) + 2 * dense

    fits = {n: budget // per_seq(n) for n in names}
    equal_memory_lengths = {n: [rng.randint(*context) for _ in range(fits[n])] for n in names}

    result: dict[str, object] = {"load_before": load_average()}
    for label, seqs in (("equal_batch", {n: lengths for n in names}), ("equal_memory", equal_memory_lengths)):
        log(f"speed, {label}: {', '.join(f'{n} x{len(seqs[n])}' for n in names)}")
        runs = [make_run(runner, n, seqs[n], steps * rounds + 2, rng) for n in names]
        for run in runs:  # warm up: first steps allocate workspaces (and build the fused kernels)
            decode_steps(runner, run, 2, rng)
            run.times.clear()
        for r in range(rounds):
            for run in runs:
                decode_steps(runner, run, steps, rng)
            log(f"  round {r + 1}/{rounds} (load {load_average()})")
        table = {}
        for run in runs:
            median, best = statistics.median(run.times), min(run.times)
            table[run.name] = {
                "batch": len(run.tables),
                "ms_per_step": round(median * 1e3, 1),
                "best_ms_per_step": round(best * 1e3, 1),
                "tok_per_s": round(len(run.tables) / median, 1),
            }
        for row in table.values():
            row["vs_fp32"] = round(row["tok_per_s"] / table["fp32"]["tok_per_s"], 3)  # type: ignore[operator]
        result[label] = table
        del runs
    result["load_after"] = load_average()
    return result


# --- accuracy -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Checkpoint:
    """A random transformers checkpoint: family, initializer_range, lm_head multiplier (peaked
    next-token distributions) and a K/V magnitude variant that leaves the function unchanged."""

    family: str
    init_std: float = 0.02  # transformers' default initializer_range
    logit_scale: float = 16.0
    variant: str = "plain"  # "small-v" or "outlier-k": see _apply_variant


CHECKPOINTS = {
    "hf-llama": Checkpoint("Llama"),
    "hf-llama-small-v": Checkpoint("Llama", variant="small-v"),
    "hf-llama-outlier-k": Checkpoint("Llama", variant="outlier-k"),
    "hf-qwen2": Checkpoint("Qwen2"),
    "hf-llama std 0.05": Checkpoint("Llama", init_std=0.05, logit_scale=8.0),
    "hf-llama std 0.05 outlier-k": Checkpoint("Llama", init_std=0.05, logit_scale=8.0, variant="outlier-k"),
}


def hf_checkpoint(name: str) -> Path:
    """``CHECKPOINTS[name]`` saved by transformers, written once under the cache directory."""
    import transformers

    spec = CHECKPOINTS[name]
    slug = f"{spec.family.lower()}-std{spec.init_std:g}-logits{spec.logit_scale:g}-{spec.variant}-v1"
    path = default_cache_dir() / "bench-models" / slug
    if path.is_dir():
        return path
    config = getattr(transformers, f"{spec.family}Config")(
        vocab_size=2048, hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=8,
        num_key_value_heads=2, max_position_embeddings=2048, initializer_range=spec.init_std,
        tie_word_embeddings=False, bos_token_id=None, eos_token_id=None, pad_token_id=None,
    )
    torch.manual_seed(0)
    model = getattr(transformers, f"{spec.family}ForCausalLM")(config).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(spec.logit_scale)
        for layer in model.model.layers:
            _apply_variant(layer.self_attn, config, spec.variant)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    model.save_pretrained(tmp, safe_serialization=True)
    os.replace(tmp, path)
    return path


def _apply_variant(attn: torch.nn.Module, config: object, variant: str) -> None:
    """Give K or V the magnitudes trained models show, keeping the layer's output the same."""
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads  # type: ignore[attr-defined]
    head_dim = config.hidden_size // heads  # type: ignore[attr-defined]
    if variant == "small-v":  # V 64x smaller, o_proj 64x larger: V mostly below e4m3's normals at scale 1
        attn.v_proj.weight.mul_(1 / 64)
        if attn.v_proj.bias is not None:
            attn.v_proj.bias.mul_(1 / 64)
        attn.o_proj.weight.mul_(64)
    elif variant == "outlier-k":
        # one RoPE channel pair of each KV head's K 512x larger and the same channels of its queries
        # 512x smaller: q.k is unchanged, K reaches far past e4m3's 448
        group = heads // kv_heads
        for kv_head in range(kv_heads):
            for c in (3, 3 + head_dim // 2):
                for proj, rows, factor in (
                    (attn.k_proj, [kv_head * head_dim + c], 512.0),
                    (attn.q_proj, [h * head_dim + c for h in range(kv_head * group, (kv_head + 1) * group)], 1 / 512),
                ):
                    proj.weight[rows] *= factor
                    if proj.bias is not None:
                        proj.bias[rows] *= factor


def accuracy_models(quick: bool) -> list[tuple[str, Path]]:
    models = [("random:tiny", materialize("tiny")), ("random:tiny std 0.05", materialize("tiny", init_std=0.05))]
    if not quick:
        models += [("random:small", materialize("small")),
                   ("random:small std 0.03", materialize("small", init_std=0.03))]
    return models + [(name, hf_checkpoint(name)) for name in CHECKPOINTS]


def teacher_forced_logits(model_dir: Path, kv_dtype: str, prompts: list[list[int]], gen: int,
                          forced: list[list[int]] | None) -> torch.Tensor:
    """Next-token logits [N, gen, vocab] after each prompt and each of its next ``gen - 1`` tokens,
    those being ``forced`` [N][gen] or (None) the greedy ones."""
    per_seq = -(-(max(map(len, prompts)) + gen) // BLOCK)
    n = len(prompts)
    runner = ModelRunner(model_dir, num_blocks=per_seq * n, block_size=BLOCK, kv_dtype=kv_dtype)
    tables = [list(range(i * per_seq, (i + 1) * per_seq)) for i in range(n)]
    staging: list[tuple[int, ...]] = [()] * n
    if runner.kv_format.staged:  # the engine's own staged cache: block 0 (the sink) and staging blocks in bf16
        runner.allocate_kv_cache(per_seq * n, 2 * n)
        tables = [[per_seq * n + i, *t[1:]] for i, t in enumerate(tables)]
        staging = [(per_seq * n + n + i,) for i in range(n)]
    logits = [runner.run([Chunk(p, 0, t, True, staging=s) for p, t, s in zip(prompts, tables, staging)])]
    for i in range(gen - 1):
        tokens = [f[i] for f in forced] if forced is not None else logits[-1].argmax(dim=-1).tolist()
        logits.append(runner.run([Chunk([tok], len(p) + i, t, True, staging=s)
                                  for tok, p, t, s in zip(tokens, prompts, tables, staging)]))
    return torch.stack(logits, dim=1)


def compare(ref: torch.Tensor, got: torch.Tensor) -> dict[str, float]:
    ref, got = ref.double(), got.double()
    log_p, log_q = torch.log_softmax(ref, dim=-1), torch.log_softmax(got, dim=-1)
    kl = (log_p.exp() * (log_p - log_q)).sum(dim=-1)  # [N, gen]
    agree = ref.argmax(dim=-1) == got.argmax(dim=-1)  # [N, gen]
    top = ref.topk(2, dim=-1).values
    clear = (top[..., 0] - top[..., 1]) >= CLEAR_GAP * ref.std(dim=-1)
    gen = agree.shape[1]
    first_miss = torch.where(agree.all(dim=1), gen, (~agree).int().argmax(dim=1))  # [N]
    return {
        "mean_kl": kl.mean().item(),
        "max_kl": kl.max().item(),
        "top1_agreement": agree.double().mean().item(),
        "top1_agreement_clear": agree[clear].double().mean().item() if clear.any() else float("nan"),
        "tokens_kept_mean": first_miss.double().mean().item(),
        "tokens_kept_min": int(first_miss.min()),
        "greedy_equal": (first_miss == gen).double().mean().item(),  # sequences whose greedy run equals fp32's
        "logit_rel_error": ((got - ref).norm(dim=-1) / ref.norm(dim=-1)).mean().item(),
    }


def accuracy(models: list[tuple[str, Path]], *, sequences: int, prompt_len: int, gen: int,
             real: bool = False, formats: list[str] = FORMATS[1:]) -> dict[str, object]:
    """Each format against the fp32 cache on each model: random prompts, or (``real``) text ones."""
    out: dict[str, object] = {}
    for label, model_dir in models:
        started = time.perf_counter()
        vocab = load_config(model_dir).vocab_size
        rng = random.Random(1)
        if real:
            prompts = [ids for _, ids in text_prompts(model_dir)]
        else:
            prompts = [[rng.randrange(vocab) for _ in range(prompt_len)] for _ in range(sequences)]
        ref = teacher_forced_logits(model_dir, "fp32", prompts, gen, None)
        forced = ref.argmax(dim=-1).tolist()
        log_p = torch.log_softmax(ref.double(), dim=-1)
        top = ref.topk(2, dim=-1).values
        rows: dict[str, object] = {
            "reference": {
                "entropy_nats": (-(log_p.exp() * log_p).sum(dim=-1)).mean().item(),
                "uniform_entropy_nats": float(torch.log(torch.tensor(float(vocab)))),
                "clear_positions": ((top[..., 0] - top[..., 1]) >= CLEAR_GAP * ref.std(dim=-1)).double().mean().item(),
            }
        }
        for fmt in formats:
            rows[fmt] = compare(ref, teacher_forced_logits(model_dir, fmt, prompts, gen, forced))
        out[label] = rows
        log(f"accuracy {label}: {time.perf_counter() - started:.0f}s (load {load_average()})")
    return out


# --- report ---------------------------------------------------------------------------------------


def print_report(results: dict[str, object]) -> None:
    if "memory" in results:
        mem = results["memory"]
        print(f"\nMemory: {results['model']}, --kv-memory {results['kv_memory']}, sequences of {results['seq_len']} tokens")
        print(f"{'format':<22} {'bytes/token':>12} {'per layer':>10} {'tokens':>10} {'sequences':>10} {'vs fp32':>8} {'vs bf16':>8}")
        for fmt, r in mem.items():  # type: ignore[union-attr]
            print(f"{fmt:<22} {r['bytes_per_token']:>12g} {r['bytes_per_token_per_layer']:>10g} {r['capacity_tokens']:>10} "
                  f"{r['sequences']:>10} {r['vs_fp32']:>8} {r['vs_bf16']:>8}")
    if "speed" in results:
        sp = results["speed"]
        print(f"\nDecode speed: {results['model']}, contexts {results['context']}, "
              f"load average {sp['load_before']} -> {sp['load_after']}")  # type: ignore[index]
        print(f"{'format':<22} {'batch':>6} {'ms/step':>8} {'best':>7} {'tok/s':>8} {'vs fp32':>8}   "
              f"{'batch':>6} {'ms/step':>8} {'tok/s':>8} {'vs fp32':>8}")
        print(f"{'':<22} {'--- equal batch ---':>40}   {'--- equal memory ---':>33}")
        for fmt, a in sp["equal_batch"].items():  # type: ignore[index]
            b = sp["equal_memory"][fmt]  # type: ignore[index]
            print(f"{fmt:<22} {a['batch']:>6} {a['ms_per_step']:>8} {a['best_ms_per_step']:>7} {a['tok_per_s']:>8} "
                  f"{a['vs_fp32']:>8}   {b['batch']:>6} {b['ms_per_step']:>8} {b['tok_per_s']:>8} {b['vs_fp32']:>8}")
    if "accuracy" in results:
        print(f"\nAccuracy against the fp32 cache: {results['sequences']} sequences x {results['gen_tokens']} "
              f"generated tokens, teacher-forced")
        print(f"{'model':<22} {'format':<22} {'mean KL':>9} {'top-1':>7} {'clear':>7} {'kept':>6} {'min':>4} {'equal':>6} {'logit rel':>9}")
        for model, rows in results["accuracy"].items():  # type: ignore[union-attr]
            ref = rows["reference"]
            print(f"{model:<22} (fp32: entropy {ref['entropy_nats']:.2f} of {ref['uniform_entropy_nats']:.2f} nats, "
                  f"{ref['clear_positions']:.0%} clear positions)")
            for fmt, r in rows.items():
                if fmt == "reference":
                    continue
                print(f"{'':<22} {fmt:<22} {r['mean_kl']:>9.2e} {r['top1_agreement']:>7.2%} "
                      f"{r['top1_agreement_clear']:>7.2%} {r['tokens_kept_mean']:>6.1f} {r['tokens_kept_min']:>4} "
                      f"{r.get('greedy_equal', float('nan')):>6.0%} {r['logit_rel_error']:>9.2e}")
    if "schemes" in results:
        print("(schemes: printed above as they ran)")
    print("\nTargets:")
    for name, ok in results["targets"].items():  # type: ignore[union-attr]
        print(f"  [{'met' if ok else 'MISSED'}] {name}")


def targets(results: dict[str, object]) -> dict[str, bool]:
    out = {}
    if "memory" in results:
        mem = results["memory"][DEFAULT]  # type: ignore[index]
        out["capacity >= 3.5x fp32 at equal memory"] = mem["vs_fp32"] >= 3.5
        out["capacity >= 1.75x bf16 at equal memory"] = mem["vs_bf16"] >= 1.75
    if "speed" in results:
        out["decode tok/s at equal batch >= 0.85x fp32"] = results["speed"]["equal_batch"][DEFAULT]["vs_fp32"] >= 0.85  # type: ignore[index]
    if "schemes" in results:
        r = results["schemes"]["schemes"]["kv_quant + own + sink"]  # type: ignore[index]
        out["centred fp8 (kv_quant.py): top-1 >= 99%, mean KL <= 1e-3, capacity >= 3.5x fp32"] = (
            r["top1_agreement"] >= 0.99 and r["mean_kl"] <= 1e-3 and r["capacity_vs_fp32_at_1024"] >= 3.5)
    if "accuracy" in results:
        for model, rows in results["accuracy"].items():  # type: ignore[union-attr]
            r = rows[DEFAULT]
            out[f"{model}: top-1 >= 99% and mean KL <= 1e-3"] = r["top1_agreement"] >= 0.99 and r["mean_kl"] <= 1e-3
        # not a target of the issue: where fp32's top-1 is clear, does the default keep it?
        out["(extra) top-1 at clear positions >= 99% on every model"] = all(
            rows[DEFAULT]["top1_agreement_clear"] >= 0.99 for rows in results["accuracy"].values()  # type: ignore[union-attr]
        )
        out["the default at least as accurate as per-tensor (mean KL) on every model"] = all(
            rows[DEFAULT]["mean_kl"] <= rows["fp8_e4m3_per_tensor"]["mean_kl"] * 1.05
            for rows in results["accuracy"].values() if "fp8_e4m3_per_tensor" in rows  # type: ignore[union-attr]
        )
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="random:small",
                        help="model for memory and speed (random:<preset>, a checkpoint directory or a .gguf file); "
                             "a real one is also the only accuracy model, with text prompts")
    parser.add_argument("--kv-memory", default="4GiB")
    parser.add_argument("--seq-len", type=int, default=1024, help="tokens per sequence for 'sequences that fit'")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--context", type=int, nargs=2, default=(300, 700), metavar=("MIN", "MAX"))
    parser.add_argument("--memory-batch", type=int, default=16, help="fp32 sequences the equal-memory budget holds")
    parser.add_argument("--steps", type=int, default=6, help="decode steps per format per round")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--sequences", type=int, default=4, help="sequences per accuracy model")
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--gen-tokens", type=int, default=None, help="generated tokens per accuracy sequence "
                        "(default 256 on random models, 128 on a real one)")
    parser.add_argument("--parts", default="memory,speed,accuracy,schemes", help="schemes: a real model only")
    parser.add_argument("--formats", default=",".join(FORMATS[1:]),
                        help="formats the accuracy part compares with fp32 (comma-separated)")
    parser.add_argument("--quick", action="store_true", help="2 rounds of 4 steps, 64-token generations, fewer models")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    real = not args.model.startswith("random:")
    if args.quick:
        args.steps, args.rounds, args.gen_tokens = 4, 2, args.gen_tokens or 64
    args.gen_tokens = args.gen_tokens or (128 if real else 256)
    parts = set(args.parts.split(","))

    model_dir = model_dir_of(Path(args.model)) if real else materialize(args.model.removeprefix("random:"))
    results: dict[str, object] = {
        "benchmark": "kv_cache", "model": args.model, "kv_memory": args.kv_memory, "seq_len": args.seq_len,
        "context": list(args.context), "sequences": args.sequences, "gen_tokens": args.gen_tokens,
        "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform()},
        "started": time.strftime("%Y-%m-%dT%H:%M:%S"), "load_start": load_average(),
    }
    if "memory" in parts:
        results["memory"] = memory_table(model_dir, args.kv_memory, args.seq_len)
    if "speed" in parts:
        results["speed"] = speed(model_dir, batch=args.batch, context=tuple(args.context), memory_batch=args.memory_batch,
                                 steps=args.steps, rounds=args.rounds)
    if "accuracy" in parts:
        models = [(Path(args.model).name, model_dir)] if real else accuracy_models(args.quick)
        results["accuracy"] = accuracy(models, sequences=args.sequences, prompt_len=args.prompt_len,
                                       gen=args.gen_tokens, real=real, formats=args.formats.split(","))
        if real:
            results["sequences"] = len(text_prompts(model_dir))
    if "schemes" in parts and real:
        from benchmarks import kv_schemes

        print(f"\nSchemes simulated block by block against the fp32 cache (load {load_average()}):")
        results["schemes"] = kv_schemes.run(model_dir, SCHEMES, args.gen_tokens)
    results["targets"] = targets(results)
    results["load_end"] = load_average()
    print_report(results)
    write_results(results, "kv_cache", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
