"""Options every ryzanstein command shares, and logging setup."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
from collections.abc import Callable

from redis.exceptions import RedisError

from broker.errors import ConfigError
from broker.failures import FatalRedisError, describe
from broker.logs import configure_logging
from broker.settings import Settings, load_settings


def add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--redis-url", default=None,
                        help="Redis URL: redis://, rediss:// (TLS), unix://; a Redis Cluster: "
                             "redis+cluster://host:port[,host:port...] (rediss+cluster:// for TLS); Sentinel: "
                             "redis+sentinel://host:port[,host:port...]/service[/db]; user:password@ for ACL. "
                             "Default: $RYZ_REDIS_URL, else the embedded broker of `ryzanstein up`/`broker`.")
    parser.add_argument("--prefix", default=None, help="key prefix (default: $RYZ_PREFIX, else 'ryz')")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    parser.add_argument("--log-format", default=None, choices=["text", "json"],
                        help="text, or json: one JSON object per line (default: $RYZ_LOG_FORMAT, else text)")
    parser.add_argument("--log-json", action="store_true", help="the same as --log-format json")
    parser.add_argument("--log-prompts", action="store_true", default=None,
                        help="include prompt text in request log lines (default: $RYZ_LOG_PROMPTS, else never)")


def add_metrics(parser: argparse.ArgumentParser, *, what: str = "") -> None:
    """``--metrics-port``/``--metrics-host`` for the processes that serve /metrics, /livez, /readyz."""
    parser.add_argument("--metrics-port", type=int, default=None, metavar="PORT",
                        help=f"serve /metrics, /livez and /readyz on PORT; {what}0 picks a free port "
                             "(default: $RYZ_METRICS_PORT, else no endpoint)")
    parser.add_argument("--metrics-host", default=None, metavar="ADDR",
                        help="address the endpoint listens on (default: $RYZ_METRICS_HOST, else 0.0.0.0)")


def settings_from_args(args: argparse.Namespace) -> Settings:
    log_format = "json" if getattr(args, "log_json", False) else getattr(args, "log_format", None)
    return load_settings(redis_url=args.redis_url, prefix=args.prefix, log_format=log_format,
                         log_prompts=getattr(args, "log_prompts", None),
                         metrics_port=getattr(args, "metrics_port", None),
                         metrics_host=getattr(args, "metrics_host", None))


def setup_logging(args: argparse.Namespace) -> None:
    configure_logging(level=getattr(args, "log_level", "INFO"), fmt=settings_from_args(args).log_format)


def run_command(prog: str, run: Callable[[argparse.Namespace], int | None], args: argparse.Namespace) -> int:
    """``run(args)``'s exit code; what the environment got wrong becomes one line on stderr instead
    of a traceback: bad configuration (2), Redis credentials, permissions or TLS (2), Redis
    unreachable or out of memory (1). Ctrl-C is 130. Bugs still show their traceback."""
    try:
        return int(run(args) or 0)
    except ConfigError as exc:
        print(f"{prog}: {exc}", file=sys.stderr, flush=True)
        return 2
    except FatalRedisError as exc:
        url = getattr(args, "redis_url", None) or os.environ.get("RYZ_REDIS_URL")
        problem = (describe(exc.__cause__, url) if exc.__cause__ is not None else None) or exc.problem
        print(f"{prog}: {problem.line}", file=sys.stderr, flush=True)
        return problem.exit_code
    except BrokenPipeError:  # our output's reader left (`ryzanstein status | head`): not an error to report
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except (RedisError, OSError) as exc:
        known = describe(exc, getattr(args, "redis_url", None) or os.environ.get("RYZ_REDIS_URL"))
        if known is None:
            raise
        logging.getLogger(prog).debug("failed", exc_info=True)
        print(f"{prog}: {known.line}", file=sys.stderr, flush=True)
        return known.exit_code
    except KeyboardInterrupt:
        return 130
