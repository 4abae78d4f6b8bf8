"""``python -m balancer``: one balancer process (balancer.cli), without the ``ryzanstein`` command."""

import argparse
import sys

from balancer.cli import configure, run
from broker.cli_common import add_common, run_command

parser = argparse.ArgumentParser(prog="python -m balancer", description="One ryzanstein balancer.")
add_common(parser)
configure(parser)
sys.exit(run_command("python -m balancer", run, parser.parse_args()))
