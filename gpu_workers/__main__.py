import argparse
import sys

from broker.cli_common import add_common
from gpu_workers.cli import configure, run

parser = argparse.ArgumentParser(prog="python -m gpu_workers", description="One ryzanstein worker group.")
add_common(parser)
configure(parser)
sys.exit(run(parser.parse_args()))
