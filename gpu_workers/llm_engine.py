"""The Llama-family engine: scheduler, paged KV cache, model runner and sampler behind ``Engine``.

Each ``step`` asks the scheduler which tokens to compute (every running decode, then prefill chunks
under the token budget), runs them through the model in one flattened batch, samples one token for
every sequence that reached its last token, and reports those tokens. Stop strings, detokenization
and Redis stay in the group loop (gpu_workers.group); this module only turns requests into tokens.
"""

from __future__ import annotations

import logging
import os
import random
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from broker.chat import PLAIN_CHAT_TEMPLATE
from broker.errors import ConfigError
from broker.protocol import SamplingParams
from gpu_workers.block_manager import BlockManager, KVCacheGroups
from gpu_workers.engine import EngineInfo, EngineRequest, EngineStats, StepOutput
from gpu_workers.hf_tokenizer import load_tokenizer
from gpu_workers.kv_memory import kv_budget_bytes
from gpu_workers.logits_processors import RowContext, bad_words_token_ids
from gpu_workers.model.config import ModelConfig, load_config
from gpu_workers.model.kv_cache import kv_bytes_per_block
from gpu_workers.model_runner import Chunk, ModelRunner
from gpu_workers.parallel.launch import RankReport, TensorParallelGroup, peak_rss_bytes
from gpu_workers.parallel.runner import LeaderRunner
from gpu_workers.sampler import sample_with_logprobs
from gpu_workers.scheduler import Scheduler, SchedulerConfig
from gpu_workers.sequence import Sequence

log = logging.getLogger(__name__)

BLOCK_SIZE = 16
SEED_MASK = (1 << 63) - 1


@dataclass(frozen=True, slots=True)
class LlamaEngineOptions:
    kv_dtype: str = "fp8_e4m3"
    kv_memory: str | None = None  # "2GiB", "500MB", a byte count, or None for a share of free memory
    device: str = "cpu"
    dtype: torch.dtype | None = None  # None: fp32 on CPU, bf16 on CUDA
    max_num_seqs: int = 128
    max_num_batched_tokens: int = 512  # per-step token budget (chunked prefill)
    prefix_caching: bool = True


@dataclass(slots=True)
class _RequestState:
    """What the engine keeps per request besides its Sequence."""

    sampling: SamplingParams
    seed: int  # the request's seed, or one drawn at admission: sampling depends on (seed, token index)
    max_total_tokens: int  # prompt + every generated token (those made elsewhere included), at most
    stop_ids: frozenset[int]  # the ids that end it (EOS unless ignore_eos, stop_token_ids); masked before min_tokens
    bad_words_ids: tuple[tuple[int, ...], ...]  # bad_words, tokenized


