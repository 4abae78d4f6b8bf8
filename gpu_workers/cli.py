"""``ryzanstein worker`` / ``python -m gpu_workers``: one worker group, of one process or of K ranks.

With ``--tp K`` this process becomes rank 0, the leader, and starts ranks 1..K-1 itself; under
torchrun (RANK, WORLD_SIZE, ... set) every rank runs this same command, and rank 0 leads. Only the
leader talks to Redis; the other ranks compute what it sends them (gpu_workers.parallel).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from types import FrameType

from broker.cli_common import add_metrics, settings_from_args, setup_logging
from broker.connection import connect, mask_url, resolve_url, retry_forever
from broker.errors import EngineFailed
from broker.keys import Keys
from broker.metrics import serve_metrics
from broker.settings import Settings
from gpu_workers.cpu_threads import apply_threads
from gpu_workers.engine import EXIT_ENGINE_FAILED, Engine
from gpu_workers.engine_spec import KV_DTYPES, EngineOptions, build_engine, model_dir
from gpu_workers.group import WorkerGroup
from gpu_workers.served import served_model_names, weights_fingerprint
from gpu_workers.startup import LoadingBeacon, loading_load

log = logging.getLogger("gpu_workers")


EPILOG = """\
Reads its queue {prefix:g:<group>}:queue, holds up to RYZ_WORKER_MAX_BATCH (256) requests in its
engine by priority (a model engine runs up to --max-num-seqs of them, computing at most
--max-num-batched-tokens tokens per step; the rest wait there), publishes token/done/error
events, and heartbeats its load every second (RYZ_HEARTBEAT_INTERVAL_S). A request that moved here from a failed group continues from the tokens
its stream already carries. A request the engine fails on ends alone with error 'internal'.
Signals: SIGTERM drains (hands back what has not started, finishes the rest for up to
RYZ_DRAIN_TIMEOUT_S), a second one hands everything back, a third stops at once. A group failed over
while it was unresponsive registers again when it wakes. RYZ_ECHO_TOKEN_DELAY_MS makes each echo
step take that long (for tests and benchmarks).

Tensor parallelism: with --tp K this process is rank 0, the leader (Redis, scheduling, sampling),
and starts ranks 1..K-1 (python -m gpu_workers, which die with it). Under torchrun (RANK,
WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT set) every rank runs this same command and rank 0
leads; a group can then span hosts, its ranks' gloo bound to the interface towards MASTER_ADDR
(GLOO_SOCKET_IFNAME overrides; docs/OPERATIONS.md, "A group across hosts"). If any rank dies or
waits on another longer than --tp-timeout, the whole group stops and its requests fail over to
other groups.
Exit codes: 0 drained (or stopped), 2 bad configuration, 4 a rank was lost.
"""


def configure(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = EPILOG
    parser.add_argument("--model", default="echo",
                        help="model SPEC: a Hugging Face directory, a .gguf file (llama, gemma3), random:<preset>, or echo (default)")
    parser.add_argument("--tp", type=int, default=None, metavar="K",
                        help="tensor-parallel ranks in this group: this process starts K-1 more on this host "
                             "(default 1, or WORLD_SIZE under torchrun, which starts every rank itself)")
    parser.add_argument("--group", default=None, help="group name (default: <host>-<pid>; unique per group)")
    add_engine_args(parser)
    parser.add_argument("--wait-broker", type=float, default=30.0,
                        help="seconds to wait for an embedded broker to appear when no URL is given")
    add_metrics(parser)


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    """The engine flags ``worker`` and ``up`` share (``up`` passes them on to every group)."""
    parser.add_argument("--served-model-name", nargs="+", default=None, metavar="NAME",
                        help="names requests reach this model by (their 'model' field; the first is its "
                             "canonical name); default: the directory's last component, the hub id, "
                             "random:<preset> or echo")
    parser.add_argument("--kv-dtype", default="fp8_e4m3", choices=KV_DTYPES, metavar="D",
                        help="KV cache dtype: fp8_e4m3 (default; keys centred per block and channel, values per "
                             "token, each sequence's first and newest blocks in bf16), fp8_e4m3_block (a "
                             "power-of-two scale per block and KV head), fp8_e5m2 (the same in e5m2), "
                             "fp8_e4m3_per_tensor (one static scale per layer), bf16, fp16, fp32")
    parser.add_argument("--kv-memory", default=None,
                        help="KV cache size per rank, e.g. 2GiB (default: a share of free memory)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                        help="cpu, or cuda: one GPU per rank, by LOCAL_RANK (default cpu)")
    parser.add_argument("--tp-timeout", type=float, default=None, metavar="SECONDS",
                        help="a rank waiting longer than this on another stops the whole group "
                             "(default: $RYZ_TP_TIMEOUT_S, else 5)")
    parser.add_argument("--max-num-seqs", type=int, default=None, metavar="N",
                        help="most sequences the model engine runs at once (default: $RYZ_MAX_NUM_SEQS, "
                             "else 128; the echo engine has no limit)")
    parser.add_argument("--max-num-batched-tokens", type=int, default=None, metavar="N",
                        help="most tokens the model engine computes per step, decodes and prefill chunks "
                             "together; at least --max-num-seqs (default: $RYZ_MAX_NUM_BATCHED_TOKENS, else 512)")
    parser.add_argument("--quantization", default=None, choices=["gguf"],
                        help="gguf: keep a .gguf model's quantized weights quantized (CPU only): Q4_0/Q4_1/Q4_K "
                             "linear layers 4-bit (torch's int4 kernel, bf16 activations, below 64 tokens a step; "
                             "exact fp32 dequantization from 64; ~0.9 bytes a weight), Q5_0/Q5_1/Q6_K/Q8_0 ones and "
                             "the embedding and LM head 8-bit (our C kernel, fp32 activations, exact products, below "
                             "32 tokens; ~1.1-1.3 bytes a weight); default: dequantize every weight to fp32")
    parser.add_argument("--threads", type=int, default=None, metavar="N",
                        help="torch CPU threads per rank (default: $RYZ_THREADS, else $OMP_NUM_THREADS, else the "
                             "CPUs this process may use, capped by its cgroup's CPU quota, shared by the host's "
                             "ranks); threads sleep when idle (OMP_WAIT_POLICY=PASSIVE unless set)")
    parser.add_argument("--compilation-config", "-O", type=compilation_level, default=None, metavar="LEVEL",
                        help="vLLM's compilation level, N or '{\"level\": N}': 3 compiles the decoder layers with "
                             "torch.compile (inductor C++) at start-up, one CPU rank only; 0 runs eager "
                             "(default: $RYZ_COMPILATION_LEVEL, else 0)")
    parser.add_argument("--enforce-eager", action="store_true",
                        help="never compile (level 0, whatever --compilation-config or the settings say)")


def compilation_level(text: str) -> int:
    """A ``--compilation-config`` value: a level (0 or 3), alone or as vLLM's JSON ``{"level": N}``."""
    try:
        value = json.loads(text)
        level = value["level"] if isinstance(value, dict) else value
    except (ValueError, KeyError, TypeError):
        raise argparse.ArgumentTypeError(f"{text!r}: a level (0 or 3) or {{\"level\": N}}") from None
    if level not in (0, 3):
        raise argparse.ArgumentTypeError(f"{text!r}: level {level!r}, not 0 (eager) or 3 (compiled)")
    return int(level)


