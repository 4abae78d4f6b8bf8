"""``python -m gpu_workers``: one worker group, or one rank of it (gpu_workers.cli), without the ``ryzanstein`` command."""

import argparse
import sys

from broker.cli_common import add_common, run_command
from gpu_workers.cli import configure, run

parser = argparse.ArgumentParser(prog="python -m gpu_workers", description="One ryzanstein worker group.")
add_common(parser)
configure(parser)
sys.exit(run_command("python -m gpu_workers", run, parser.parse_args()))