class LlamaEngine:
    def __init__(
        self,
        model_dir: Path,
        *,
        name: str,
        options: LlamaEngineOptions = LlamaEngineOptions(),
        clock: Callable[[], float] = time.monotonic,
        tp: TensorParallelGroup | None = None,
    ) -> None:
        """``tp``: this process's tensor-parallel group, of which it is the leader (rank 0); None:
        one process holds the whole model."""
        started = time.perf_counter()
        self.config = load_config(model_dir)
        specials = load_tokenizer(model_dir, vocab_size=self.config.vocab_size)
        has_tokenizer_json = (Path(model_dir) / "tokenizer.json").is_file()
        self.tokenizer = specials.tokenizer
        self._clock = clock

        runner = build_runner(model_dir, options, tp=tp)
        num_blocks = runner.kv_cache.num_blocks
        model_len = self.config.max_context
        report = rank_report(runner, tp, load_s=time.perf_counter() - started)
        self.ranks = tp.gather_reports(report) if tp is not None else [report]
        for r in self.ranks:
            log.info(
                "rank %d (pid %d on %s): weights %.1f MiB, KV cache %.1f MiB, loaded in %.1fs, peak RSS %.1f MiB",
                r.rank, r.pid, r.host, r.weight_bytes / 2**20, r.kv_bytes / 2**20, r.load_s, r.peak_rss_bytes / 2**20,
            )
        # rank 0 tells the other ranks what to compute each step (only once all have started)
        self.runner: ModelRunner | LeaderRunner = LeaderRunner(runner, tp) if tp is not None else runner
        self.blocks = BlockManager(num_blocks, BLOCK_SIZE, prefix_caching=options.prefix_caching,
                                   groups=runner.kv_groups)
        self.scheduler = Scheduler(self.blocks, SchedulerConfig(
            max_num_seqs=options.max_num_seqs, max_num_batched_tokens=options.max_num_batched_tokens,
        ))
        longest = self.blocks.longest_sequence(options.max_num_batched_tokens)
        capacity = self.blocks.capacity_tokens
        self.info = EngineInfo(
            model=name,
            vocab_size=self.config.vocab_size,
            # One request alone always fits in the cache, so the scheduler can always finish it.
            max_context=model_len if longest is None else min(model_len, longest),
            eos_token_ids=frozenset(specials.eos_token_ids),
            tp=tp.size if tp is not None else 1,
            kv_dtype=options.kv_dtype,
            rank_weight_bytes=tuple(r.weight_bytes for r in self.ranks),
            rank_kv_bytes=tuple(r.kv_bytes for r in self.ranks),
            # a model without a tokenizer.json (random:<preset>) speaks bytes: the plain byte template
            chat_template=specials.chat_template or (None if has_tokenizer_json else PLAIN_CHAT_TEMPLATE),
            bos_token=specials.bos_token,
            eos_token=specials.eos_token,
        )
        self._requests: dict[str, _RequestState] = {}
        log.info(
            "engine %s ready in %.1fs: %d KV blocks of %d layers (%d tokens of every layer, %.1f MiB per "
            "rank, %s), max context %d", name, time.perf_counter() - started, num_blocks,
            runner.kv_groups.layers_per_block, capacity, runner.kv_cache.bytes_per_block() * num_blocks / 2**20,
            options.kv_dtype, self.info.max_context,
        )

    # --- Engine protocol -------------------------------------------------------------------------

    def add(self, request: EngineRequest) -> None:
        sampling = request.sampling
        seed = sampling.seed if sampling.seed is not None else random.getrandbits(63)
        tokens = [*request.prompt_ids, *request.output_ids]
        max_total = min(len(request.prompt_ids) + sampling.max_tokens, self.info.max_context)
        stop_ids = (frozenset() if sampling.ignore_eos else self.info.eos_token_ids) | frozenset(sampling.stop_token_ids)
        bad_words = bad_words_token_ids(sampling.bad_words, self.tokenizer) if sampling.bad_words else ()
        self._requests[request.request_id] = _RequestState(sampling, seed & SEED_MASK, max_total, stop_ids,
                                                           bad_words)
        self.scheduler.add(Sequence(
            request_id=request.request_id,
            token_ids=tokens,
            num_prompt_tokens=len(request.prompt_ids),
            priority=request.priority,
            arrival=self._clock(),
            deadline=request.deadline,
            max_num_tokens=max_total,
        ))

    def abort(self, request_id: str) -> None:
        if self._requests.pop(request_id, None) is not None:
            self.scheduler.abort(request_id)
            self.runner.release(request_id)

    def step(self) -> list[StepOutput]:
        plan = self.scheduler.schedule(self._clock())
        if not plan.chunks:
            return []
        chunks = [
            Chunk(
                token_ids=c.seq.token_ids[c.start : c.start + c.num_tokens],
                start=c.start,
                block_table=c.seq.block_table,
                want_logits=c.samples,
                seq=c.seq,
            )
            for c in plan.chunks
        ]
        logits = self.runner.run(chunks)
        sampled_seqs = [c.seq for c in plan.chunks if c.samples]
        states = [self._requests[s.request_id] for s in sampled_seqs]
        sampled = sample_with_logprobs(
            logits,
            [st.sampling for st in states],
            seeds=[st.seed for st in states],
            steps=[s.num_tokens - s.num_prompt_tokens for s in sampled_seqs],
            contexts=[RowContext(s.token_ids, s.num_prompt_tokens, st.stop_ids, st.bad_words_ids)
                      for s, st in zip(sampled_seqs, states)],
            top_logprobs=[st.sampling.top_logprobs if st.sampling.logprobs else None for st in states],
        ) if sampled_seqs else None
        tokens = sampled.token_ids if sampled is not None else []
        logprobs = sampled.logprobs if sampled is not None else []
        self.scheduler.postprocess(plan, {s.request_id: t for s, t in zip(sampled_seqs, tokens)})

        outputs = []
        for seq, state, token, token_logprobs in zip(sampled_seqs, states, tokens, logprobs):
            finish = None
            if token in state.stop_ids:
                finish = "stop"
            elif seq.num_tokens >= state.max_total_tokens:
                finish = "length"
            if finish is not None:
                self._requests.pop(seq.request_id, None)
                self.scheduler.finish(seq.request_id)
                self.runner.release(seq.request_id)
            outputs.append(StepOutput(seq.request_id, token, finish, token_logprobs))
        return outputs

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    def not_started(self) -> list[str]:
        return self.scheduler.not_started()

    def stats(self) -> EngineStats:
        self.runner.check()  # a group that lost a rank must not report itself alive
        return EngineStats(
            running=self.scheduler.num_running,
            waiting=self.scheduler.num_waiting,
            kv_capacity_tokens=self.blocks.capacity_tokens,
            kv_used_tokens=self.blocks.used_tokens,
            prefix_cache_hit_rate=self.blocks.hit_rate,
            num_preemptions=self.scheduler.num_preemptions,
            prefix_cache_queries=self.blocks.prefix_query_tokens,
            prefix_cache_hits=self.blocks.prefix_hit_tokens,
        )

    def close(self) -> None:
        for request_id in list(self._requests):
            self.abort(request_id)
        self.runner.close()


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
    bytes_per_block = kv_bytes_per_block(config, options.kv_dtype, block_size=BLOCK_SIZE,
                                         tp_size=size) // groups.num_groups
    # Never more blocks than every sequence at full length could use.
    most = options.max_num_seqs * groups.peak_blocks(config.max_context, BLOCK_SIZE,
                                                     chunk=options.max_num_batched_tokens)
    local_ranks = tp.local_size if tp else 1

    def blocks() -> int:
        budget = kv_budget_bytes(options.kv_memory, device=options.device, ranks_on_host=local_ranks)
        return min(budget // bytes_per_block, most)

    def check(num_blocks: int) -> None:
        if num_blocks < groups.num_groups:
            budget = f"--kv-memory {options.kv_memory!r}" if options.kv_memory else "the free memory's share"
            what = "no KV block" if groups.num_groups == 1 else f"fewer than {groups.num_groups} KV blocks (one per group)"
            raise ConfigError(f"{budget} holds {what} of {BLOCK_SIZE} tokens ({bytes_per_block} bytes per rank "
                              f"with kv dtype {options.kv_dtype})")

    if options.kv_memory is not None:
        check(blocks())  # a size that holds nothing fails before minutes of loading
    runner = ModelRunner(
        model_dir, num_blocks=None, block_size=BLOCK_SIZE, kv_dtype=options.kv_dtype,
        dtype=options.dtype, device=tp.device if tp is not None else options.device,
        tp=tp.context if tp is not None else None, kv_groups=groups,
    )
    num_blocks = blocks()  # a share of free memory is measured now, with the weights loaded
    if tp is not None:
        num_blocks = tp.agree_min(num_blocks)  # every rank, before any of them can refuse
    check(num_blocks)
    runner.allocate_kv_cache(num_blocks)
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
        weight_bytes=runner.weight_bytes(), kv_bytes=cache.bytes_per_block() * cache.num_blocks,
        load_s=round(load_s, 3), peak_rss_bytes=peak_rss_bytes(),
    )
