"""``ryzanstein status``: the worker groups, their health and load, and the ingress depth."""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from collections.abc import Callable
from typing import Any, TextIO

from broker.cli_common import settings_from_args, setup_logging
from broker.connection import TRANSIENT_ERRORS, connect, resolve_url
from broker.keys import Keys
from broker.registry import GroupStatus, read_groups
from broker.settings import Settings

DEFAULT_WATCH_S = 2.0
_CLEAR_SCREEN = "\x1b[H\x1b[2J"


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--json", action="store_true", help="print one JSON object (with --watch: one per line)"
    )
    parser.add_argument(
        "--watch",
        nargs="?",
        type=float,
        const=DEFAULT_WATCH_S,
        default=None,
        metavar="SECONDS",
        help=f"refresh every SECONDS (default {DEFAULT_WATCH_S:g}) until Ctrl-C",
    )


def read_status(redis: Any, keys: Keys, *, dead_after_s: float) -> tuple[list[GroupStatus], int]:
    """Every registered group, alive or not, and the length of the ingress stream."""
    return read_groups(redis, keys, dead_after_s=dead_after_s), int(redis.xlen(keys.requests))


def status_json(groups: list[GroupStatus], ingress_depth: int) -> dict[str, Any]:
    """What ``status --json`` prints."""
    return {"groups": [g.to_json() for g in groups], "ingress_depth": ingress_depth}


def _state(group: GroupStatus) -> str:
    if not group.alive:
        return "DEAD"
    return "DRAINING" if group.state == "draining" else group.state


def _kv(group: GroupStatus) -> str:
    used, capacity = group.kv_used_tokens, group.kv_capacity_tokens
    if capacity <= 0:
        return f"{used}/0"
    return f"{used}/{capacity} ({100 * used / capacity:.0f}%)"


def render_table(groups: list[GroupStatus], ingress_depth: int) -> str:
    """The groups as an aligned table, with the ingress length below."""
    if not groups:
        return f"no worker groups registered\ningress: {ingress_depth} entries"
    header = (
        "GROUP",
        "STATE",
        "TP",
        "MODEL",
        "KV DTYPE",
        "KV USED/CAPACITY",
        "RUN",
        "WAIT",
        "QUEUE",
        "TOK/S",
        "HEARTBEAT",
        "LEADER",
    )
    rows = [header] + [
        (
            g.name,
            _state(g),
            str(g.tp),
            g.model,
            g.kv_dtype,
            _kv(g),
            str(g.running),
            str(g.waiting),
            str(g.queue_depth),
            f"{g.tokens_per_s:.1f}",
            f"{g.heartbeat_age_s:.1f}s ago",
            f"{g.leader_pid}@{g.host}",
        )
        for g in groups
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows]
    alive = sum(g.alive for g in groups)
    lines.append(f"\n{alive}/{len(groups)} groups alive; ingress: {ingress_depth} entries")
    return "\n".join(lines)


def show(redis: Any, keys: Keys, settings: Settings, *, as_json: bool, out: TextIO) -> None:
    """Print the status once."""
    groups, ingress_depth = read_status(redis, keys, dead_after_s=settings.dead_after_s)
    if as_json:
        print(json.dumps(status_json(groups, ingress_depth)), file=out, flush=True)
    else:
        print(render_table(groups, ingress_depth), file=out, flush=True)


def watch(
    step: Callable[[], None], interval_s: float, *, sleep: Callable[[float], None] | None = None
) -> None:
    """Run ``step`` every ``interval_s`` seconds until Ctrl-C; a Redis blip skips one refresh."""
    sleep = sleep or time.sleep
    while True:
        try:
            step()
        except TRANSIENT_ERRORS as exc:
            print(f"redis unavailable: {exc}", file=sys.stderr, flush=True)
        sleep(interval_s)


def run(args: argparse.Namespace) -> int:
    setup_logging(args)
    settings = settings_from_args(args)
    keys = Keys(settings.prefix)
    redis = connect(resolve_url(settings), settings)
    out = sys.stdout
    try:
        if args.watch is None:
            show(redis, keys, settings, as_json=args.json, out=out)
            return 0
        clear = out.isatty() and not args.json

        def step() -> None:
            if clear:
                out.write(_CLEAR_SCREEN)
            show(redis, keys, settings, as_json=args.json, out=out)

        with contextlib.suppress(KeyboardInterrupt):
            watch(step, max(0.1, args.watch))
        return 0
    finally:
        redis.close()
