"""``ryzanstein status``: the worker groups, their health and load, balancers, and queue depths.

One snapshot is read from Redis (the group registry, and every ingress stream balancers read: the
shared one, its shards, each tenant's and each removed tenant's (broker.sources), with their
consumer groups);
``--watch`` reads one every few seconds, clears the terminal, and adds each group's request rate
since the previous snapshot. ``--json`` prints the snapshot as one JSON object (one per line with
``--watch``), with the fields CONTRACT.md promises and more.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, TextIO

from redis import Redis
from redis.exceptions import ResponseError

from broker.cli_common import settings_from_args, setup_logging
from broker.connection import TRANSIENT_ERRORS, connect, pipe_time, resolve_url, time_pair
from broker.ingress_depth import StreamDepth, add_reads, depth_of
from broker.keys import INGRESS_GROUP, Keys
from broker.registry import GroupStatus, read_groups
from broker.settings import Settings
from broker.sources import read_tenants, sources

DEFAULT_WATCH_S = 2.0
IDLE_AFTER_S = 2.0  # a live balancer that read nothing for this long is idle (its reads return empty)
_CLEAR_SCREEN = "\x1b[H\x1b[2J"
TENANTS_SHOWN = 10  # the table shows the tenants with the most entries waiting; --json all of them


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
        help=f"refresh every SECONDS (default {DEFAULT_WATCH_S:g}) until Ctrl-C, with request rates",
    )


@dataclass(frozen=True, slots=True)
class BalancerInfo:
    """A consumer of the ingress stream, as Redis sees it."""

    name: str
    pending: int  # entries it read and has not acknowledged (of every ingress stream)
    idle_s: float  # since it last read entries (Redis does not count reads that return nothing)
    heartbeat_age_s: float | None = None  # of its stats key, written after every read; None: none


@dataclass(frozen=True, slots=True)
class Snapshot:
    groups: list[GroupStatus]
    # entries on the ingress streams, all of them (shared, shards, tenants, removed tenants): new, or
    # read and not yet acknowledged
    ingress_depth: int
    ingress_pending: int  # of those, read by a balancer and not yet acknowledged
    balancers: list[BalancerInfo]
    taken_at_s: float  # monotonic seconds, for rates between two snapshots
    tenants: list[StreamDepth] = field(default_factory=list)  # each current tenant's stream (included above)


def read_snapshot(redis: Redis, keys: Keys, *, dead_after_s: float, now_s: float, shards: int) -> Snapshot:
    """Everything ``status`` shows, as Redis has it now (``now_s``: the caller's monotonic time),
    with ``shards`` ingress shards (``Settings.ingress_shards``)."""
    groups = read_groups(redis, keys, dead_after_s=dead_after_s)
    streams = sources(keys, read_tenants(redis, keys), read_tenants(redis, keys, removed=True), shards=shards)
    pipe = redis.pipeline(transaction=False)
    pipe.xinfo_consumers(keys.requests, INGRESS_GROUP)
    pipe_time(pipe, keys.groups)
    pipe.zrange(keys.balancers, 0, -1, withscores=True)
    for source in streams:
        add_reads(pipe, source.stream)
    for source in streams[1:]:
        pipe.xinfo_consumers(source.stream, INGRESS_GROUP)
    consumers, raw_time, beats, *replies = pipe.execute(raise_on_error=False)
    secs, micros = time_pair(raw_time)
    reads, held = replies[: 2 * len(streams)], replies[2 * len(streams):]
    depths = [depth_of(source, length, infos) for source, length, infos in zip(streams, reads[0::2], reads[1::2])]
    pending: Counter[str] = Counter()  # each balancer's entries of the other streams (shards, tenants)
    for reply in held:
        if isinstance(reply, list):  # (a stream not made yet: NOGROUP)
            pending.update({_text(c["name"]): int(c["pending"]) for c in reply})
    now_ms = secs * 1000.0 + micros / 1000.0
    beat_age = {_text(name): max(0.0, (now_ms - score) / 1000.0) for name, score in beats}
    balancers = [] if isinstance(consumers, ResponseError) else [
        BalancerInfo(_text(c["name"]), int(c["pending"]) + pending[_text(c["name"])], int(c["idle"]) / 1000.0,
                     beat_age.get(_text(c["name"])))
        for c in consumers
    ]
    return Snapshot(groups, sum(d.depth for d in depths), sum(d.pending for d in depths),
                    sorted(balancers, key=lambda b: b.name), now_s,
                    [d for d in depths if d.tenant is not None and not d.removed])


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def request_rates(previous: Snapshot, current: Snapshot) -> dict[str, float]:
    """Requests per second each group finished between two snapshots (same leader in both)."""
    elapsed = current.taken_at_s - previous.taken_at_s
    if elapsed <= 0:
        return {}
    before = {(g.name, g.leader_pid): g.completed for g in previous.groups}
    rates = {}
    for g in current.groups:
        done_before = before.get((g.name, g.leader_pid))
        if done_before is not None and g.completed >= done_before:
            rates[g.name] = (g.completed - done_before) / elapsed
    return rates


def status_json(snapshot: Snapshot, rates: dict[str, float] | None = None) -> dict[str, Any]:
    """What ``status --json`` prints."""
    groups = []
    for g in snapshot.groups:
        row = g.to_json()
        if rates is not None and g.name in rates:
            row["requests_per_s"] = round(rates[g.name], 3)
        groups.append(row)
    return {
        "groups": groups,
        "models": models_json(snapshot.groups),
        "ingress_depth": snapshot.ingress_depth,
        "ingress_pending": snapshot.ingress_pending,
        "balancers": [asdict(b) for b in snapshot.balancers],
        **({"tenants": {t.tenant: {"depth": t.depth, "pending": t.pending, "unread": t.unread}
                        for t in snapshot.tenants}} if snapshot.tenants else {}),
    }


def model_name(group: GroupStatus) -> str:
    """The canonical name of the model a group serves (its first served name)."""
    return group.served_models[0] if group.served_models else group.model


def models_json(groups: Sequence[GroupStatus]) -> dict[str, dict[str, Any]]:
    """The groups by served model (canonical name): their names, aliases, how many are alive, and
    the weights fingerprints among them (two during a rolling upgrade)."""
    out: dict[str, dict[str, Any]] = {}
    for g in sorted(groups, key=lambda g: (model_name(g), g.name)):
        entry = out.setdefault(model_name(g), {"groups": [], "aliases": [], "alive": 0, "weights": []})
        entry["groups"].append(g.name)
        entry["alive"] += g.alive
        for alias in g.served_models[1:]:
            if alias not in entry["aliases"]:
                entry["aliases"].append(alias)
        if g.weights and g.weights not in entry["weights"]:
            entry["weights"].append(g.weights)
    return out


def _state(group: GroupStatus) -> str:
    if not group.alive:
        return "DEAD"
    if group.state == "loading":
        return f"loading:{group.phase.split()[0]}" if group.phase else "loading"  # loading:KV, loading:pack
    return "DRAINING" if group.state == "draining" else group.state


def _kv(group: GroupStatus) -> str:
    used, capacity = group.kv_used_tokens, group.kv_capacity_tokens
    if capacity <= 0:
        return "-"  # no KV cache (the echo engine)
    return f"{used}/{capacity} ({100 * used / capacity:.0f}%)"


def _size(n: int) -> str:
    for unit, scale in (("G", 2**30), ("M", 2**20), ("K", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f}{unit}" if n < 10 * scale else f"{n // scale}{unit}"
    return f"{n}B"


def _rank_memory(group: GroupStatus) -> str:
    """Weights + KV cache of each rank: ``1.9G+512M x2`` when the ranks hold alike, else one per rank."""
    if not group.rank_weight_bytes:
        return "-"  # no model (the echo engine), or a group from before this field
    per = [f"{_size(w)}+{_size(kv)}" for w, kv in zip(group.rank_weight_bytes, group.rank_kv_bytes)]
    if len(set(per)) == 1:
        return per[0] if len(per) == 1 else f"{per[0]} x{len(per)}"
    return ",".join(per)


def _columns(rows: Sequence[Sequence[str]]) -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows]


@dataclass(frozen=True, slots=True)
class _Column:
    header: str
    priority: int  # the lowest are compacted first, then dropped, until the table fits
    full: Callable[[GroupStatus], str]
    compact: tuple[str, Callable[[GroupStatus], str]] | None = None  # (header, value) when space is short


def _group_columns(rates: dict[str, float] | None) -> list[_Column]:
    def rate(g: GroupStatus) -> str:
        return f"{rates[g.name]:.1f}" if rates is not None and g.name in rates else "-"

    def kv_share(g: GroupStatus) -> str:
        return f"{100 * g.kv_used_tokens / g.kv_capacity_tokens:.0f}%" if g.kv_capacity_tokens > 0 else "-"

    return [
        _Column("GROUP", 100, lambda g: g.name),
        _Column("STATE", 100, _state),
        _Column("TP", 40, lambda g: str(g.tp)),
        _Column("MODEL", 80, model_name),  # the served name, never a machine path
        _Column("KV DTYPE", 30, lambda g: g.kv_dtype),
        _Column("KV USED/CAPACITY", 82, _kv, ("KV", kv_share)),
        _Column("WEIGHTS+KV/RANK", 15, _rank_memory),
        _Column("RUN", 90, lambda g: str(g.running)),
        _Column("WAIT", 90, lambda g: str(g.waiting)),
        _Column("QUEUE", 85, lambda g: str(g.queue_depth)),
        _Column("TOK/S", 70, lambda g: f"{g.tokens_per_s:.1f}"),
        _Column("REQ/S", 50, rate),
        _Column("HEARTBEAT", 65, lambda g: f"{g.heartbeat_age_s:.1f}s ago", ("BEAT", lambda g: f"{g.heartbeat_age_s:.1f}s")),
        _Column("LEADER", 20, lambda g: f"{g.leader_pid}@{g.host}"),
        _Column("METRICS", 10, lambda g: f"{g.host}:{g.metrics_port}" if g.metrics_port is not None else "-"),
    ]


def _fit(columns: list[_Column], groups: list[GroupStatus], width: int) -> list[str]:
    """The group table within ``width`` characters: columns taken by priority while they fit (in
    their compact rendering), then widened to their full rendering by priority while that fits. The
    identifying columns (GROUP, STATE) are kept whatever the width."""
    forms = [c.compact or (c.header, c.full) for c in columns]

    def lines(kept: list[int]) -> list[str]:
        kept = sorted(kept)
        return _columns([[forms[i][0] for i in kept]] + [[forms[i][1](g) for i in kept] for g in groups])

    def fits(kept: list[int]) -> bool:
        return max(len(line) for line in lines(kept)) <= width

    by_priority = sorted(range(len(columns)), key=lambda i: -columns[i].priority)
    kept: list[int] = []
    for i in by_priority:
        if columns[i].priority >= 100 or fits([*kept, i]):
            kept.append(i)
    for i in by_priority:
        if i in kept and columns[i].compact is not None:
            compact, forms[i] = forms[i], (columns[i].header, columns[i].full)
            if not fits(kept):
                forms[i] = compact
    return lines(kept)


def _balancer_state(b: BalancerInfo, *, dead_after_s: float) -> str:
    """What a balancer is doing: reading (just read entries), routing (holds entries), idle (nothing
    to read: its reads block and return empty, which Redis does not count as activity), or gone."""
    if b.heartbeat_age_s is None or b.heartbeat_age_s > dead_after_s:
        return "GONE"
    if b.pending:
        return "routing"
    return "idle" if b.idle_s > IDLE_AFTER_S else "reading"


def render_table(snapshot: Snapshot, *, rates: dict[str, float] | None = None, title: str | None = None,
                 width: int = 80, balancer_dead_after_s: float = 10.0) -> str:
    """The snapshot for a person, within ``width`` columns: groups, balancers, then totals and the
    ingress depth (all streams), then the tenants with the most entries waiting on their streams."""
    lines = [title, ""] if title else []
    groups = sorted(snapshot.groups, key=lambda g: (model_name(g), g.name))  # grouped by model
    if groups:
        lines += _fit(_group_columns(rates), groups, width)
    else:
        lines.append("no worker groups registered")
    if snapshot.balancers:
        lines.append("")
        lines += _columns([("BALANCER", "STATE", "PENDING", "LAST SEEN")] + [
            (b.name, _balancer_state(b, dead_after_s=balancer_dead_after_s), str(b.pending),
             "-" if b.heartbeat_age_s is None else f"{b.heartbeat_age_s:.1f}s ago")
            for b in snapshot.balancers
        ])
    live = [g for g in groups if g.alive]
    if groups:
        draining = sum(g.state == "draining" for g in live)
        loading = sum(g.state == "loading" for g in live)
        states = ", ".join(f"{n} {what}" for n, what in ((draining, "draining"), (loading, "loading")) if n)
        alive = f"{len(live)}/{len(groups)} groups alive" + (f" ({states})" if states else "")
        load = (f"running {sum(g.running for g in live)}, waiting {sum(g.waiting for g in live)}, "
                f"queued {sum(g.queue_depth for g in live)}; {sum(g.tokens_per_s for g in live):.1f} tok/s")
        if rates:
            load += f", {sum(rates.get(g.name, 0.0) for g in live):.1f} req/s"
        totals = f"{alive}; {load}"
        lines += ["", totals] if len(totals) <= width else ["", f"{alive};", load]
        models = models_json(groups)
        if len(models) > 1:
            lines += [f"  {name}: {m['alive']}/{len(m['groups'])} groups alive"
                      + (f", aliases {', '.join(m['aliases'])}" if m["aliases"] else "")
                      + (f", {len(m['weights'])} weights versions" if len(m["weights"]) > 1 else "")
                      for name, m in models.items()]
    lines.append(f"ingress: {snapshot.ingress_depth} entries ({snapshot.ingress_pending} being routed by balancers)")
    busy = sorted((t for t in snapshot.tenants if t.depth), key=lambda t: (-t.depth, t.tenant or ""))
    lines += [f"  tenant {t.tenant}: {t.depth} entries ({t.pending} being routed, {t.unread} unread)"
              for t in busy[:TENANTS_SHOWN]]
    if len(busy) > TENANTS_SHOWN:
        lines.append(f"  ... and {len(busy) - TENANTS_SHOWN} more tenants with entries (--json lists all)")
    return "\n".join(lines)


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


class _Viewer:
    """Reads snapshots and prints them; remembers the last one for request rates."""

    def __init__(self, redis: Redis, keys: Keys, settings: Settings, *, as_json: bool, out: TextIO,
                 clear: bool = False, prefix: str = "") -> None:
        self.redis, self.keys, self.settings = redis, keys, settings
        self.as_json, self.out, self.clear, self.prefix = as_json, out, clear, prefix
        self.previous: Snapshot | None = None

    def show(self, *, every_s: float | None = None) -> None:
        """Print one snapshot; ``every_s``: the --watch interval, for the title."""
        snapshot = read_snapshot(self.redis, self.keys, dead_after_s=self.settings.dead_after_s,
                                 now_s=time.monotonic(), shards=self.settings.ingress_shards)
        rates = request_rates(self.previous, snapshot) if self.previous is not None else None
        self.previous = snapshot
        if self.as_json:
            print(json.dumps(status_json(snapshot, rates)), file=self.out, flush=True)
            return
        title = (f"ryzanstein status: prefix {self.prefix!r}, {time.strftime('%H:%M:%S')}, "
                 f"every {every_s:g}s (Ctrl-C stops)") if every_s else None
        text = render_table(snapshot, rates=rates, title=title, width=shutil.get_terminal_size((80, 24)).columns,
                            balancer_dead_after_s=self.settings.balancer_dead_after_s)
        print((_CLEAR_SCREEN if self.clear else "") + text, file=self.out, flush=True)


def run(args: argparse.Namespace) -> int:
    setup_logging(args)
    settings = settings_from_args(args)
    keys = Keys(settings.prefix)
    redis = connect(resolve_url(settings), settings)
    out = sys.stdout
    viewer = _Viewer(redis, keys, settings, as_json=args.json, out=out,
                     clear=out.isatty() and not args.json, prefix=settings.prefix)
    try:
        if args.watch is None:
            viewer.show()
            return 0
        interval = max(0.1, args.watch)
        with contextlib.suppress(KeyboardInterrupt):
            watch(lambda: viewer.show(every_s=interval), interval)
        return 0
    finally:
        redis.close()
