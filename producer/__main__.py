"""``python -m producer "prompt" ...``: the same as ``ryzanstein submit``.

``python -m producer gateway ...`` and ``python -m producer batch ...`` are ``ryzanstein gateway``
and ``ryzanstein batch`` (the client surfaces a Procfile or a supervisor runs as modules).
"""

from __future__ import annotations

import argparse
import sys

from broker.cli_common import add_common, run_command
from producer import cli, submit

# First arguments that name a command instead of being a prompt.
COMMANDS = ("gateway", "batch")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in COMMANDS:
        return cli.main(argv)
    parser = argparse.ArgumentParser(
        prog="python -m producer", description="Send one request and print the result."
    )
    add_common(parser)
    submit.configure(parser)
    return run_command("python -m producer", submit.run, parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
