"""fp8 KV quantization schemes measured on a real model, exactly as a cache would apply them.

    python benchmarks/kv_schemes.py --model model.gguf                     (~1 minute per scheme)
    python benchmarks/kv_schemes.py --model DIR --schemes "block-pow2,centred-channel + sink"

Each scheme is simulated in transformers' own forward (a registered attention function): K and V
[B, H, T, D] (after RoPE) are cut into 16-token blocks, each block quantized on write and
dequantized on read, and every query attends to the dequantized values: the semantics of a cache
whose prefill reads its context back from the cache (a request's logits do not depend on what was
cached). Keys can be read in bf16 ("dense"), always as a function of positions only: "own" = the
query's own block (the newest block, kept in a bf16 staging block until it completes, then
quantized with the whole block's statistics: what the simulation's whole-block statistics equal);
"sink" = the sequence's first block, kept in bf16 for good (the attention sink: Xiao et al. 2023).
Sliding-window layers (Gemma 3) keep their window, each layer its own query scaling.

The fp32 model generates --gen-tokens greedy tokens after each text prompt (benchmarks/real_model.py:
chat, code, prose, long context); each scheme is teacher-forced through them and compared position
by position with the fp32 cache: mean KL(fp32 || scheme), top-1 agreement, and, where top-1
differs, fp32's own top-1/top-2 logit gap (a flip at a gap < 0.05 is a near-tie).

Scheme names: K part + V part + dense blocks, e.g. "centred-channel + sink" (see SCHEMES). K parts:
- block-pow2: one power-of-two scale per (block, head) (the engine's fp8_e4m3_block); block: exact;
- token: one exact scale per (token, head);
- channel: one exact scale per (block, channel) (KIVI: Liu et al. 2024; KVQuant: Hooper et al. 2024);
- centred: minus the per-(block, channel) midpoint (KIVI's zero point; stored in fp8 under one
  scale per block), residual under one scale per block; centred-channel: residual scale per channel.
V is quantized per token unless the name says otherwise. The chosen scheme,
gpu_workers/model/kv_quant.py's, is "kv_quant" (its own functions, bit for bit): the engine's
default fp8_e4m3 (gpu_workers/model/kv_staged.py), which quantizes a block from its bf16 values
(tests/gpu_workers/model/test_kv_staged.py checks the engine against this simulation).
Writes JSON to benchmarks/results/kv_schemes-<timestamp>.json.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch

from benchmarks.common import log, write_results
from benchmarks.real_model import model_dir_of, text_prompts
from gpu_workers.model import kv_quant

BS = 16
TINY = 1e-30
E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2
NEAR_TIE = 0.05  # logits
GAP_BINS = (0.05, 0.1, 0.25, 0.5, float("inf"))


def fp8_round(x: torch.Tensor, fmt: torch.dtype, stochastic: bool = False) -> torch.Tensor:
    """``x`` rounded to fp8 ``fmt`` (saturating): to nearest even, or stochastically between the
    two neighbouring fp8 values (unbiased)."""
    fmax = torch.finfo(fmt).max
    x = x.clamp(-fmax, fmax)
    near = x.to(fmt).float()
    if not stochastic:
        return near
    a, sign = x.abs(), x.sign()
    code = a.to(fmt).view(torch.uint8).int()
    top = int(torch.tensor(fmax).to(fmt).view(torch.uint8))
    below = near.abs() > a  # nearest is above: the other neighbour is the code below
    other = torch.where(below, (code - 1).clamp(min=0), (code + 1).clamp(max=top)).to(torch.uint8).view(fmt).float()
    lo, hi = torch.minimum(near.abs(), other), torch.maximum(near.abs(), other)
    p_hi = torch.where(hi > lo, (a - lo) / (hi - lo).clamp(min=TINY), torch.zeros_like(a))
    return sign * torch.where(torch.rand_like(a) < p_hi, hi, lo)


@dataclass(frozen=True)
class Quant:
    """How a [B, H, nb, G, D] grouping of K or V is quantized: fp8 format, per-(group, channel)
    centre, what one scale covers, scales exact or powers of two (or fixed at 1.0: "tensor")."""

    scale: str = "token"  # "block", "channel", "token", "tensor"
    centre: str = ""  # "", "mid"
    pow2: bool = False
    fmt: torch.dtype = E4M3
    group: int = BS  # tokens per scale group
    stochastic: bool = False
    scale_bf16: bool = False  # scales stored as bf16 (rounded up) instead of fp32

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        b, h, t, d = x.shape
        g = self.group
        nb = -(-t // g)
        xb = x.new_zeros(b, h, nb * g, d)
        xb[:, :, :t] = x
        xb = xb.view(b, h, nb, g, d)
        valid = (torch.arange(nb * g) < t).view(1, 1, nb, g, 1)
        c = torch.zeros_like(xb[:, :, :, :1])
        if self.centre == "mid":
            big = torch.finfo(torch.float32).max
            c = (torch.where(valid, xb, big).amin(-2, keepdim=True) + torch.where(valid, xb, -big).amax(-2, keepdim=True)) / 2
            c = fp8_round(c / self._scale(c, (-1,)), self.fmt) * self._scale(c, (-1,))  # fp8 centres
        r = xb - c
        dims = {"block": (-1, -2), "channel": (-2,), "token": (-1,), "tensor": None}[self.scale]
        s = torch.ones(()) if dims is None else self._scale(r, dims)
        return ((fp8_round(r / s, self.fmt, self.stochastic) * s) + c).flatten(2, 3)[:, :, :t]

    def _scale(self, x: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
        s = (x.abs().amax(dims, keepdim=True) / torch.finfo(self.fmt).max).clamp(min=TINY)
        if self.pow2:
            return 2.0 ** torch.ceil(torch.log2(s))
        if self.scale_bf16:
            sb = s.bfloat16().float()
            return torch.where(sb < s, torch.nextafter(s.bfloat16(), torch.tensor(float("inf"), dtype=torch.bfloat16)).float(), sb)
        return s


def kv_quant_k(x: torch.Tensor) -> torch.Tensor:
    """K through gpu_workers/model/kv_quant.py, block by block (the last block partial)."""
    return kv_quant.fake_quantize(x, kv_quant.quantize_keys, kv_quant.dequantize_keys, BS)


def kv_quant_v(x: torch.Tensor) -> torch.Tensor:
    return kv_quant.fake_quantize(x, kv_quant.quantize_values, kv_quant.dequantize_values, BS)


def bf16(x: torch.Tensor) -> torch.Tensor:
    return x.bfloat16().float()


@dataclass(frozen=True)
class Scheme:
    k: Callable[[torch.Tensor], torch.Tensor]
    v: Callable[[torch.Tensor], torch.Tensor]
    dense: frozenset[str] = field(default_factory=frozenset)  # "own", "sink": read in bf16
    k_bytes: float = 0.0  # metadata bytes per (block, head) of K, beyond the codes
    v_bytes: float = 0.0
    itemsize: int = 1
    pre_rope: bool = False  # K quantized before RoPE (KVQuant), rotated on read


ROTARY: list[torch.nn.Module | None] = [None]  # the model's rotary embedding (pre-RoPE schemes, Llama only)


def rotate_back(k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(pre-RoPE keys, cos, sin) of post-RoPE keys [B, H, T, D] at positions 0..T-1 (Llama's
    rotate-half convention: RoPE by -angle undoes it)."""
    assert ROTARY[0] is not None
    cos, sin = ROTARY[0](k, torch.arange(k.shape[2])[None])  # [1, T, D]
    cos, sin = cos[:, None].float(), sin[:, None].float()
    return k * cos - rotate_half(k) * sin, cos, sin


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    a, b = x.chunk(2, dim=-1)
    return torch.cat((-b, a), dim=-1)


