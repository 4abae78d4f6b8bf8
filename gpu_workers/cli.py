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


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="echo",
                        help="model SPEC: a Hugging Face directory, random:<preset>, or echo (default)")
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel ranks in this group (default 1)")
    parser.add_argument("--group", default=None, help="group name (default: <host>-<pid>; unique per group)")
    parser.add_argument("--kv-dtype", default="fp8_e4m3", choices=KV_DTYPES, metavar="D",
                        help="KV cache dtype: fp8_e4m3 (default; a scale per block and KV head), fp8_e5m2, "
                             "fp8_e4m3_per_tensor (one static scale per layer), bf16, fp16, fp32")
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
                                                     kv_memory=args.kv_memory, device=args.device))
    group = WorkerGroup(connect(url, settings), engine, settings=settings, name=args.group)
    server = serve_metrics(group.telemetry.registry, group.telemetry.probe, host=settings.metrics_host,
                           port=settings.metrics_port)
    group.telemetry.port = server.port if server is not None else None

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        log.info("signal %d: draining (again to hand back at once)", signum)
        group.drain()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    retry_forever(group.register, settings, what="group registration")
    print(f"worker group {group.name} serving {engine.info.model} on {url}", flush=True)
    return group.run()
