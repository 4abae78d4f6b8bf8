"""The engine's only door to torch: one ``run`` per step turns chunks of sequences into logits.

The scheduler decides what each sequence computes this step (a ``Chunk``: new tokens, how many of
its tokens are already cached, its block table); ``ModelRunner.run`` has them flattened into one
unpadded batch of tokens with the step's attention metadata (gpu_workers.step_inputs), runs the
model, and returns fp32 logits for the chunks that end at a sequence's last token. The runner owns
the model, its KV cache and the decode backends chosen once for that cache
(gpu_workers.model.decode_backends).

A runner built with ``kv_groups`` (gpu_workers.kv_cache_groups.KVCacheGroups, as the engine builds it)
keeps each group's layers in blocks of their own: chunks then carry interleaved block tables, and
every group gets its own view of the step. Without, one group holds every layer in every block.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from broker.errors import ConfigError
from gpu_workers.kv_cache_groups import KVCacheGroups
from gpu_workers.model.compilation import INDUCTOR_OPTIONS
from gpu_workers.model.config import ModelConfig, load_config
from gpu_workers.model.decode_backends import DecodeBackends
from gpu_workers.model.families import model_class
from gpu_workers.model.kv_cache import KVCache
from gpu_workers.model.kv_format import KVFormat, kv_format
from gpu_workers.model.kv_staged import StagedKVCache
from gpu_workers.model.layers import TPContext
from gpu_workers.model.loader import load_weights
from gpu_workers.startup import phase
from gpu_workers.step_inputs import Chunk, StepBuilder

__all__ = ["CPU_DECODE_GROUP_TOKENS", "Chunk", "ModelRunner"]

log = logging.getLogger(__name__)

# Decode attention gathers each group's K/V into one buffer; on CPUs groups of about this many
# (padded) context tokens keep that buffer in cache (measured on random:small, fp32).
CPU_DECODE_GROUP_TOKENS = 4096


class ModelRunner:
    """A loaded model and its KV cache on one device (one tensor-parallel rank)."""

    def __init__(
        self,
        model_dir: Path,
        *,
        num_blocks: int | None,
        block_size: int = 16,
        kv_dtype: str | KVFormat = "fp32",
        dtype: torch.dtype | None = None,
        device: str = "cpu",
        tp: TPContext | None = None,
        decode_group_tokens: int | None = None,
        kv_groups: KVCacheGroups | None = None,
    ) -> None:
        """``num_blocks``: KV cache blocks, or None to size the cache later (``allocate_kv_cache``),
        once the loaded weights show how much memory is left. ``decode_group_tokens``: most padded
        context tokens per decode attention group (None: CPU_DECODE_GROUP_TOKENS on CPUs, all
        decodes in one group on GPUs). ``kv_groups``: which layers share a block (default: all)."""
        kv = kv_format(kv_dtype)  # ConfigError for an unknown name, before the model loads
        self.device = torch.device(device)
        # bf16 matmuls are 2-3x slower than fp32 on the project's CPUs
        self.dtype = dtype or (torch.float32 if self.device.type == "cpu" else torch.bfloat16)
        self.tp = tp or TPContext()
        self.block_size = block_size
        self.decode_group_tokens = decode_group_tokens or (
            CPU_DECODE_GROUP_TOKENS if self.device.type == "cpu" else None
        )
        self.config: ModelConfig = load_config(Path(model_dir))
        layer_windows = [self.config.layer_window(i) for i in range(self.config.num_hidden_layers)]
        self.kv_groups = kv_groups or KVCacheGroups.single(layer_windows)
        if sorted(i for g in self.kv_groups.layers for i in g) != list(range(len(layer_windows))):
            raise ConfigError(f"KV cache groups {self.kv_groups.layers} do not list each of the model's "
                              f"{len(layer_windows)} layers once")
        where = f"{model_dir}, rank {self.tp.rank} of {self.tp.size}" if self.tp.size > 1 else str(model_dir)
        with phase("load", where):
            with torch.device(self.device):
                self.model = model_class(self.config)(self.config, self.tp, self.dtype)
            self.model.place_kv_cache(self.kv_groups)
            load_weights(self.model, Path(model_dir))
        with phase("pack"):
            self.model.pack_weights()
        self.kv_format = kv
        self.kv_dtype = kv.name
        self.kv_cache: KVCache
        self.decode_backends: DecodeBackends
        self._steps: StepBuilder
        if num_blocks is not None:
            self.allocate_kv_cache(num_blocks)

    def allocate_kv_cache(self, num_blocks: int, num_dense_blocks: int | None = None) -> None:
        """The KV cache of ``num_blocks`` blocks (once, before the first ``run``); a staged format
        (gpu_workers.model.kv_staged) adds ``num_dense_blocks`` bf16 blocks, ids ``num_blocks`` on
        (None: as many as ``num_blocks``)."""
        dense = (num_blocks if num_dense_blocks is None else num_dense_blocks) if self.kv_format.staged else 0
        what = f" and {dense} bf16 blocks" if dense else ""
        with phase("KV allocation", f"{num_blocks} blocks{what} of {self.block_size} tokens, {self.kv_dtype}"):
            self.use_kv_cache(self._new_kv_cache(num_blocks, dense))

    def use_kv_cache(self, cache: KVCache) -> None:
        """Run steps over ``cache`` (one of this runner's shape), read by the decode backends chosen
        for it now, once (gpu_workers.model.decode_backends)."""
        self.kv_cache = cache
        self.decode_backends = DecodeBackends.choose(
            cache, queries_per_kv_head=self.config.heads_per_rank(self.tp.size) // cache.num_kv_heads,
            group_tokens=self.decode_group_tokens,
        )
        self._steps = StepBuilder(self.config, block_size=self.block_size, kv_groups=self.kv_groups,
                                  backends=self.decode_backends, device=self.device)

    def compile(self, options: dict[str, Any] | None = None) -> bool:
        """Run the decoder layers as one ``torch.compile`` graph from now on
        (gpu_workers.model.compilation), compiled here, once the KV cache is allocated: a step of
        one token and one of two (the graph for any larger step) write into block 0, which no
        sequence holds yet. ``options``: inductor's (default ``INDUCTOR_OPTIONS``). Only one CPU
        rank compiles (False: this runner stays eager)."""
        if self.device.type != "cpu" or self.tp.size > 1:
            log.info("compilation: eager (the compiled decoder runs on one CPU rank only)")
            return False
        if self.kv_format.staged:
            log.info("compilation: eager (the staged %s KV cache is not compiled yet; "
                     "--kv-dtype fp32, bf16 or fp8_e4m3_block compile)", self.kv_dtype)
            return False
        with phase("compile", "torch.compile, inductor C++: the decoder layers, for 1 token and for more"):
            self.model.compile(INDUCTOR_OPTIONS if options is None else options)
            table = [0] * self.kv_groups.num_groups
            for n in (1, 2):
                self.run([Chunk([0], 0, table, want_logits=True)] * n)
        return True

    def _new_kv_cache(self, num_blocks: int, num_dense_blocks: int) -> KVCache:
        shape: dict[str, Any] = {
            "num_layers": self.kv_groups.layers_per_block, "num_blocks": num_blocks, "block_size": self.block_size,
            "num_kv_heads": self.config.kv_heads_per_rank(self.tp.size), "head_dim": self.config.head_dim,
            "kv_dtype": self.kv_format, "dtype": self.dtype, "device": self.device,
        }
        if self.kv_format.staged:
            return StagedKVCache(num_dense_blocks=num_dense_blocks, **shape)
        return KVCache(**shape)

    def run(self, chunks: list[Chunk], *, greedy: bool = False) -> torch.Tensor:
        """fp32 logits [n, vocab] of the chunks with ``want_logits``, in the order given; a chunk
        with ``all_logits`` gives a row for each of its tokens instead (its last one included).
        ``greedy``: the caller needs only each row's argmax (no chunk has ``all_logits``); where the
        model can give it without the logits (``greedy_tokens``), the token ids [n] (int64) instead.

        Chunks may come in any order, one per sequence; each writes its tokens' K/V into its blocks.
        """
        with torch.inference_mode():
            if not chunks:
                return torch.empty(0, self.config.vocab_size, device=self.device)
            step = self._steps.build(chunks)
            hidden = self.model(step.input_ids, step.positions, step.batch, self.kv_cache)  # [T, hidden]
            rows = hidden.index_select(0, step.logit_rows)
            if greedy and (tokens := self.model.greedy_tokens(rows)) is not None:
                return tokens
            return self.model.compute_logits(rows)

    def release(self, request_id: str) -> None:
        """A sequence is gone for good. One rank keeps no per-sequence state: nothing to forget."""

    def check(self) -> None:
        """Raise ``EngineFailed`` once steps can no longer run; one rank alone always can."""

    def close(self) -> None:
        """Nothing to stop on one rank."""

    def weight_bytes(self) -> int:
        """Bytes of this rank's weights: parameters (a tied LM head counted once) and packed copies."""
        return sum(p.numel() * p.element_size() for p in self.model.parameters()) + self.model.packed_bytes()
