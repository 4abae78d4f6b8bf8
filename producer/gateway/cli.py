"""``ryzanstein gateway``: serve the OpenAI-compatible HTTP API on uvicorn."""

from __future__ import annotations

import argparse
import os

from broker.cli_common import settings_from_args, setup_logging
from broker.connection import resolve_url
from broker.errors import ConfigError
from producer.gateway.config import GatewayConfig

DEFAULTS = GatewayConfig()


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; "
                                                            "0.0.0.0 for every interface)")
    parser.add_argument("--port", type=int, default=8000, help="TCP port (default 8000; 0 picks a free one)")
    parser.add_argument(
        "--chat-template", default=None, metavar="PATH",
        help="chat template for every model: a model directory, its tokenizer_config.json, or a Jinja file "
             "(default: the template of the model directory the worker groups serve, if it is on this "
             "machine, else a plain 'role: content' template)",
    )
    parser.add_argument("--model-dir", dest="chat_template_dir", default=None, metavar="DIR",
                        help="take the chat template from this model directory (same as --chat-template DIR)")
    parser.add_argument(
        "--request-timeout", type=float, default=DEFAULTS.request_timeout_s, metavar="S",
        help=f"server-side deadline of every request, in seconds (default {DEFAULTS.request_timeout_s:g}); "
             "a request past it ends with HTTP 504",
    )
    parser.add_argument(
        "--max-concurrency", type=int, default=DEFAULTS.max_concurrency, metavar="N",
        help=f"requests in flight through this gateway at most; more get HTTP 429 (default {DEFAULTS.max_concurrency})",
    )
    parser.add_argument(
        "--chat-max-tokens", type=int, default=DEFAULTS.chat_max_tokens, metavar="N",
        help="chat requests that set no max_tokens get the rest of the model's context, up to N "
             f"(default {DEFAULTS.chat_max_tokens})",
    )
    parser.add_argument(
        "--api-key", dest="api_keys", action="append", default=None, metavar="KEY",
        help="require 'Authorization: Bearer KEY' on /v1 (repeatable: any of the keys; default: "
             "$RYZ_API_KEY if set, else no key needed)",
    )
    parser.add_argument("--access-log", action="store_true", help="log every HTTP request")
    parser.add_argument("--wait-broker", type=float, default=30.0, metavar="S",
                        help="without a URL, wait this long for the embedded broker to be announced (default 30)")


def run(args: argparse.Namespace) -> int:
    setup_logging(args)
    settings = settings_from_args(args)
    url = resolve_url(settings, wait_s=args.wait_broker)
    if args.chat_template and args.chat_template_dir:
        raise ConfigError("give --chat-template or --model-dir, not both")
    if any(not key.strip() for key in args.api_keys or ()):
        raise ConfigError("--api-key must not be empty")
    for flag, value in (("--request-timeout", args.request_timeout), ("--max-concurrency", args.max_concurrency),
                        ("--chat-max-tokens", args.chat_max_tokens)):
        if not value > 0:
            raise ConfigError(f"{flag} must be positive, got {value}")
    config = GatewayConfig(
        request_timeout_s=args.request_timeout,
        max_concurrency=args.max_concurrency,
        chat_max_tokens=args.chat_max_tokens,
        chat_template=args.chat_template or args.chat_template_dir,
        api_keys=tuple(args.api_keys or ([os.environ["RYZ_API_KEY"]] if os.environ.get("RYZ_API_KEY") else [])),
    )
    from producer.gateway.app import create_app
    from producer.gateway.server import serve

    app = create_app(settings, url, config)
    return 0 if serve(app, host=args.host, port=args.port, access_log=args.access_log) else 1