def _k(name: str) -> tuple[Callable[[torch.Tensor], torch.Tensor], float]:
    """(K quantizer, metadata bytes per (block, head) of head_dim 64) of a K part's name."""
    return {
        "block-pow2": (Quant("block", pow2=True), 4), "block": (Quant("block"), 4), "token": (Quant("token"), 64),
        "channel": (Quant("channel"), 256), "centred": (Quant("block", "mid"), 64 + 4 + 4),
        "centred-channel": (Quant("channel", "mid"), 64 + 4 + 256),
        "centred-channel-bf16": (Quant("channel", "mid", scale_bf16=True), 64 + 4 + 128),
        "centred-channel-pow2": (Quant("channel", "mid", pow2=True), 64 + 4 + 64),
        "centred-channel-g8": (Quant("channel", "mid", group=8), 2 * (64 + 4 + 256)),
        "centred-channel-sr": (Quant("channel", "mid", stochastic=True), 64 + 4 + 256),
        "centred-channel-e5m2": (Quant("channel", "mid", fmt=E5M2), 64 + 4 + 256),
        "kv_quant": (kv_quant_k, 0),
    }[name]


def scheme(name: str) -> Scheme:
    """The Scheme a name spells: "K part[ + v-block| + v-channel][ + own][ + sink]" or a plain format."""
    plain = {
        "fp32": Scheme(lambda x: x, lambda x: x, itemsize=4), "bf16": Scheme(bf16, bf16, itemsize=2),
        "fp8_e4m3 (block-pow2)": Scheme(Quant("block", pow2=True), Quant("block", pow2=True), k_bytes=4, v_bytes=4),
        "fp8_e5m2 (block-pow2)": Scheme(Quant("block", pow2=True, fmt=E5M2), Quant("block", pow2=True, fmt=E5M2),
                                        k_bytes=4, v_bytes=4),
        "per-tensor 1.0": Scheme(Quant("tensor"), Quant("tensor")),
    }
    if name in plain:
        return plain[name]
    parts = [p.strip() for p in name.split("+")]
    k, k_bytes = _k(parts[0])
    v, v_bytes = (kv_quant_v, 0.0) if parts[0] == "kv_quant" else (Quant("token"), 64.0)
    if "v-centred-channel" in parts:
        v, v_bytes = Quant("channel", "mid"), 64 + 4 + 256
    if "v-e5m2" in parts:
        v = Quant("token", fmt=E5M2)
    return Scheme(k, v, frozenset(p for p in parts if p in ("own", "sink")), k_bytes, v_bytes,
                  pre_rope="pre-rope" in parts)


