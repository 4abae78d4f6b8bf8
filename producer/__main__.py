"""``python -m producer "prompt" ...``: the same as ``ryzanstein submit``.

``python -m producer gateway ...`` and ``python -m producer batch ...`` are ``ryzanstein gateway``
and ``ryzanstein batch`` (the client surfaces a Procfile or a supervisor runs as modules). They are
dispatched here, not through the ``ryzanstein`` command, so that the client package imports nothing
of the operator's (``ryzanstein/``).
"""

from __future__ import annotations

import argparse
import importlib
import sys

from broker.cli_common import add_common, run_command
from producer import submit

# First arguments that name a command instead of being a prompt -> (module, description).
COMMANDS = {
    "gateway": ("producer.gateway.cli", "an OpenAI-compatible HTTP API (/v1/completions, /v1/chat/completions)"),
    "batch": ("producer.batch.cli", "offline batch jobs on RQ: submit a JSONL file of prompts, run workers, watch progress"),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in COMMANDS:
        name = argv[0]
        module_name, description = COMMANDS[name]
        module = importlib.import_module(module_name)
        command = argparse.ArgumentParser(prog=f"python -m producer {name}", description=description)
        add_common(command)
        module.configure(command)
        return run_command(f"ryzanstein {name}", module.run, command.parse_args(argv[1:]))
    parser = argparse.ArgumentParser(
        prog="python -m producer", description="Send one request and print the result."
    )
    add_common(parser)
    submit.configure(parser)
    return run_command("python -m producer", submit.run, parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
