"""One request as the scheduler and the paged KV cache see it: its tokens, its place, its blocks.

Plain Python, no torch: the scheduler (gpu_workers.scheduler) and the block manager
(gpu_workers.block_manager) mutate it; the engine reads it to build a step's inputs.
"""

from __future__ import annotations

import enum
from dataclasses import KW_ONLY, dataclass, field


class SequenceStatus(enum.Enum):
    WAITING = "waiting"  # queued, holds no KV blocks (new, or preempted and to be recomputed)
    RUNNING = "running"  # holds KV blocks; prefilling in chunks or decoding one token a step
    FINISHED = "finished"  # finished or aborted; its blocks are back in the pool


@dataclass(eq=False)
class Sequence:
    """A request's token ids and its scheduling and KV-cache state.

    ``token_ids`` only ever grows by appending (the prefix cache memoizes hashes of full blocks).
    A request migrated from another group arrives with its prompt followed by the tokens already
    generated there; all of them are prefilled, and generation continues after them.
    ``priority``, ``arrival`` and ``deadline`` must not change once the sequence is queued.
    Identity is the object (``eq=False``): sequences are hashable dict keys.
    """

    request_id: str
    token_ids: list[int]  # prompt + generated so far
    num_prompt_tokens: int
    _: KW_ONLY
    priority: int = 0  # lower is served first
    arrival: float = 0.0  # seconds, on the engine's clock
    # Seconds on the service's clock (the request's timeout), only compared with other deadlines;
    # earlier is served first among equal priorities, None last.
    deadline: float | None = None
    # The most tokens (prompt + output) this sequence can ever hold; lets the scheduler reject at
    # `add` what could never fit in the cache. None when unknown.
    max_num_tokens: int | None = None
    status: SequenceStatus = SequenceStatus.WAITING
    num_computed_tokens: int = 0  # leading tokens whose K/V are in the cache
    num_cached_tokens: int = 0  # prefix-cache hit at the last allocation, in tokens (stats)
    # Physical blocks, per block_size tokens one for each KV cache group, interleaved (entry i * G + k:
    # group k's block for the i-th block_size tokens; gpu_workers.kv_cache_groups.KVCacheGroups).
    block_table: list[int] = field(default_factory=list)
    # Leading blocks (per group) that the sliding-window groups have given back or never held: wholly
    # before their window, nothing reads them again; their entries are stale ids or NULL_BLOCK.
    num_released_blocks: int = 0
    # A staged KV format only (gpu_workers.model.kv_staged): one dense staging block per KV cache group,
    # where the newest, incomplete block's K/V are kept in bf16 until it completes.
    staging: list[int] = field(default_factory=list)
    first_scheduled: float | None = None  # when it first got a chunk (queue-time stats)
    # Never take blocks from the prefix cache: every prompt token is computed (a request that asked
    # for prompt logprobs needs the logits a cache hit would skip). Its blocks are still offered.
    skip_prefix_cache: bool = False

    def __post_init__(self) -> None:
        self.token_ids = list(self.token_ids)
        if not 0 < self.num_prompt_tokens <= len(self.token_ids):
            raise ValueError(
                f"sequence {self.request_id}: num_prompt_tokens={self.num_prompt_tokens} must be in "
                f"1..{len(self.token_ids)} (the prompt cannot be empty)"
            )
        if self.max_num_tokens is not None and self.max_num_tokens < len(self.token_ids):
            raise ValueError(
                f"sequence {self.request_id}: max_num_tokens={self.max_num_tokens} is below its "
                f"{len(self.token_ids)} tokens"
            )

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        """Generated tokens, counting those generated elsewhere before a migration."""
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def last_token(self) -> int:
        return self.token_ids[-1]

    @property
    def num_uncomputed_tokens(self) -> int:
        """Tokens still to run through the model: the rest of a prefill, or 1 when decoding."""
        return len(self.token_ids) - self.num_computed_tokens
