"""``ryzanstein broker`` / ``python -m broker``: the embedded Redis in the foreground.

On SIGTERM or Ctrl-C it stops taking part last: the server keeps serving while other clients are
connected (worker groups draining and handing their requests back, balancers acknowledging), for up
to ``--linger`` seconds, then stops. Under honcho, which signals every Procfile line at once and
kills what is left after 5 s, the groups can so finish their drain instead of losing Redis first.
"""

from __future__ import annotations

import argparse
import signal
import threading
import time
from collections.abc import Callable
from types import FrameType

import redis

from broker.cli_common import settings_from_args, setup_logging
from broker.connection import TRANSIENT_ERRORS
from broker.embedded import EmbeddedRedis, announce, withdraw

DEFAULT_LINGER_S = 4.5


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--port", type=int, default=None, help="TCP port on 127.0.0.1 (default: a free one)")
    parser.add_argument("--unix-socket", action="store_true", help="listen on a unix socket in a private temp dir")
    parser.add_argument("--appendonly", action="store_true", help="persist with an AOF (survives restarts)")
    parser.add_argument("--dir", default=None, help="data directory (default: a temp dir removed on exit)")
    parser.add_argument("--linger", type=float, default=DEFAULT_LINGER_S, metavar="SECONDS",
                        help="on SIGTERM/Ctrl-C, keep serving while other clients are connected, up to "
                             f"SECONDS (default {DEFAULT_LINGER_S:g}: within honcho's 5 s before SIGKILL)")


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
        left = wait_for_clients(server.url, within_s=args.linger)
        print("embedded redis-server stopping" + (f" with {left} clients still connected" if left else ""),
              flush=True)
    return 0


def wait_for_clients(url: str, *, within_s: float, poll_s: float = 0.1,
                     monotonic: Callable[[], float] = time.monotonic) -> int:
    """Wait until no client but this one is connected to ``url``, for up to ``within_s`` seconds.
    Returns how many were still connected (0: all left)."""
    deadline = monotonic() + within_s
    others = 0
    try:
        with redis.Redis.from_url(url, socket_timeout=1.0, socket_connect_timeout=1.0) as conn:
            me = str(conn.client_id())
            while True:
                others = sum(1 for c in conn.client_list() if str(c.get("id")) != me)
                if others == 0 or monotonic() >= deadline:
                    return others
                time.sleep(poll_s)
    except TRANSIENT_ERRORS:
        return others