SCHEMES = [
    "fp32", "bf16", "fp8_e4m3 (block-pow2)", "fp8_e5m2 (block-pow2)", "per-tensor 1.0",
    "block + own", "token + own", "channel + own", "centred + own", "centred + own + sink",
    "centred-channel + own", "centred-channel + own + sink", "centred-channel-bf16 + own + sink",
    "centred-channel-pow2 + own + sink", "centred-channel-g8 + own + sink", "centred-channel-sr + own + sink",
    "centred-channel + own + sink + v-centred-channel", "kv_quant + own + sink",
]
ACTIVE: list[Scheme | None] = [None]


def capacity(s: Scheme, head_dim: int, seq_len: int = 1024) -> float:
    """fp32 bytes over the scheme's bytes for one KV head of ``seq_len`` tokens: whole blocks, their
    metadata (given for head_dim 64, scaled by head_dim / 64), the dense blocks (the sink, the newest
    one in its staging area) in bf16 instead."""
    if s.k is kv_quant_k:
        return kv_quant.capacity_vs(BS, head_dim, seq_len, dense_blocks=len(s.dense))
    blocks = -(-seq_len // BS)
    per_block = 2 * BS * head_dim * s.itemsize + (s.k_bytes + s.v_bytes) * head_dim / 64
    total = (blocks - len(s.dense)) * per_block + len(s.dense) * 2 * BS * head_dim * 2
    return blocks * 2 * BS * head_dim * 4 / total


def attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
              attention_mask: torch.Tensor | None, scaling: float | None = None, sliding_window: int | None = None,
              **kwargs: object) -> tuple[torch.Tensor, None]:
    """Causal attention [B, T, H, D] over the active scheme's dequantized K/V ([B, H(kv), T, D] in)."""
    if ACTIVE[0] is None:  # the fp32 reference, and generation (queries fewer than keys there)
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling,
                                      sliding_window=sliding_window, **kwargs)
    s = ACTIVE[0]
    t = key.shape[2]
    group = query.shape[1] // key.shape[1]
    if s.pre_rope:
        raw, cos, sin = rotate_back(key.float())
        kr = s.k(raw)
        kq = kr * cos + rotate_half(kr) * sin
    else:
        kq = s.k(key.float())
    vq = s.v(value.float())
    k, v, kq, vq = (x.repeat_interleave(group, 1) for x in (bf16(key), bf16(value), kq, vq))
    pos = torch.arange(t)
    dense = torch.zeros(t, t, dtype=torch.bool)  # [query, key] read in bf16
    if "own" in s.dense:
        dense |= (pos[:, None] // BS) == (pos[None, :] // BS)
    if "sink" in s.dense:
        dense |= pos[None, :] < BS
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    scores = query @ kq.transpose(-1, -2)
    if dense.any():
        scores = torch.where(dense, query @ k.transpose(-1, -2), scores)
    hidden = pos[None, :] > pos[:, None]
    if sliding_window:
        hidden |= pos[None, :] <= pos[:, None] - sliding_window
    probs = (scores * scale).masked_fill(hidden, float("-inf")).softmax(-1)
    out = (probs * dense) @ v + (probs * ~dense) @ vq if dense.any() else probs @ vq
    return out.transpose(1, 2).contiguous(), None


def compare(ref: list[torch.Tensor], got: list[torch.Tensor]) -> dict[str, object]:
    """Mean/max KL(ref || got), top-1 agreement and the fp32 logit gaps of the flipped positions,
    of per-sequence log-probabilities [gen, vocab]."""
    kl = torch.cat([(r.exp() * (r - g)).sum(-1) for r, g in zip(ref, got)])
    agree = torch.cat([r.argmax(-1) == g.argmax(-1) for r, g in zip(ref, got)])
    gaps = torch.cat([r.topk(2, dim=-1).values.diff(dim=-1)[:, 0].neg() for r in ref])[~agree]
    return {"mean_kl": kl.mean().item(), "max_kl": kl.max().item(), "top1_agreement": agree.double().mean().item(),
            "flipped": int((~agree).sum()), "positions": agree.numel(),
            "flipped_gaps": sorted(round(g, 3) for g in gaps.tolist())}


def gap_histogram(gaps: list[float]) -> str:
    lo, out = 0.0, []
    for hi in GAP_BINS:
        out.append(f"<{hi:g}:{sum(lo <= g < hi for g in gaps)}" if hi != float("inf") else f">={lo:g}:{sum(g >= lo for g in gaps)}")
        lo = hi
    return " ".join(out)


def run(model_dir: Path, names: list[str], gen: int) -> dict[str, object]:
    """Each named scheme against the fp32 cache on ``model_dir``'s text prompts, ``gen`` tokens each."""
    import transformers
    from transformers import AttentionInterface

    torch.set_grad_enabled(False)
    torch.set_num_threads(1)  # (a shared, loaded machine: one thread each)
    AttentionInterface.register("kv_schemes", attention)
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype="float32",
                                                              attn_implementation="kv_schemes").eval()
    ROTARY[0] = getattr(model.model, "rotary_emb", None)
    head_dim = getattr(model.config, "head_dim", None) or model.config.hidden_size // model.config.num_attention_heads
    prompts = [ids for _, ids in text_prompts(model_dir)]
    saved = model_dir / f"kv_schemes-greedy-{gen}.pt"  # the fp32 generations, kept with the model
    seqs: list[torch.Tensor] = torch.load(saved) if saved.exists() else []
    if [s[: len(ids)].tolist() for s, ids in zip(seqs, prompts)] != prompts or len(seqs) != len(prompts):
        seqs = []
        for ids in prompts:
            ids_t = torch.tensor([ids])
            out = model.generate(ids_t, attention_mask=torch.ones_like(ids_t), max_new_tokens=gen,
                                 min_new_tokens=gen, do_sample=False)
            seqs.append(out[0])
        torch.save(seqs, saved)
    log(f"generated {len(seqs)} x {gen} tokens (prompts of {[len(s) - gen for s in seqs]} tokens)")

    def logprobs() -> list[torch.Tensor]:  # [gen, vocab] per sequence: the positions that predict generated tokens
        return [model(s[None], logits_to_keep=gen + 1).logits[0, :-1].double().log_softmax(-1) for s in seqs]

    ref = logprobs()
    rows: dict[str, object] = {}
    print(f"{'scheme':<52} {'mean KL':>9} {'max KL':>9} {'top-1':>7} {'flips':>5} {'cap/fp32':>8}  flipped fp32 gaps (logits)")
    for name in names:
        started = time.perf_counter()
        torch.manual_seed(0)  # (stochastic rounding)
        ACTIVE[0] = scheme(name)
        row = compare(ref, logprobs())
        ACTIVE[0] = None
        row["capacity_vs_fp32_at_1024"] = round(capacity(scheme(name), head_dim), 3)
        rows[name] = row
        log(f"{name}: {time.perf_counter() - started:.0f}s")
        print(f"{name:<52} {row['mean_kl']:>9.2e} {row['max_kl']:>9.2e} {row['top1_agreement']:>7.2%} {row['flipped']:>5} "
              f"{row['capacity_vs_fp32_at_1024']:>8.2f}  {gap_histogram(row['flipped_gaps'])}", flush=True)  # type: ignore[arg-type]
    return {"prompts": len(seqs), "gen_tokens": gen, "block_size": BS, "head_dim": head_dim, "schemes": rows}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a checkpoint directory or a .gguf file")
    parser.add_argument("--gen-tokens", type=int, default=128)
    parser.add_argument("--schemes", default=",".join(SCHEMES), help="comma-separated, e.g.: " + ", ".join(SCHEMES))
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    result = run(model_dir_of(Path(args.model)), args.schemes.split(","), args.gen_tokens)
    write_results({"benchmark": "kv_schemes", "model": args.model, **result}, "kv_schemes", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
