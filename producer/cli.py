"""``ryzanstein``: one command, the contract's subcommands (see CONTRACT.md / README.md)."""

from __future__ import annotations

import argparse
import importlib
import sys

from broker.cli_common import add_common, run_command

# subcommand -> module with configure(parser) and run(args) -> exit code
COMMANDS: dict[str, tuple[str, str]] = {
    "up": ("producer.stack", "the whole stack in one process tree: embedded Redis, a balancer, N worker groups"),
    "broker": ("broker.cli", "the embedded Redis in the foreground"),
    "balancer": ("balancer.cli", "one balancer (several may run at once)"),
    "worker": ("gpu_workers.cli", "one worker group of K ranks"),
    "submit": ("producer.submit", "send one request and print the result"),
    "status": ("producer.status", "worker groups, their health and load, queue depths"),
    "health": ("producer.health", "exit 0 if a process, a group, or the deployment is healthy (for probes)"),
    "gateway": ("producer.gateway.cli", "an OpenAI-compatible HTTP API (/v1/completions, /v1/chat/completions)"),
    "batch": ("producer.batch.cli", "offline batch jobs on RQ: submit a JSONL file of prompts, run workers, watch progress"),
    "demo": ("producer.demo", "start the stack on the embedded Redis, send a few requests, print, stop"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ryzanstein", description="Message-queue LLM inference on Redis streams."
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module, help_text) in COMMANDS.items():
        cmd = sub.add_parser(name, help=help_text, description=help_text)
        add_common(cmd)
        importlib.import_module(module).configure(cmd)
        cmd.set_defaults(_module=module)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_command(f"ryzanstein {args.command}", importlib.import_module(args._module).run, args)


if __name__ == "__main__":
    sys.exit(main())
