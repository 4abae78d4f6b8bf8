"""``ryzanstein balancer`` / ``python -m balancer``: one balancer (several may run at once)."""

from __future__ import annotations

import argparse
import logging
import signal
from types import FrameType

from balancer.service import Balancer
from broker.cli_common import add_metrics, settings_from_args, setup_logging
from broker.connection import connect, resolve_url, retry_forever
from broker.metrics import serve_metrics

log = logging.getLogger("balancer")


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--name", default=None, help="consumer name (default: <host>-<pid>-<random>)")
    parser.add_argument("--wait-broker", type=float, default=30.0,
                        help="seconds to wait for an embedded broker to appear when no URL is given")
    add_metrics(parser)


def run(args: argparse.Namespace) -> int:
    setup_logging(args)
    settings = settings_from_args(args)
    url = resolve_url(settings, wait_s=args.wait_broker)
    balancer = Balancer(connect(url, settings), settings=settings, name=args.name)
    serve_metrics(balancer.telemetry.registry, balancer.telemetry.probe, host=settings.metrics_host,
                  port=settings.metrics_port)

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        log.info("signal %d: stopping", signum)
        balancer.stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    retry_forever(balancer.setup, settings, what="balancer setup", stop=balancer.stop)
    print(f"balancer {balancer.name} on {url}", flush=True)
    balancer.run()
    return 0
