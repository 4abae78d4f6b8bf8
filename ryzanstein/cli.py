"""``ryzanstein`` (and ``python -m ryzanstein``): one command, the contract's subcommands (see CONTRACT.md /
README.md). Each subcommand's module, imported only when the parser is built, owns its options
(``configure``) and its run (``run``); this file owns only the table of them."""

from __future__ import annotations

import argparse
import importlib
import sys

from broker.cli_common import add_common, run_command
from producer.__main__ import COMMANDS as FRONT_ENDS

# subcommand -> module with configure(parser) and run(args) -> exit code
COMMANDS: dict[str, tuple[str, str]] = {
    "up": ("ryzanstein.stack", "the whole stack in one process tree: embedded Redis, a balancer, N worker groups"),
    "broker": ("broker.cli", "the embedded Redis in the foreground"),
    "balancer": ("balancer.cli", "one balancer (several may run at once)"),
    "worker": ("gpu_workers.cli", "one worker group of K ranks"),
    "submit": ("producer.submit", "send one request and print the result"),
    "status": ("ryzanstein.status", "worker groups, their health and load, queue depths"),
    "tenant": ("ryzanstein.tenant", "add, remove or list tenants: ingress streams of their own, and their ACL users"),
    "health": ("ryzanstein.health", "exit 0 if a process, a group, or the deployment is healthy (for probes)"),
    **FRONT_ENDS,  # gateway, batch: the client front ends (producer/), also `python -m producer gateway|batch`
    "demo": ("ryzanstein.demo", "start the stack on the embedded Redis, send a few requests, print, stop"),
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
