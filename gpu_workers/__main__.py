import argparse
import sys

from broker.cli_common import add_common
from broker.errors import ConfigError
from gpu_workers.cli import configure, run

parser = argparse.ArgumentParser(prog="python -m gpu_workers", description="One ryzanstein worker group.")
add_common(parser)
configure(parser)
try:
    sys.exit(run(parser.parse_args()))
except ConfigError as exc:
    print(f"python -m gpu_workers: {exc}", file=sys.stderr)
    sys.exit(2)
