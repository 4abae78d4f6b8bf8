"""``ryzanstein submit``: send one request and print its result.

Exit status: 0 on a ``done`` event, 1 on an ``error`` event or when no result came within
``--wait``, 2 for a bad command line or no Redis to talk to, 130 when interrupted (Ctrl-C). A
request given up on (``--wait`` passed, Ctrl-C) is cancelled.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from typing import Any, TextIO

from broker.cli_common import settings_from_args, setup_logging
from broker.connection import TRANSIENT_ERRORS
from broker.errors import RequestFailed
from producer.client import Client, Completion, Event, Handle, RequestOptions

DEFAULT_WAIT_S = 300.0


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("prompt", nargs="?", default=None, help="the prompt text ('-' reads it from stdin)")
    parser.add_argument(
        "--prompt-ids",
        default=None,
        metavar="JSON",
        help="token ids instead of a prompt, as a JSON array: '[1, 2, 3]'",
    )
    parser.add_argument(
        "--max-tokens", type=int, default=None, help="tokens to generate at most (default 16)"
    )
    parser.add_argument("--temperature", type=float, default=None, help="0 means greedy (default 1.0)")
    parser.add_argument("--top-p", type=float, default=None, help="nucleus sampling, in (0, 1] (default 1.0)")
    parser.add_argument("--top-k", type=int, default=None, help="0 means off (default 0)")
    parser.add_argument("--seed", type=int, default=None, help="makes sampling reproducible")
    parser.add_argument(
        "--stop",
        action="append",
        default=None,
        metavar="S",
        help="stop sequence, not included in the output (repeatable)",
    )
    parser.add_argument("--stop-token-id", dest="stop_token_ids", type=int, action="append", default=None,
                        metavar="ID", help="token id that ends generation (repeatable)")
    parser.add_argument("--model", default=None, metavar="NAME",
                        help="served model name (default: the only model served, or the balancers' default)")
    parser.add_argument("--stream", action="store_true", help="print the text as it is generated")
    controls = parser.add_argument_group("sampling controls (vLLM's meanings; docs/PROTOCOL.md)")
    controls.add_argument("--presence-penalty", type=float, default=None, metavar="X", help="in [-2, 2]")
    controls.add_argument("--frequency-penalty", type=float, default=None, metavar="X", help="in [-2, 2]")
    controls.add_argument("--repetition-penalty", type=float, default=None, metavar="X", help="in (0, 2]; 1 is off")
    controls.add_argument("--min-p", type=float, default=None, metavar="P", help="in [0, 1]")
    controls.add_argument("--min-tokens", type=int, default=None, metavar="N",
                          help="no EOS or stop string before N tokens")
    controls.add_argument("--ignore-eos", action="store_true", help="go on through the model's EOS token")
    controls.add_argument("--logit-bias", default=None, metavar="JSON",
                          help="""token id -> bias in [-100, 100]: '{"50256": -100}'""")
    controls.add_argument("--bad-word", dest="bad_words", action="append", default=None, metavar="W",
                          help="a word the output never contains (repeatable)")
    parser.add_argument("--priority", type=int, default=None, help="lower is served earlier (default 0)")
    parser.add_argument(
        "--timeout",
        type=float,
        default=None,
        metavar="S",
        help="server-side deadline from enqueue: past it the request ends with error 'timeout'",
    )
    parser.add_argument("--id", dest="request_id", default=None, help="request id (default: a random one)")
    parser.add_argument("--reply-to", default=None, metavar="KEY", help="stream to send the events to")
    parser.add_argument(
        "--wait",
        type=float,
        default=DEFAULT_WAIT_S,
        metavar="S",
        help=f"give up waiting for the result after this long (default {DEFAULT_WAIT_S:g}s)",
    )
    parser.add_argument(
        "--json",
        action="store_true",
        help="print the done event as one JSON object (with --stream: every event, one per line)",
    )


def _options(args: argparse.Namespace) -> tuple[str | None, RequestOptions]:
    """The prompt and request options of the command line; ValueError for unusable ones."""
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    prompt_ids = None
    if args.prompt_ids is not None:
        try:
            prompt_ids = json.loads(args.prompt_ids)
        except ValueError:
            prompt_ids = None
        if not isinstance(prompt_ids, list) or not all(isinstance(t, int) for t in prompt_ids):
            raise ValueError(f"--prompt-ids: expected a JSON array of integers, got {args.prompt_ids!r:.60}")
    if (prompt is None) == (prompt_ids is None):
        raise ValueError("give exactly one of a prompt and --prompt-ids")
    options: RequestOptions = {
        "prompt_ids": prompt_ids,
        "max_tokens": args.max_tokens,
        "temperature": args.temperature,
        "top_p": args.top_p,
        "top_k": args.top_k,
        "seed": args.seed,
        "stop": args.stop,
        "stop_token_ids": args.stop_token_ids,
        "model": args.model,
        "stream": args.stream,
        "priority": args.priority,
        "timeout_s": args.timeout,
        "request_id": args.request_id,
        "reply_to": args.reply_to,
        "presence_penalty": args.presence_penalty,
        "frequency_penalty": args.frequency_penalty,
        "repetition_penalty": args.repetition_penalty,
        "min_p": args.min_p,
        "min_tokens": args.min_tokens,
        "ignore_eos": args.ignore_eos,
        "logit_bias": _logit_bias(args.logit_bias),
        "bad_words": args.bad_words,
    }
    return prompt, options


def _logit_bias(text: str | None) -> dict[int | str, float] | None:
    if text is None:
        return None
    try:
        bias = json.loads(text)
    except ValueError:
        bias = None
    if not isinstance(bias, dict) or not all(isinstance(v, (int, float)) for v in bias.values()):
        raise ValueError(f"--logit-bias: expected a JSON object of token id -> number, got {text!r:.60}")
    return bias


def event_json(event: Event) -> dict[str, Any]:
    """An event as JSON, numbers and arrays typed (the wire has only strings)."""
    out: dict[str, Any] = dict(event.fields)
    if event.kind == "done":
        out.update(Completion.from_event(event).to_json())
    elif event.kind == "token":
        for name in ("index", "token_id"):
            if out.get(name, "").lstrip("-").isdigit():
                out[name] = int(out[name])
    return out


def _print_json(obj: dict[str, Any], out: TextIO) -> None:
    print(json.dumps(obj, ensure_ascii=False), file=out, flush=True)


def run(args: argparse.Namespace) -> int:
    setup_logging(args)
    try:
        prompt, options = _options(args)
    except ValueError as exc:
        print(f"ryzanstein submit: {exc}", file=sys.stderr)
        return 2
    out = sys.stdout
    with Client(settings=settings_from_args(args)) as client:
        handle = client.submit(prompt, **options)
        try:
            for event in client.events(handle, timeout=args.wait):
                if args.json and (args.stream or event.final):
                    _print_json(event_json(event), out)
                elif event.kind == "token" and args.stream:
                    out.write(event.text)
                    out.flush()
                elif event.kind == "done":
                    completion = Completion.from_event(event)
                    print("" if args.stream else completion.text, file=out, flush=True)
                event.raise_for_error()
        except RequestFailed as exc:
            if args.stream and not args.json:
                print(file=out, flush=True)
            print(f"error {exc.code}: {exc.message}", file=sys.stderr)
            return 1
        except TimeoutError:
            _cancel(client, handle)
            print(f"error: no result for request {handle.id} within {args.wait:g}s; cancelled it", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            _cancel(client, handle)
            print(f"\nryzanstein submit: interrupted; request {handle.id} cancelled", file=sys.stderr)
            return 130
    return 0


def _cancel(client: Client, handle: Handle) -> None:
    """Cancel an abandoned request, so that its group stops generating for no one (best effort)."""
    with contextlib.suppress(*TRANSIENT_ERRORS):
        client.cancel(handle)
