"""Every tunable of ryzanstein, named once, with its default and why.

Each field can be overridden by an environment variable ``RYZ_<FIELD>`` (for example
``RYZ_REDIS_URL``, ``RYZ_PREFIX``, ``RYZ_HEARTBEAT_INTERVAL_S``); command-line flags override both.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="RYZ_", extra="ignore")

    # --- connection -------------------------------------------------------------------------
    redis_url: str | None = Field(
        default=None, description="Redis URL; unset means the embedded broker (see broker.embedded)."
    )
    prefix: str = Field(default="ryz", description="Prefix of every key name ryzanstein uses.")
    # Clients of a tenant (docs/OPERATIONS.md, "Tenants") reply to streams under {prefix}:t:<tenant>:,
    # the only keys their Redis user may read.
    tenant: str | None = Field(default=None, pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    # Sharded ingress (broker.sources): with N > 1, balancers read ``{p}:requests:0`` .. ``:N-1`` besides
    # ``{p}:requests``, and the Python clients send each request to one of the N at random, so that on a
    # Redis Cluster ingress is spread over the masters. Balancers and clients must agree on N.
    ingress_shards: int = Field(default=1, ge=1, le=1024)
    # Socket timeout must stay above the longest blocking read below, or idle reads would time out.
    socket_timeout_s: float = 10.0
    connect_timeout_s: float = 5.0
    # Reconnect backoff after a Redis error: exponential from base to cap, forever (a blip must never
    # kill a process, and honcho stops the whole Procfile when one process exits).
    reconnect_base_s: float = 0.05
    reconnect_cap_s: float = 2.0

    # --- requests ---------------------------------------------------------------------------
    max_request_bytes: int = Field(default=1 << 20, description="Limit on the summed size of a request's fields.")
    default_max_tokens: int = 16
    result_ttl_s: int = Field(default=3600, description="Reply streams and request state expire after this.")
    # A request that finds no live worker group waits this long (or until its own timeout_s) before it
    # ends with error code `unavailable`.
    no_group_wait_s: float = 30.0
    # The served model name a request without `model` goes to when the groups serve several models
    # (with one, that one); unset: such a request ends with `invalid_request` naming the served models.
    default_model: str | None = None
    # Balancers and worker groups remember the cancel entries they read this long (and trim the cancel
    # stream to it): a cancel sent before its request reaches them still applies within it.
    cancel_horizon_s: float = Field(default=600.0, gt=0)

    # --- balancer ---------------------------------------------------------------------------
    balancer_batch_max: int = Field(default=128, ge=1, description="Most ingress entries read in one batch.")
    balancer_block_ms: int = Field(default=500, description="Blocking read on the ingress stream when idle.")
    # Memory a balancer's ingress read may hold: a read asks for at most this // max_request_bytes
    # entries (and balancer_batch_max). Larger entries come back as stubs (broker.lua.READ_INGRESS),
    # except from the idle blocking read, which takes one entry at a time; Redis's proto-max-bulk-len
    # and client-query-buffer-limit bound that one (docs/OPERATIONS.md, "Memory").
    balancer_read_bytes: int = Field(default=128 << 20, ge=1)
    # Adaptive batching: after a read, a busy balancer waits up to this long for more entries, but only
    # when entries queue up and the arrival rate promises two more within it (so from about 2,000
    # requests/s at 1 ms); an idle one never waits.
    balancer_batch_wait_ms: float = Field(default=1.0, ge=0.0, le=5.0)
    # Pending ingress entries idle this long belong to a balancer that died (or stalled): any balancer
    # may claim them (checked every claim_idle_ms / 3, so a dead balancer's requests move within
    # 4/3 of this, under 3 s). Dispatch is idempotent, so a false positive costs work, never a duplicate.
    claim_idle_ms: int = 2000
    groups_refresh_s: float = Field(default=0.25, description="How often a balancer re-reads group heartbeats.")
    stats_interval_s: float = Field(default=1.0, description="How often a balancer writes its own stats key.")
    # A balancer whose stats key (written after each ingress read) is older than this has stopped
    # reading: it drops out of `{p}:balancers`, and health checks of the path fail while no balancer
    # reads. Generous: a CPU-starved balancer that reads late is not a dead one.
    balancer_dead_after_s: float = Field(default=10.0, gt=0)
    # Prefix affinity: requests whose prompts share this many leading characters (or token ids) go to
    # a group that served that prefix recently (its KV prefix cache may still hold it).
    affinity_prefix_chars: int = 128
    affinity_prefix_tokens: int = 32
    affinity_ttl_s: float = 300.0

    # --- admission control --------------------------------------------------------------------
    # Bounds on what waits for or runs on a group (its queue stream: dispatched and not finished),
    # in requests and in tokens (prompt + max_tokens, estimated before tokenizing). A request that
    # finds every group at its bound, or the whole system at its total, ends at once with error
    # `overloaded`. Requests moved from a failed or draining group were accepted already: they are
    # admitted past the bounds.
    group_max_requests: int = Field(default=4096, ge=1)
    group_max_tokens: int = Field(default=1 << 23, ge=1)
    total_max_requests: int = Field(default=16384, ge=1)
    total_max_tokens: int = Field(default=1 << 26, ge=1)

    # --- worker groups ----------------------------------------------------------------------
    heartbeat_interval_s: float = 1.0
    # A group whose last heartbeat is older than this is dead: not routed to, shown alive=false.
    dead_after_s: float = 3.0
    # Dead groups stay listed (alive=false) this long, then are removed from the registry.
    forget_dead_after_s: float = 600.0
    worker_block_ms: int = Field(default=1000, description="Longest blocking read on the group queue when idle.")
    worker_max_batch: int = Field(default=256, ge=1, description="Most requests in a group's engine at once.")
    # A model engine's continuous batch (vLLM's names): sequences running at once, and tokens computed
    # per step (decodes plus prefill chunks; at least max_num_seqs, so prefills progress beside a full
    # batch of decodes). What the group holds beyond these waits, up to worker_max_batch. The echo
    # engine has no such limits.
    max_num_seqs: int = Field(default=128, ge=1, description="Most sequences a model engine runs at once.")
    max_num_batched_tokens: int = Field(
        default=512, ge=1, description="Most tokens a model engine computes in one step (chunked prefill)."
    )
    # A CPU worker's torch intra-op threads per rank; None: the CPUs it may use (affinity, capped by
    # the cgroup's CPU quota) shared between the host's ranks, or OMP_NUM_THREADS where set
    # (gpu_workers/cpu_threads.py).
    threads: int | None = Field(default=None, ge=1, description="torch threads per worker rank (CPU).")
    # vLLM's CompilationConfig.level for a model worker: 0 eager, 3 the decoder layers compiled by
    # torch.compile at start-up (gpu_workers/model/compilation.py); --enforce-eager is level 0.
    compilation_level: int = Field(default=0, ge=0, le=3, description="Model worker compilation level (0 or 3).")
    drain_timeout_s: float = Field(
        default=30.0, description="On SIGTERM, time to finish running requests before handing the rest back."
    )
    # The echo engine sleeps this long per step (one token per running request): a stand-in for a
    # model's decode step, so that tests and benchmarks can kill things mid-stream.
    echo_token_delay_ms: float = Field(default=0.0, ge=0.0)
    # A tensor-parallel rank that waits longer than this in a collective (a peer died or hangs) stops
    # the whole group: the leader stops heartbeating and exits, and balancers fail its work over.
    # Idle leaders ping their ranks several times within it, so only a stuck peer ever reaches it.
    tp_timeout_s: float = Field(default=5.0, gt=0)
    # Longest wait for the other ranks while a group starts: rendezvous, then weight loading (ranks
    # load at different speeds; a large model on a slow disk needs minutes).
    tp_startup_timeout_s: float = Field(default=600.0, gt=0)

    # --- operations: metrics, probes, logs --------------------------------------------------
    # The HTTP endpoint of a balancer or group leader: /metrics (Prometheus), /livez, /readyz.
    # None: no endpoint. 0: a free port chosen at start (a group publishes it in its heartbeat, and
    # `status` shows it). Two processes on one host need distinct ports: see docs/OPERATIONS.md.
    metrics_port: int | None = Field(default=None, ge=0, le=65535)
    metrics_host: str = Field(default="0.0.0.0", description="Interface the metrics endpoint listens on.")
    # /livez fails once the process' loop has made no progress (a successful heartbeat or registry
    # read) for this long: a hung engine, or Redis unreachable for that long. Restarting cures the
    # first and does no harm in the second (the work is in Redis).
    liveness_timeout_s: float = Field(default=60.0, gt=0)
    # A group leader logs a stats line at INFO this often while it has work (running, waiting, prompt
    # and generation tokens/s, KV cache use, prefix-cache hits), as vLLM does; 0 turns it off.
    stats_log_interval_s: float = Field(default=10.0, ge=0)
    log_format: Literal["text", "json"] = Field(default="text", description="json: one JSON object per line.")
    # Prompt text is never logged unless this is set (prompts may hold personal data).
    log_prompts: bool = False

    # --- batch jobs (RQ) --------------------------------------------------------------------
    # A batch worker heartbeats its running job; a job not heartbeated this long is abandoned (its
    # worker died) and RQ retries it, from where its output file ends.
    batch_heartbeat_ttl_s: int = Field(default=60, ge=1)
    batch_progress_interval_s: float = Field(
        default=1.0, description="How often a batch job syncs its output file and saves its progress."
    )
    # RQ runs on one Redis server only: with a Redis Cluster (redis+cluster://) for the pipeline, the
    # batch jobs' RQ queue lives on this one (any single-server URL form); the requests still go to
    # the cluster. Default: the pipeline's own Redis.
    batch_redis_url: str | None = None


def load_settings(**overrides: Any) -> Settings:
    """Settings from the environment, with explicit (e.g. command-line) values on top; None means unset."""
    return Settings(**{k: v for k, v in overrides.items() if v is not None})
