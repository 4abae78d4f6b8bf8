"""Options every ryzanstein command shares, and logging setup."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time

from broker.settings import Settings, load_settings


def add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--redis-url", default=None,
                        help="Redis URL (redis://, rediss://, unix://; user:password@ for ACL). "
                             "Default: $RYZ_REDIS_URL, else the embedded broker of `ryzanstein up`/`broker`.")
    parser.add_argument("--prefix", default=None, help="key prefix (default: $RYZ_PREFIX, else 'ryz')")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    parser.add_argument("--log-json", action="store_true", help="log one JSON object per line")


def settings_from_args(args: argparse.Namespace) -> Settings:
    return load_settings(redis_url=args.redis_url, prefix=args.prefix)


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {"ts": round(time.time(), 3), "level": record.levelname, "logger": record.name, "msg": record.getMessage()}
        for key in ("request_id", "group"):
            if hasattr(record, key):
                out[key] = getattr(record, key)
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out)


def setup_logging(args: argparse.Namespace) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if getattr(args, "log_json", False):
        handler.setFormatter(_JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s"))
    logging.basicConfig(level=getattr(args, "log_level", "INFO"), handlers=[handler], force=True)
