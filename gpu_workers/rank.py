"""One rank of the Llama-family engine: its options, its model runner (its shards of the weights and
the KV blocks every rank of the group agrees on), and what it reports once loaded. The leader
(gpu_workers.llm_engine) and the followers (gpu_workers.parallel.follower) build theirs here alike,
so that their collectives pair up.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from pathlib import Path

import torch

from broker.errors import ConfigError
from gpu_workers.kv_cache_groups import KVCacheGroups
from gpu_workers.kv_memory import kv_budget_bytes
from gpu_workers.model.compilation import CompilationLevel
from gpu_workers.model.config import ModelConfig, load_config
from gpu_workers.model.kv_cache import kv_bytes_per_block
from gpu_workers.model.kv_format import KVFormat, kv_format
from gpu_workers.model.kv_staged import dense_pool_blocks
from gpu_workers.model_runner import ModelRunner
from gpu_workers.parallel.launch import RankReport, TensorParallelGroup, peak_rss_bytes

BLOCK_SIZE = 16  # tokens per KV cache block


@dataclass(frozen=True, slots=True)
class LlamaEngineOptions:
    kv_dtype: KVFormat | str = "fp8_e4m3"  # a name is parsed into its KVFormat here, once
    kv_memory: str | None = None  # "2GiB", "500MB", a byte count, or None for a share of free memory
    device: str = "cpu"
    dtype: torch.dtype | None = None  # None: fp32 on CPU, bf16 on CUDA
    max_num_seqs: int = 128
    max_num_batched_tokens: int = 512  # per-step token budget (chunked prefill)
    prefix_caching: bool = True
    # vLLM's CompilationConfig.level: 0 eager (--enforce-eager), 3 the decoder layers compiled by
    # torch.compile (gpu_workers.model.compilation; one CPU rank only, others stay eager)
    compilation_level: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "kv_dtype", kv_format(self.kv_dtype))  # ConfigError for an unknown name

    @property
    def kv(self) -> KVFormat:
        assert isinstance(self.kv_dtype, KVFormat)
        return self.kv_dtype


def build_runner(model_dir: Path, options: LlamaEngineOptions, *, tp: TensorParallelGroup | None) -> ModelRunner:
    """This rank's model runner (its shards of the weights), with as many KV blocks as the tightest
    rank's budget holds: every rank of a group must have the same blocks, since block tables are shared.
    The budget is read once the weights are loaded, so a share of free memory leaves theirs alone.
    Followers call this too, with the same options, so the ranks' collectives pair up."""
    config = load_config(model_dir)
    size = tp.size if tp is not None else 1
    groups = kv_cache_groups(config)
    # the real size of a block (one KV cache group's layers), fp8 scales included: kv_capacity_tokens
    # is what the memory holds
    bytes_per_block = kv_bytes_per_block(config, options.kv, block_size=BLOCK_SIZE, tp_size=size) // groups.num_groups
    # Never more blocks than every sequence at full length could use.
    most = options.max_num_seqs * groups.peak_blocks(config.max_context, BLOCK_SIZE,
                                                     chunk=options.max_num_batched_tokens)
    local_ranks = tp.local_size if tp else 1
    # a staged format (gpu_workers.model.kv_staged): bf16 blocks for every sequence's sink and staging
    # block, per group, out of the same budget
    dense_bytes = (config.num_hidden_layers * 2 * config.kv_heads_per_rank(size)
                   * options.kv.dense_bytes_per_head_block(BLOCK_SIZE, config.head_dim)) // groups.num_groups

    def dense_blocks(budget: int) -> int:
        if not options.kv.staged:
            return 0
        return dense_pool_blocks(budget, dense_bytes, num_groups=groups.num_groups, max_num_seqs=options.max_num_seqs)

    def blocks() -> tuple[int, int]:
        """(blocks, dense blocks) the budget holds."""
        budget = kv_budget_bytes(options.kv_memory, device=options.device, ranks_on_host=local_ranks)
        dense = dense_blocks(budget)
        return min((budget - dense * dense_bytes) // bytes_per_block, most), dense

    def check(num_blocks: int) -> None:
        if num_blocks < groups.num_groups:
            budget = f"--kv-memory {options.kv_memory!r}" if options.kv_memory else "the free memory's share"
            what = "no KV block" if groups.num_groups == 1 else f"fewer than {groups.num_groups} KV blocks (one per group)"
            raise ConfigError(f"{budget} holds {what} of {BLOCK_SIZE} tokens ({bytes_per_block} bytes per rank "
                              f"with kv dtype {options.kv_dtype})")

    if options.kv_memory is not None:
        check(blocks()[0])  # a size that holds nothing fails before minutes of loading
    runner = ModelRunner(
        model_dir, num_blocks=None, block_size=BLOCK_SIZE, kv_dtype=options.kv,
        dtype=options.dtype, device=tp.device if tp is not None else options.device,
        tp=tp.context if tp is not None else None, kv_groups=groups,
    )
    num_blocks, num_dense = blocks()  # a share of free memory is measured now, with the weights loaded
    if tp is not None:
        num_blocks = tp.agree_min(num_blocks)  # every rank, before any of them can refuse
        num_dense = tp.agree_min(num_dense)
    check(num_blocks)
    runner.allocate_kv_cache(num_blocks, num_dense)
    if options.compilation_level >= CompilationLevel.PIECEWISE:
        runner.compile()
    return runner


def kv_cache_groups(config: ModelConfig) -> KVCacheGroups:
    """The engine's KV cache groups: layers of each attention kind in blocks of their own, so that
    sliding-window layers keep only their window's blocks beside global ones (Gemma 3)."""
    return KVCacheGroups.of([config.layer_window(i) for i in range(config.num_hidden_layers)])


def rank_report(runner: ModelRunner, tp: TensorParallelGroup | None, *, load_s: float) -> RankReport:
    """What this rank holds, once loaded."""
    cache = runner.kv_cache
    return RankReport(
        rank=tp.rank if tp is not None else 0, host=socket.gethostname(), pid=os.getpid(),
        weight_bytes=runner.weight_bytes(), kv_bytes=cache.nbytes(),
        load_s=round(load_s, 3), peak_rss_bytes=peak_rss_bytes(),
    )