def engine_argv(args: argparse.Namespace) -> list[str]:
    """The engine flags of ``args`` (parsed with ``add_engine_args``) as a worker's command line."""
    argv = ["--kv-dtype", args.kv_dtype, "--device", args.device]
    if args.quantization is not None:
        argv += ["--quantization", args.quantization]
    if args.served_model_name:
        argv += ["--served-model-name", *args.served_model_name]
    if args.kv_memory is not None:
        argv += ["--kv-memory", args.kv_memory]
    if args.tp_timeout is not None:
        argv += ["--tp-timeout", str(args.tp_timeout)]
    for flag, value in (("--max-num-seqs", args.max_num_seqs), ("--max-num-batched-tokens", args.max_num_batched_tokens),
                        ("--threads", args.threads), ("--compilation-config", args.compilation_config)):
        if value is not None:
            argv += [flag, str(value)]
    return argv + (["--enforce-eager"] if args.enforce_eager else [])


def worker_options(args: argparse.Namespace, settings: Settings, *, tp: int) -> tuple[Settings, EngineOptions]:
    """``settings`` with the engine flags given on top, and the engine options they make.
    ConfigError for limits the engine cannot work with."""
    flags = {"tp_timeout_s": args.tp_timeout, "max_num_seqs": args.max_num_seqs,
             "max_num_batched_tokens": args.max_num_batched_tokens, "threads": args.threads,
             "compilation_level": 0 if args.enforce_eager else args.compilation_config}
    settings = settings.model_copy(update={name: value for name, value in flags.items() if value is not None})
    options = EngineOptions(tp=tp, kv_dtype=args.kv_dtype, kv_memory=args.kv_memory, device=args.device,
                            echo_token_delay_ms=settings.echo_token_delay_ms, max_num_seqs=settings.max_num_seqs,
                            max_num_batched_tokens=settings.max_num_batched_tokens, quantization=args.quantization,
                            compilation_level=settings.compilation_level)
    return settings, options


def run(args: argparse.Namespace) -> int:
    from gpu_workers.parallel.launch import group_size, rank_env

    setup_logging(args)
    settings, options = worker_options(args, settings_from_args(args), tp=group_size(args.tp))
    served_model_names(args.model, args.served_model_name)  # a bad name fails before the model loads
    tp = options.tp
    env = rank_env() if tp > 1 else None
    if env is not None and env.rank != 0:
        return _run_rank(args, settings, "", options)  # a follower: no Redis, no registry entry
    # the leader: finds Redis first, then shows the group as loading while the model loads
    url = resolve_url(settings, wait_s=args.wait_broker)
    args.group = args.group or f"{socket.gethostname()}-{os.getpid()}"
    log.info("start-up: group %s, model %s, %d rank(s), KV %s", args.group, args.model, tp, args.kv_dtype)
    # SIGTERM while loading: unwind (the registry entry is withdrawn) instead of dying where we stand
    signal.signal(signal.SIGTERM, _exit_on_signal)
    with _announce_loading(settings, url, args, tp=tp):
        if tp == 1:
            if args.device == "cpu":
                log.info("%d torch threads", apply_threads(settings.threads))
            return _lead(args, settings, url, build_engine(args.model, options))
        return _run_rank(args, settings, url, options)


