"""``ryzanstein health``: exit 0 when healthy, 1 when not; for probes, healthchecks and scripts.

Three questions, by the options given:

- ``--metrics-port P``: does the process serving on port P (on ``--host``, default loopback) pass
  its liveness probe (``/livez``), or with ``--ready`` its readiness probe (``/readyz``)? For
  container healthchecks: it needs no Redis URL and no curl in the image.
- ``--group NAME``: is group NAME heartbeating (``alive`` in the registry), and with ``--ready``
  also taking work (not draining)?
- neither: does the request path work: Redis answers, a balancer reads the ingress stream (no
  request waits unread), and at least one group is alive and taking work
  (``broker.path_health``)? The requests waiting unread on each tenant's stream are printed too.
"""

from __future__ import annotations

import argparse
import json
import urllib.error
import urllib.request

from redis.exceptions import RedisError

from broker.cli_common import settings_from_args, setup_logging
from broker.connection import TRANSIENT_ERRORS, connect, resolve_url
from broker.failures import describe
from broker.keys import Keys
from broker.path_health import judge, read_path

HTTP_TIMEOUT_S = 3.0


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--metrics-port", type=int, default=None, metavar="PORT",
                        help="probe the process serving metrics on PORT (/livez, or /readyz with --ready)")
    parser.add_argument("--host", default="127.0.0.1", help="host of --metrics-port (default 127.0.0.1)")
    parser.add_argument("--group", default=None, metavar="NAME", help="check this group's heartbeat in Redis")
    parser.add_argument("--ready", action="store_true",
                        help="also require that it takes work (ready, not draining)")


def probe_http(host: str, port: int, *, ready: bool) -> tuple[bool, str]:
    """(healthy, what the endpoint said) for the probe endpoint of one process."""
    url = f"http://{host}:{port}/{'readyz' if ready else 'livez'}"
    try:
        with urllib.request.urlopen(url, timeout=HTTP_TIMEOUT_S) as answer:
            return True, answer.read().decode(errors="replace").strip()
    except urllib.error.HTTPError as exc:
        return False, exc.read().decode(errors="replace").strip() or f"HTTP {exc.code}"
    except (OSError, ValueError) as exc:
        return False, f"{url}: {exc}"


def run(args: argparse.Namespace) -> int:
    setup_logging(args)
    if args.metrics_port is not None:
        ok, said = probe_http(args.host, args.metrics_port, ready=args.ready)
        print(said, flush=True)
        return 0 if ok else 1
    settings = settings_from_args(args)
    redis = connect(resolve_url(settings), settings)
    try:
        view = read_path(redis, Keys(settings.prefix), dead_after_s=settings.dead_after_s,
                         shards=settings.ingress_shards)
    except TRANSIENT_ERRORS + (RedisError,) as exc:
        problem = describe(exc, settings.redis_url)
        print(f"unhealthy: {problem.line if problem else exc}", flush=True)
        return 1
    finally:
        redis.close()
    if args.group is not None:
        group = next((g for g in view.groups if g.name == args.group), None)
        if group is None:
            print(f"group {args.group}: not registered", flush=True)
            return 1
        ok = group.routable if args.ready else group.alive
        print(json.dumps({"group": group.name, "alive": group.alive, "state": group.state,
                          "heartbeat_age_s": round(group.heartbeat_age_s, 3)}), flush=True)
        return 0 if ok else 1
    health = judge(view, balancer_dead_after_s=settings.balancer_dead_after_s)
    served = f"{len(health.serving)} of {len(view.groups)} groups alive and taking work"
    waiting = [f"{t} {n}" for t, n in sorted(view.tenants.items(), key=lambda tn: (-tn[1], tn[0])) if n]
    tenants = f"; unread on tenants' streams: {', '.join(waiting)}" if waiting else ""
    print(f"ok: {served}; a balancer reads the ingress stream{tenants}" if health.ok
          else f"unhealthy: {health.reason} ({served}){tenants}", flush=True)
    return 0 if health.ok else 1
