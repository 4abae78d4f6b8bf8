"""``ryzanstein broker`` / ``python -m broker``: the embedded Redis in the foreground."""

from __future__ import annotations

import argparse
import signal
import threading
from types import FrameType

from broker.cli_common import settings_from_args, setup_logging
from broker.embedded import EmbeddedRedis, announce, withdraw


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--port", type=int, default=None, help="TCP port on 127.0.0.1 (default: a free one)")
    parser.add_argument("--unix-socket", action="store_true", help="listen on a unix socket in a private temp dir")
    parser.add_argument("--appendonly", action="store_true", help="persist with an AOF (survives restarts)")
    parser.add_argument("--dir", default=None, help="data directory (default: a temp dir removed on exit)")


def run(args: argparse.Namespace) -> int:
    setup_logging(args)
    settings = settings_from_args(args)
    stop = threading.Event()

    def on_signal(_signum: int, _frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    with EmbeddedRedis(port=args.port, unix_socket=args.unix_socket, appendonly=args.appendonly,
                       data_dir=args.dir) as server:
        announce(server.url, prefix=settings.prefix)
        print(f"embedded redis-server serving {server.url} (Ctrl-C stops it)", flush=True)
        try:
            while not stop.wait(0.5):
                if server.proc is not None and server.proc.poll() is not None:
                    print(f"redis-server exited with {server.proc.returncode}", flush=True)
                    return 1
        finally:
            withdraw(prefix=settings.prefix)
    return 0
