"""fp8 KV quantization schemes measured step by step on a real model, before any is built into the cache.

    python benchmarks/kv_schemes.py --model model.gguf            (~10 minutes on 2 busy cores)
    python benchmarks/kv_schemes.py --model DIR --gen-tokens 48 --schemes block-pow2,k-centered+v-token

Each scheme is simulated in transformers' own forward (a registered attention function): K and V
[B, H, T, D] (after RoPE) are quantized to e4m3 and dequantized, and every query attends to the
dequantized values - the semantics the engine has since prefill reads its context back from the
cache (a request's logits do not depend on what was cached). The fp32 model generates
--gen-tokens greedy tokens after each text prompt (benchmarks/real_model.py: chat, code, prose,
long context); each scheme is then teacher-forced through them and compared position by position:
mean KL(fp32 || scheme), top-1 agreement.

Block statistics are taken over whole 16-token blocks (what a scheme that fixes a block's scales
when the block completes would store). "+ newest fp32" keeps a query's own block unquantized (the
newest block kept in higher precision; earlier blocks quantized), again a function of positions only.

Steps (the issue's list; KIVI: Liu et al. 2024, KVQuant: Hooper et al. 2024):
- block-pow2: one power-of-two scale per (block, head) for K and for V (the default today);
- block-exact: the same with the exact scale amax / 448 (scales from the values, not powers of two);
- token: one exact scale per (token, head) for K and for V;
- k-channel+v-token: K with one scale per (block, channel), as KIVI and KVQuant do; V per token;
- k-centered+v-token: K per (block, channel) minus the channel's midpoint (KIVI's zero point),
  scale per channel; V per token;
- ... + newest fp32: the query's own block read unquantized.
Writes JSON to benchmarks/results/kv_schemes-<timestamp>.json.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch

from benchmarks.common import log, write_results
from benchmarks.real_model import model_dir_of, text_prompts

E4M3 = torch.float8_e4m3fn
FMAX = 448.0
BS = 16
TINY = 1e-30


def qdq(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``x`` quantized to e4m3 under ``scale`` (round to nearest even, saturating) and back."""
    return (x / scale).clamp(-FMAX, FMAX).to(E4M3).float() * scale


