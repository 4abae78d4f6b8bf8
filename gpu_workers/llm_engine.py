"""The Llama-family engine: scheduler, paged KV cache, model runner and sampler behind ``Engine``.

Each ``step`` asks the scheduler which tokens to compute (every running decode, then prefill chunks
under the token budget), runs them through the model in one flattened batch, samples one token for
every sequence that reached its last token, and reports those tokens. Stop strings, detokenization
and Redis stay in the group loop (gpu_workers.group); this module only turns requests into tokens.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path

import torch

from broker.chat import PLAIN_CHAT_TEMPLATE
from gpu_workers.block_manager import BlockManager
from gpu_workers.engine import EngineInfo, EngineRequest, EngineStats, Rejection, RejectionReason, StepOutput
from gpu_workers.hf_tokenizer import load_tokenizer
from gpu_workers.logits_processors import RowContext, bad_words_token_ids, is_controlled
from gpu_workers.model.config import load_config
from gpu_workers.model_runner import Chunk, ModelRunner
from gpu_workers.parallel.launch import TensorParallelGroup
from gpu_workers.parallel.runner import LeaderRunner
from gpu_workers.prompt_logprobs import PromptLogprobs
from gpu_workers.rank import BLOCK_SIZE, LlamaEngineOptions, build_runner, rank_report
from gpu_workers.sampler import Sampled, sample_with_logprobs
from gpu_workers.sampling_params import EngineRequestError, SamplingParams
from gpu_workers.scheduler import Scheduler, SchedulerConfig
from gpu_workers.sequence import Sequence
from gpu_workers.structured_output import GrammarMatcher, Grammars

log = logging.getLogger(__name__)

SEED_MASK = (1 << 63) - 1
DEFAULT_OPTIONS = LlamaEngineOptions()

__all__ = ["BLOCK_SIZE", "LlamaEngine", "LlamaEngineOptions"]  # the options live with the rank (gpu_workers.rank)


@dataclass(slots=True)
class _RequestState:
    """What the engine keeps per request besides its Sequence."""

    sampling: SamplingParams
    seed: int  # the request's seed, or one drawn at admission: sampling depends on (seed, token index)
    max_total_tokens: int  # prompt + every generated token (those made elsewhere included), at most
    stop_ids: frozenset[int]  # the ids that end it (EOS unless ignore_eos, stop_token_ids); masked before min_tokens
    bad_words_ids: tuple[tuple[int, ...], ...]  # bad_words, tokenized
    prompt_logprobs: PromptLogprobs | None = None  # for requests that asked, until sent
    started: bool = False  # has produced a token here (its prompt is in the cache)
    # Structured output: the matcher, once compiled (gpu_workers.structured_output); advanced over
    # every token of the sequence, the prompt's excepted.
    grammar: GrammarMatcher | None = None
    compiling: Future[GrammarMatcher] | None = None  # while compiling: the sequence is not scheduled yet
    seq: Sequence | None = field(default=None, repr=False)  # while compiling: the sequence to schedule


class LlamaEngine:
    def __init__(
        self,
        model_dir: Path,
        *,
        name: str,
        options: LlamaEngineOptions = DEFAULT_OPTIONS,
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
                                   groups=runner.kv_groups, num_dense_blocks=runner.kv_cache.num_dense_blocks)
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
            kv_dtype=options.kv.name,
            rank_weight_bytes=tuple(r.weight_bytes for r in self.ranks),
            rank_kv_bytes=tuple(r.kv_bytes for r in self.ranks),
            rank_hosts=tuple(r.host for r in self.ranks),
            # a model without a tokenizer.json (random:<preset>) speaks bytes: the plain byte template
            chat_template=specials.chat_template or (None if has_tokenizer_json else PLAIN_CHAT_TEMPLATE),
            bos_token=specials.bos_token,
            eos_token=specials.eos_token,
        )
        self._requests: dict[str, _RequestState] = {}
        # Requests waiting for the request they share their prompt with to compute it (add), by its id.
        self._parked: dict[str, list[EngineRequest]] = {}
        self.grammars = Grammars(self.tokenizer, vocab_size=self.config.vocab_size,
                                 eos_token_ids=self.info.eos_token_ids)
        self._compiling: dict[str, _RequestState] = {}  # held back from the scheduler until compiled
        self._rejected: list[Rejection] = []
        self._mask_pool = ThreadPoolExecutor(1, thread_name_prefix="grammar-mask")
        log.info(
            "engine %s ready in %.1fs: %d KV blocks of %d layers (%d tokens of every layer, %.1f MiB per "
            "rank, %s), max context %d", name, time.perf_counter() - started, num_blocks,
            runner.kv_groups.layers_per_block, capacity, runner.kv_cache.nbytes() / 2**20,
            options.kv, self.info.max_context,
        )

    # --- Engine protocol -------------------------------------------------------------------------

    def add(self, request: EngineRequest) -> None:
        leader = request.shares_prefix_with
        if leader is not None and leader in self._requests and not self._requests[leader].started:
            self._parked.setdefault(leader, []).append(request)  # its prompt's blocks are being computed
            return
        self._admit(request)

    def _admit(self, request: EngineRequest) -> None:
        sampling = request.sampling
        seed = sampling.seed if sampling.seed is not None else random.getrandbits(63)
        tokens = [*request.prompt_ids, *request.output_ids]
        max_total = min(len(request.prompt_ids) + sampling.max_tokens, self.info.max_context)
        stop_ids = (frozenset() if sampling.ignore_eos else self.info.eos_token_ids) | frozenset(sampling.stop_token_ids)
        bad_words = bad_words_token_ids(sampling.bad_words, self.tokenizer) if sampling.bad_words else ()
        prompt_logprobs = (PromptLogprobs(list(request.prompt_ids), sampling.prompt_logprobs)
                           if sampling.prompt_logprobs is not None else None)
        state = _RequestState(sampling, seed & SEED_MASK, max_total, stop_ids, bad_words, prompt_logprobs)
        seq = Sequence(
            request_id=request.request_id,
            token_ids=tokens,
            num_prompt_tokens=len(request.prompt_ids),
            priority=request.priority,
            arrival=self._clock(),
            deadline=request.deadline,
            max_num_tokens=max_total,
            skip_prefix_cache=prompt_logprobs is not None,
        )
        if sampling.structured is not None:
            # compiled off the step path; scheduled once its matcher is ready (_schedule_compiled)
            state.compiling = self.grammars.start(sampling.structured, output_ids=request.output_ids)
            state.seq = seq
            self._requests[request.request_id] = state
            self._compiling[request.request_id] = state
            return
        self._requests[request.request_id] = state
        self.scheduler.add(seq)

    def _release_parked(self, leader: str) -> None:
        """The requests parked behind ``leader`` start: its prompt is cached, or it has gone."""
        for request in self._parked.pop(leader, []):
            self._admit(request)

    def abort(self, request_id: str) -> None:
        for leader, parked in list(self._parked.items()):
            if any(r.request_id == request_id for r in parked):
                self._parked[leader] = [r for r in parked if r.request_id != request_id]
                return
        if self._requests.pop(request_id, None) is not None:
            if (state := self._compiling.pop(request_id, None)) is not None and state.compiling is not None:
                state.compiling.cancel()  # (not scheduled yet)
            else:
                self.scheduler.abort(request_id)
                self.runner.release(request_id)
            self._release_parked(request_id)

    def rejected(self) -> list[Rejection]:
        out, self._rejected = self._rejected, []
        return out

    def _schedule_compiled(self, *, block: bool) -> None:
        """Hand the requests whose matcher is ready to the scheduler; drop those whose spec failed.
        ``block``: nothing else to do, wait a little for a compile rather than spin."""
        if block:
            wait([s.compiling for s in self._compiling.values() if s.compiling is not None], timeout=0.01,
                 return_when=FIRST_COMPLETED)
        for request_id, state in list(self._compiling.items()):
            future = state.compiling
            if future is None or not future.done():
                continue
            del self._compiling[request_id]
            state.compiling = None
            seq, state.seq = state.seq, None
            try:
                state.grammar = future.result()
                assert seq is not None
                self.scheduler.add(seq)
            except EngineRequestError as exc:
                self._reject(request_id, RejectionReason.UNSERVABLE, str(exc))
            except Exception as exc:  # the compile thread's failure is this request's alone
                log.exception("request %s: structured output failed to compile", request_id)
                self._reject(request_id, RejectionReason.FAILED, f"structured output failed to compile ({type(exc).__name__})")

    def _reject(self, request_id: str, reason: RejectionReason, message: str) -> None:
        self._requests.pop(request_id, None)
        self._rejected.append(Rejection(request_id, reason, message))
        self._release_parked(request_id)  # the completions sharing its prompt go on without it

    def step(self) -> list[StepOutput]:
        if self._compiling:
            self._schedule_compiled(block=False)
        plan = self.scheduler.schedule(self._clock())
        if not plan.chunks:
            if self._compiling:
                self._schedule_compiled(block=True)
            return []
        chunks = [
            Chunk(
                token_ids=c.seq.token_ids[c.start : c.start + c.num_tokens],
                start=c.start,
                block_table=c.seq.block_table,
                want_logits=c.samples,
                seq=c.seq,
                all_logits=(p := self._requests[c.seq.request_id].prompt_logprobs) is not None and p.wants(c.start),
                staging=tuple(c.seq.staging),
            )
            for c in plan.chunks
        ]
        sampled_seqs = [c.seq for c in plan.chunks if c.samples]
        states = [self._requests[s.request_id] for s in sampled_seqs]
        matchers = {i: st.grammar for i, st in enumerate(states) if st.grammar is not None}  # row -> matcher
        # The masks are filled while the model runs (llguidance releases the GIL); rows in sampling order.
        masks = self._mask_pool.submit(self.grammars.fill, list(matchers.values()), list(matchers),
                                       len(states)) if matchers else None
        contexts = [RowContext(s.token_ids, s.num_prompt_tokens, st.stop_ids, st.bad_words_ids)
                    for s, st in zip(sampled_seqs, states)]
        # Only argmaxes wanted (greedy, no logprobs, no controls, no grammar, no prompt logprobs): the
        # runner may give the tokens without every logit (gpu_workers.model.greedy_head).
        runner = self.runner
        greedy = (bool(sampled_seqs) and not matchers and not any(c.all_logits for c in chunks)
                  and all(st.sampling.temperature == 0.0 and not st.sampling.logprobs
                          and not is_controlled(st.sampling, ctx) for st, ctx in zip(states, contexts)))
        out = runner.run(chunks, greedy=True) if greedy and isinstance(runner, ModelRunner) else runner.run(chunks)
        if out.dtype == torch.int64:  # the greedy tokens themselves
            sampled: Sampled | None = Sampled(out.tolist(), [None] * len(states))
        else:
            logits = self._take_prompt_logits(chunks, out)
            sampled = sample_with_logprobs(
                logits,
                [st.sampling for st in states],
                seeds=[st.seed for st in states],
                steps=[s.num_tokens - s.num_prompt_tokens for s in sampled_seqs],
                contexts=contexts,
                top_logprobs=[st.sampling.top_logprobs if st.sampling.logprobs else None for st in states],
                grammar=masks.result() if masks is not None else None,
            ) if sampled_seqs else None
        tokens = sampled.token_ids if sampled is not None else []
        logprobs = sampled.logprobs if sampled is not None else []
        self.scheduler.postprocess(plan, {s.request_id: t for s, t in zip(sampled_seqs, tokens)})

        outputs = []
        for seq, state, token, token_logprobs in zip(sampled_seqs, states, tokens, logprobs):
            prompt_logprobs = None
            if state.prompt_logprobs is not None:
                prompt_logprobs, state.prompt_logprobs = tuple(state.prompt_logprobs.entries), None
            if not state.started:
                state.started = True
                self._release_parked(seq.request_id)
            finish = None
            if state.grammar is not None and not state.grammar.consume_token(token):
                log.error("request %s: the grammar refused the sampled token %d", seq.request_id, token)
                self._reject(seq.request_id, RejectionReason.FAILED, "the sampled token does not match the structured output")
                self.scheduler.finish(seq.request_id)
                self.runner.release(seq.request_id)
                continue
            if token in state.stop_ids or (state.grammar is not None and state.grammar.is_stopped()):
                finish = "stop"  # the grammar is complete: nothing but EOS could follow (vLLM stops there too)
            elif seq.num_tokens >= state.max_total_tokens:
                finish = "length"
            if finish is not None:
                self._requests.pop(seq.request_id, None)
                self.scheduler.finish(seq.request_id)
                self.runner.release(seq.request_id)
            outputs.append(StepOutput(seq.request_id, token, finish, token_logprobs, prompt_logprobs))
        return outputs

    def _take_prompt_logits(self, chunks: list[Chunk], logits: torch.Tensor) -> torch.Tensor:
        """Hand the rows of chunks with ``all_logits`` to their requests' prompt logprobs; the rows
        left (``[S, V]``) are those to sample from, one per chunk with ``want_logits``."""
        if not any(c.all_logits for c in chunks):
            return logits
        row, sample_rows = 0, []
        for c in chunks:
            if c.all_logits:
                assert c.seq is not None
                prompt = self._requests[c.seq.request_id].prompt_logprobs
                assert prompt is not None
                prompt.add(c.start, logits[row : row + len(c.token_ids)])
                row += len(c.token_ids)
                if c.want_logits:
                    sample_rows.append(row - 1)
            elif c.want_logits:
                sample_rows.append(row)
                row += 1
        return logits[sample_rows]

    def has_work(self) -> bool:
        return self.scheduler.has_work() or bool(self._parked) or bool(self._compiling)

    def not_started(self) -> list[str]:
        return [*self._compiling, *self.scheduler.not_started(),
                *(r.request_id for parked in self._parked.values() for r in parked)]

    def stats(self) -> EngineStats:
        self.runner.check()  # a group that lost a rank must not report itself alive
        return EngineStats(
            running=self.scheduler.num_running,
            waiting=self.scheduler.num_waiting + len(self._compiling),
            kv_capacity_tokens=self.blocks.capacity_tokens,
            # the tighter pool: a staged cache's bf16 blocks can run out while fp8 ones are free
            kv_used_tokens=max(self.blocks.used_tokens,
                               round(self.blocks.capacity_tokens * self.blocks.dense_utilization)),
            prefix_cache_hit_rate=self.blocks.hit_rate,
            num_preemptions=self.scheduler.num_preemptions,
            prefix_cache_queries=self.blocks.prefix_query_tokens,
            prefix_cache_hits=self.blocks.prefix_hit_tokens,
        )

    def close(self) -> None:
        self._parked.clear()
        for request_id in list(self._requests):
            self.abort(request_id)
        self.grammars.close()
        self._mask_pool.shutdown(wait=False)
        self.runner.close()
