"""``ryzanstein balancer`` / ``python -m balancer``: one balancer (several may run at once)."""

from __future__ import annotations

import argparse
import logging
import signal
from types import FrameType

from balancer.service import Balancer
from broker.cli_common import add_metrics, settings_from_args, setup_logging
from broker.connection import connect, mask_url, resolve_url, retry_forever
from broker.metrics import serve_metrics

log = logging.getLogger("balancer")


EPILOG = """\
Reads {prefix}:requests as consumer group 'balancers', validates, admits and routes each request to
a worker group's queue. Routing: the group with the least load (queued and running requests and
tokens, KV utilization, step latency), preferring one that served the prompt's first 128 characters
recently (its prefix cache), near-equal groups in turn. Admission: past the queue bounds a request
ends at once with error 'overloaded'. A group whose heartbeat is 3 s old is failed over: its requests
continue on other groups of the same model from the tokens already streamed. Entries of a balancer
that died are taken over after 2 s. Models: a request names a served model ('model'); without one it
goes to the only model served, else to --default-model; a name no group serves ends at once with
error 'model_not_found'.

Settings (environment): RYZ_GROUP_MAX_REQUESTS (4096), RYZ_GROUP_MAX_TOKENS (8388608),
RYZ_TOTAL_MAX_REQUESTS (16384), RYZ_TOTAL_MAX_TOKENS (67108864), RYZ_BALANCER_BATCH_WAIT_MS (1),
RYZ_DEAD_AFTER_S (3), RYZ_CLAIM_IDLE_MS (2000), RYZ_AFFINITY_PREFIX_CHARS (128), RYZ_NO_GROUP_WAIT_S
(30); all in broker/settings.py. Stats (batch sizes, counts, detection times): {prefix}:balancer:<name>.
"""


def configure(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = EPILOG
    parser.add_argument("--name", default=None, help="consumer name (default: <host>-<pid>-<random>)")
    parser.add_argument("--wait-broker", type=float, default=30.0,
                        help="seconds to wait for an embedded broker to appear when no URL is given")
    parser.add_argument("--default-model", default=None, metavar="NAME",
                        help="served model name for requests without 'model' when several models are "
                             "served (default: $RYZ_DEFAULT_MODEL; unset: such requests are invalid)")
    add_metrics(parser)


def run(args: argparse.Namespace) -> int:
    setup_logging(args)
    settings = settings_from_args(args)
    if args.default_model is not None:
        settings = settings.model_copy(update={"default_model": args.default_model})
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
    print(f"balancer {balancer.name} on {mask_url(url)}", flush=True)
    balancer.run()
    return 0