def by_block(x: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """``fn`` applied to [B, H, nb, BS, D] blocks of ``x`` [B, H, T, D] (the last one zero-padded)."""
    b, h, t, d = x.shape
    nb = -(-t // BS)
    padded = x.new_zeros(b, h, nb * BS, d)
    padded[:, :, :t] = x
    return fn(padded.view(b, h, nb, BS, d)).flatten(2, 3)[:, :, :t]


def per_token(x: torch.Tensor) -> torch.Tensor:
    return qdq(x, (x.abs().amax(-1, keepdim=True) / FMAX).clamp(min=TINY))


def block_scale(pow2: bool) -> Callable[[torch.Tensor], torch.Tensor]:
    def fn(xb: torch.Tensor) -> torch.Tensor:
        s = (xb.abs().amax((-1, -2), keepdim=True) / FMAX).clamp(min=TINY)
        return qdq(xb, 2.0 ** torch.ceil(torch.log2(s)) if pow2 else s)
    return fn


def channel(xb: torch.Tensor) -> torch.Tensor:
    return qdq(xb, (xb.abs().amax(-2, keepdim=True) / FMAX).clamp(min=TINY))


def centered_channel(xb: torch.Tensor) -> torch.Tensor:
    mid = (xb.amin(-2, keepdim=True) + xb.amax(-2, keepdim=True)) / 2
    return channel(xb - mid) + mid


Quant = Callable[[torch.Tensor], torch.Tensor]
SCHEMES: dict[str, tuple[Quant, Quant, bool]] = {  # name -> (K, V, newest block unquantized)
    "bf16": (lambda x: x.bfloat16().float(), lambda x: x.bfloat16().float(), False),
    "per-tensor 1.0": (lambda x: qdq(x, torch.tensor(1.0)), lambda x: qdq(x, torch.tensor(1.0)), False),
    "block-pow2": (lambda x: by_block(x, block_scale(True)), lambda x: by_block(x, block_scale(True)), False),
    "block-exact": (lambda x: by_block(x, block_scale(False)), lambda x: by_block(x, block_scale(False)), False),
    "token": (per_token, per_token, False),
    "k-channel+v-token": (lambda x: by_block(x, channel), per_token, False),
    "k-centered+v-token": (lambda x: by_block(x, centered_channel), per_token, False),
    "block-pow2 + newest fp32": (lambda x: by_block(x, block_scale(True)), lambda x: by_block(x, block_scale(True)), True),
    "token + newest fp32": (per_token, per_token, True),
    "k-centered+v-token + newest fp32": (lambda x: by_block(x, centered_channel), per_token, True),
}
ACTIVE: list[tuple[Quant, Quant, bool] | None] = [None]


def attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
              attention_mask: torch.Tensor | None, **kwargs: object) -> tuple[torch.Tensor, None]:
    """Causal attention [B, T, H, D] over the active scheme's dequantized K/V ([B, H(kv), T, D] in)."""
    if ACTIVE[0] is None:  # the fp32 reference, and generation (queries fewer than keys there)
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    t = key.shape[2]
    group = query.shape[1] // key.shape[1]
    k, v = key, value
    kq, vq = ACTIVE[0][0](k), ACTIVE[0][1](v)
    k, v, kq, vq = (x.repeat_interleave(group, 1) for x in (k, v, kq, vq))
    pos = torch.arange(t)
    own = (pos[:, None] // BS) == (pos[None, :] // BS)  # [T, T] key in the query's own block
    newest = ACTIVE[0][2]
    scale = query.shape[-1] ** -0.5
    scores = query @ kq.transpose(-1, -2)
    if newest:
        scores = torch.where(own, query @ k.transpose(-1, -2), scores)
    probs = (scores * scale).masked_fill(pos[None, :] > pos[:, None], float("-inf")).softmax(-1)
    out = (probs * own) @ v + (probs * ~own) @ vq if newest else probs @ vq
    return out.transpose(1, 2).contiguous(), None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a checkpoint directory or a .gguf file")
    parser.add_argument("--gen-tokens", type=int, default=64)
    parser.add_argument("--schemes", default=",".join(SCHEMES), help="comma-separated, from: " + ", ".join(SCHEMES))
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    import transformers
    from transformers import AttentionInterface

    torch.set_grad_enabled(False)
    AttentionInterface.register("kv_schemes", attention)
    model_dir = model_dir_of(Path(args.model))
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype="float32",
                                                              attn_implementation="kv_schemes").eval()
    gen = args.gen_tokens
    seqs = []
    for _, ids in text_prompts(model_dir):
        ids_t = torch.tensor([ids])
        out = model.generate(ids_t, attention_mask=torch.ones_like(ids_t), max_new_tokens=gen,
                             min_new_tokens=gen, do_sample=False)
        seqs.append(out[0])

    def logits() -> list[torch.Tensor]:  # [gen, vocab] per sequence: the positions that predict generated tokens
        return [model(s[None]).logits[0, len(s) - gen - 1 : -1].double() for s in seqs]

    ref = logits()
    rows = {}
    for name in args.schemes.split(","):
        started = time.perf_counter()
        ACTIVE[0] = SCHEMES[name]
        got = logits()
        ACTIVE[0] = None
        kl = torch.cat([(r.log_softmax(-1).exp() * (r.log_softmax(-1) - g.log_softmax(-1))).sum(-1)
                        for r, g in zip(ref, got)])
        agree = torch.cat([r.argmax(-1) == g.argmax(-1) for r, g in zip(ref, got)]).double()
        rows[name] = {"mean_kl": kl.mean().item(), "max_kl": kl.max().item(), "top1_agreement": agree.mean().item()}
        log(f"{name}: {time.perf_counter() - started:.0f}s")
        print(f"{name:<36} mean KL {kl.mean():.2e}  max {kl.max():.2e}  top-1 {agree.mean():.2%}", flush=True)
    write_results({"benchmark": "kv_schemes", "model": args.model, "prompts": len(seqs), "gen_tokens": gen,
                   "block_size": BS, "format": "fp8_e4m3", "schemes": rows}, "kv_schemes", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
