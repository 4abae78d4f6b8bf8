"""A real 2-rank gloo group (two processes) through LlamaEngine: greedy tokens identical to one
process and to transformers, logits close at every step, on configs that shard differently:
one KV head replicated on both ranks (with tied embeddings and an odd vocabulary, so the last
rank's vocabulary shard is padded), 3 query heads per rank sharing their one KV head (Qwen2, q/k/v
bias), 2 KV heads per rank with attention and MLP biases and head_dim 24, and the Qwen3 (q/k norms),
Phi-3 (fused tensors split per rank) and Gemma 3 families with sliding windows shorter than the
sequences (Qwen3's and Gemma 3's beside global layers: two KV cache groups in one interleaved table). The KV cache is small enough that sequences are preempted and recomputed, so block tables
change under the followers."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from gpu_workers.llm_engine import LlamaEngine
from gpu_workers.model import panel_matmul
from gpu_workers.model.config import load_config
from gpu_workers.model.kv_cache import kv_bytes_per_token
from gpu_workers.rank import BLOCK_SIZE, kv_cache_groups
from tests.gpu_workers.model.hf_models import assert_close
from tests.gpu_workers.parallel.tp_leader import options, run_greedy
from tests.gpu_workers.reference import MIN_MARGIN, hf_greedy, save_hf_model

pytestmark = [pytest.mark.integration, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[3]
NEW_TOKENS = 12
KV_BLOCKS = 7  # 112 token slots for 4 prompts of up to 60 tokens + 12 each: preemptions
# Where sliding and global layers mix, each kind keeps blocks of its own (two KV cache groups) and the
# sliding one gives back what falls out of its window: 7 blocks' memory would hold every sequence.
HYBRID_KV_BLOCKS = 5

CONFIGS: dict[str, dict[str, Any]] = {
    "llama-mqa-kv-replicated-tied-odd-vocab": {"family": "llama", "seed": 4, "num_key_value_heads": 1,
                                               "tie_word_embeddings": True, "vocab_size": 321},
    "qwen2-6-heads-2-kv": {"family": "qwen2", "seed": 5, "hidden_size": 96, "num_attention_heads": 6,
                           "num_key_value_heads": 2},
    "llama-mha-bias-headdim24": {"family": "llama", "seed": 6, "num_key_value_heads": 4, "head_dim": 24,
                                 "attention_bias": True, "mlp_bias": True},
    "qwen3-qk-norm-bias-window16": {"family": "qwen3", "seed": 7, "num_key_value_heads": 2, "attention_bias": True,
                                    "use_sliding_window": True, "sliding_window": 16, "max_window_layers": 1},
    "phi3-fused-window20": {"family": "phi3", "seed": 7, "num_key_value_heads": 2, "sliding_window": 20},
    "gemma3-mqa-window16": {"family": "gemma3", "seed": 8, "num_key_value_heads": 1, "head_dim": 16,
                            "sliding_window": 16, "layer_types": ["sliding_attention", "full_attention"]},
}


def prompts() -> list[list[int]]:
    rng = random.Random(11)
    shared = [rng.randrange(320) for _ in range(20)]
    return [[rng.randrange(320) for _ in range(n)] for n in (3, 33, 60)] + [shared + [rng.randrange(320) for _ in range(9)]]


def kv_blocks(model_dir: Path) -> int:
    """Blocks of every layer the cache holds (each a block per KV cache group): few enough to preempt."""
    return HYBRID_KV_BLOCKS if kv_cache_groups(load_config(model_dir)).num_groups > 1 else KV_BLOCKS


def kv_memory(model_dir: Path, tp: int) -> int:
    """Per-rank bytes for exactly ``kv_blocks`` blocks: the same cache, so the same schedule, at any tp."""
    return kv_bytes_per_token(load_config(model_dir), "fp32", tp) * BLOCK_SIZE * kv_blocks(model_dir)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, dict[str, Any]]]:
    """Each config's model directory and what the 2-rank group made of it (one leader process for all)."""
    root = tmp_path_factory.mktemp("tp-parity")
    dirs = {name: save_hf_model(root / name, **cfg) for name, cfg in CONFIGS.items()}
    job = {"tp": 2, "models": [
        {"dir": str(d), "kv_memory": kv_memory(d, 2), "prompts": prompts(), "max_tokens": NEW_TOKENS,
         "batched_tokens": 32}
        for d in dirs.values()
    ]}
    (root / "job.json").write_text(json.dumps(job))
    # These models' weights straddle the size from which panels are packed (a rank's shard may fall
    # below it while the whole weight is above), which would break the byte accounting checked below:
    # the ranks, and the one-process reference there, keep them dense (oneDNN's threshold is above them).
    env = {**os.environ, "RYZ_CPU_MATMUL": "onednn"}
    done = subprocess.run([sys.executable, "-m", "tests.gpu_workers.parallel.tp_leader", str(root / "job.json"),
                           str(root / "out.pt")], cwd=ROOT, capture_output=True, text=True, timeout=240, check=False,
                          env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    results = torch.load(root / "out.pt")
    return {name: (d, r) for (name, d), r in zip(dirs.items(), results)}


@pytest.fixture
def one_thread() -> Iterator[None]:
    """The in-process references on one thread: two threads on two busy cores can be ten times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("name", list(CONFIGS))
def test_two_ranks_match_one_process_and_transformers(runs: dict[str, tuple[Path, dict[str, Any]]], name: str) -> None:
    model_dir, tp2 = runs[name]
    model = {"kv_memory": kv_memory(model_dir, 1), "batched_tokens": 32}
    single = LlamaEngine(model_dir, name="tp1", options=options(model))
    tp1 = run_greedy(single, prompts(), NEW_TOKENS)
    reference = hf_greedy(model_dir, prompts(), NEW_TOKENS)
    assert reference.min_margin >= MIN_MARGIN, f"reference has a near-tie ({reference.min_margin:.2e})"

    assert tp2["tp"] == 2 and tp2["follower_codes"] == [0]
    assert tp2["capacity"] == single.stats().kv_capacity_tokens == kv_blocks(model_dir) * BLOCK_SIZE
    assert tp2["preemptions"] == tp1["preemptions"] > 0
    assert tp2["tokens"] == tp1["tokens"] == reference.tokens
    assert len(tp2["logits"]) == len(tp1["logits"])
    for step, (a, b) in enumerate(zip(tp2["logits"], tp1["logits"], strict=True)):
        assert a.shape == b.shape
        assert_close(a, b, rel=1e-5, what=f"{name} step {step}")


def test_each_rank_holds_its_share(runs: dict[str, tuple[Path, dict[str, Any]]],
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Weights: the sharded parts halve, norms are replicated; KV: each rank holds only its heads
    (half of them when they split, the one head when it is replicated)."""
    monkeypatch.setattr(panel_matmul, "load", lambda: None)  # dense, as the ranks (``runs``)
    for name, (model_dir, tp2) in runs.items():
        config = load_config(model_dir)
        single = LlamaEngine(model_dir, name="tp1", options=options({"kv_memory": kv_memory(model_dir, 1),
                                                                        "batched_tokens": 32}))
        whole = single.ranks[0].weight_bytes
        ranks = tp2["ranks"]
        assert [r["rank"] for r in ranks] == [0, 1]
        norms_per_layer = 4 if config.model_type == "gemma3_text" else 2  # Gemma: pre and post norms
        norms = 4 * config.hidden_size * (norms_per_layer * config.num_hidden_layers + 1)
        norms += 4 * 2 * config.head_dim * config.num_hidden_layers * config.qk_norm  # q/k norms
        kv_dup = 0 if config.num_key_value_heads >= 2 else 2 * config.num_hidden_layers * config.head_dim * config.hidden_size * 4
        row_bias = config.num_hidden_layers * config.hidden_size * 4 * (config.o_bias + config.mlp_bias)  # whole on each rank
        padding = (-config.vocab_size % 2) * config.hidden_size * 4 * (1 if config.tie_word_embeddings else 2)
        assert sum(r["weight_bytes"] for r in ranks) == whole + norms + kv_dup + row_bias + padding, name
        assert tp2["kv_heads"] == max(1, config.num_key_value_heads // 2)
        assert all(r["kv_bytes"] == kv_blocks(model_dir) * BLOCK_SIZE * kv_bytes_per_token(config, "fp32", 2)
                   for r in ranks)
        assert all(r["load_s"] > 0 and r["peak_rss_bytes"] > 0 for r in ranks)
