"""``ryzanstein worker`` / ``python -m gpu_workers``: one worker group."""

from __future__ import annotations

import argparse
import logging
import signal
from types import FrameType

from broker.cli_common import add_metrics, settings_from_args, setup_logging
from broker.connection import connect, resolve_url, retry_forever
from broker.metrics import serve_metrics
from gpu_workers.group import WorkerGroup
from gpu_workers.models import KV_DTYPES, EngineOptions, build_engine

log = logging.getLogger("gpu_workers")


EPILOG = """\
Reads its queue {prefix:g:<group>}:queue, runs up to RYZ_WORKER_MAX_BATCH (256) requests at once by
priority, publishes token/done/error events, and heartbeats its load every second
(RYZ_HEARTBEAT_INTERVAL_S). A request that moved here from a failed group continues from the tokens
its stream already carries. A request the engine fails on ends alone with error 'internal'.
Signals: SIGTERM drains (hands back what has not started, finishes the rest for up to
RYZ_DRAIN_TIMEOUT_S), a second one hands everything back, a third stops at once. A group failed over
while it was unresponsive registers again when it wakes. RYZ_ECHO_TOKEN_DELAY_MS makes each echo
step take that long (for tests and benchmarks).
"""


def configure(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = EPILOG
    parser.add_argument("--model", default="echo",
                        help="model SPEC: a Hugging Face directory, random:<preset>, or echo (default)")
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel ranks in this group (default 1)")
    parser.add_argument("--group", default=None, help="group name (default: <host>-<pid>; unique per group)")
    parser.add_argument("--kv-dtype", default="fp8_e4m3", choices=KV_DTYPES, help="KV cache dtype")
    parser.add_argument("--kv-memory", default=None, help="KV cache size, e.g. 2GiB (default: a share of free memory)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--wait-broker", type=float, default=30.0,
                        help="seconds to wait for an embedded broker to appear when no URL is given")
    add_metrics(parser)


def run(args: argparse.Namespace) -> int:
    setup_logging(args)
    settings = settings_from_args(args)
    url = resolve_url(settings, wait_s=args.wait_broker)
    engine = build_engine(args.model, EngineOptions(tp=args.tp, kv_dtype=args.kv_dtype,
                                                     kv_memory=args.kv_memory, device=args.device,
                                                     echo_token_delay_ms=settings.echo_token_delay_ms))
    group = WorkerGroup(connect(url, settings), engine, settings=settings, name=args.group)
    server = serve_metrics(group.telemetry.registry, group.telemetry.probe, host=settings.metrics_host,
                           port=settings.metrics_port)
    group.telemetry.port = server.port if server is not None else None

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        log.info("signal %d: draining (again: hand back at once; a third time: stop now)", signum)
        group.drain()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    retry_forever(group.register, settings, what="group registration")
    print(f"worker group {group.name} serving {engine.info.model} on {url}", flush=True)
    return group.run()
