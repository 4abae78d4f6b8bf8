"""``python -m producer "prompt" ...``: the same as ``ryzanstein submit``."""

from __future__ import annotations

import argparse
import sys

from broker.cli_common import add_common
from broker.errors import ConfigError
from producer import submit


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m producer", description="Send one request and print the result."
    )
    add_common(parser)
    submit.configure(parser)
    args = parser.parse_args(argv)
    try:
        return submit.run(args)
    except ConfigError as exc:
        print(f"python -m producer: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
