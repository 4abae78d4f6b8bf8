"""``python -m broker``: the embedded Redis broker (broker.cli), without the ``ryzanstein`` command."""

import argparse
import sys

from broker.cli import configure, run
from broker.cli_common import add_common, run_command

parser = argparse.ArgumentParser(prog="python -m broker", description="The embedded Redis in the foreground.")
add_common(parser)
configure(parser)
sys.exit(run_command("python -m broker", run, parser.parse_args()))