def _exit_on_signal(signum: int, _frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


@contextlib.contextmanager
def _announce_loading(settings: Settings, url: str, args: argparse.Namespace, *, tp: int) -> Iterator[None]:
    """The group in the registry as ``loading`` (with its phase) until it registers (``_lead``);
    withdrawn if start-up fails or is interrupted."""
    redis = connect(url, settings)
    load = loading_load(args.group, model=args.model, tp=tp, kv_dtype=args.kv_dtype,
                        served_models=served_model_names(args.model, args.served_model_name))
    beacon = LoadingBeacon(redis, Keys(settings.prefix), load, interval_s=settings.heartbeat_interval_s)
    args.loading_beacon = beacon
    beacon.start()
    try:
        yield
    except BaseException:
        beacon.withdraw()
        raise
    finally:
        beacon.stop()
        redis.close()


def _run_rank(args: argparse.Namespace, settings: Settings, url: str, options: EngineOptions) -> int:
    from gpu_workers.model.config import load_config
    from gpu_workers.parallel.follower import run_follower
    from gpu_workers.parallel.launch import start_group

    if args.model == "echo":
        return _lead(args, settings, url, build_engine(args.model, options))  # refuses --tp > 1
    path = model_dir(args.model, quantization=options.quantization)
    load_config(path).check_tp(options.tp)
    try:
        group = start_group(options.tp, device=args.device, follower_argv=_follower_argv(args, settings, path, options),
                            timeout_s=settings.tp_timeout_s, startup_timeout_s=settings.tp_startup_timeout_s,
                            threads=settings.threads)
    except EngineFailed as exc:
        log.error("%s; exiting", exc)
        beacon = getattr(args, "loading_beacon", None)
        if beacon is not None:  # the leader: no group will come of this start
            beacon.withdraw()
        return EXIT_ENGINE_FAILED
    code = EXIT_ENGINE_FAILED
    try:
        if not group.is_leader:
            code = run_follower(path, options.llama(), group)
        else:
            code = _lead(args, settings, url, build_engine(args.model, options, group=group))
        return code
    finally:
        group.close(grace_s=0.0 if code == EXIT_ENGINE_FAILED else 5.0)


def _follower_argv(args: argparse.Namespace, settings: Settings, path: Path, options: EngineOptions) -> list[str]:
    """What a rank this leader starts runs: the same model, cache and limits, without Redis."""
    argv = ["--model", str(path), "--tp", str(options.tp), "--kv-dtype", args.kv_dtype, "--device", args.device,
            "--tp-timeout", str(settings.tp_timeout_s), "--log-level", args.log_level,
            "--log-format", settings.log_format, "--max-num-seqs", str(options.max_num_seqs),
            "--max-num-batched-tokens", str(options.max_num_batched_tokens)]
    argv += ["--threads", str(settings.threads)] if settings.threads is not None else []
    return argv + (["--kv-memory", args.kv_memory] if args.kv_memory else [])


def _lead(args: argparse.Namespace, settings: Settings, url: str, engine: Engine) -> int:
    group = WorkerGroup(connect(url, settings), engine, settings=settings, name=args.group,
                        served_models=served_model_names(args.model, args.served_model_name),
                        weights=weights_fingerprint(None if args.model == "echo" else model_dir(
                            args.model, quantization=args.quantization)))
    server = serve_metrics(group.telemetry.registry, group.telemetry.probe, host=settings.metrics_host,
                           port=settings.metrics_port)
    group.telemetry.port = server.port if server is not None else None

    stopping = threading.Event()  # a signal before registration: nothing to drain, stop at once

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        log.info("signal %d: draining (again: hand back at once; a third time: stop now)", signum)
        stopping.set()
        group.drain()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    beacon = getattr(args, "loading_beacon", None)
    if beacon is not None:
        beacon.stop()  # from here on the group's own heartbeats speak for it
    try:
        if not retry_forever(group.register, settings, what="group registration", stop=stopping):
            log.info("group %s stopped before it registered", group.name)
            engine.close()
            return 0
        names = "" if group.served_models == [engine.info.model] else f" as {', '.join(group.served_models)}"
        print(f"worker group {group.name} serving {engine.info.model}{names} on {mask_url(url)}"
              + (f" with {engine.info.tp} tensor-parallel ranks" if engine.info.tp > 1 else ""), flush=True)
        return group.run()
    except EngineFailed as exc:
        log.error("group %s: %s; exiting", group.name, exc)
        return EXIT_ENGINE_FAILED
