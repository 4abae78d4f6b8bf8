"""``ryzanstein up``: the whole stack as one process tree, and ``Stack`` for programs and tests.

Children: the embedded redis-server (unless a URL is given), one balancer, N worker groups, each
its own process started with this Python. A child that exits unexpectedly is restarted (with
backoff); Ctrl-C or SIGTERM drains the groups, stops the balancer, then the server.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from types import FrameType
from typing import TYPE_CHECKING

from broker.cli_common import add_metrics, settings_from_args, setup_logging
from broker.connection import connect, mask_url
from broker.embedded import EmbeddedRedis, announce, die_with_parent, withdraw
from broker.errors import ConfigError
from broker.failures import EXIT_FATAL
from broker.keys import Keys
from broker.registry import read_groups
from broker.settings import Settings
from gpu_workers.cli import add_engine_args, engine_argv
from gpu_workers.served import default_served_name

if TYPE_CHECKING:
    from typing_extensions import Self

log = logging.getLogger("ryzanstein.up")


@dataclass
class Child:
    name: str
    argv: list[str]
    proc: subprocess.Popen[bytes] | None = None
    restarts: int = 0
    next_start: float = 0.0


@dataclass
class Stack:
    """A balancer and ``groups`` worker groups of each model on ``redis_url`` (or a new embedded Redis).

    ``models``: several model SPECs, ``groups`` groups of each (default: ``[model]``);
    ``worker_args``: engine flags every group gets; ``balancer_args``: the balancer's own.
    """

    settings: Settings
    model: str = "echo"
    groups: int = 1
    tp: int = 1
    worker_args: list[str] = field(default_factory=list)
    models: list[str] | None = None
    balancer_args: list[str] = field(default_factory=list)
    quiet: bool = False
    redis: EmbeddedRedis | None = None
    children: list[Child] = field(default_factory=list)
    url: str = ""

    def start(self) -> Stack:
        if self.settings.redis_url:
            self.url = self.settings.redis_url
        else:
            self.redis = EmbeddedRedis().start()
            self.url = self.redis.url
            announce(self.url, prefix=self.settings.prefix)
        # The URL (with its password, if any) goes to the children in their environment: their
        # command lines are world-readable (ps, /proc/<pid>/cmdline).
        self.child_env = {**os.environ, "RYZ_REDIS_URL": self.url}
        common = ["--prefix", self.settings.prefix,
                  "--log-format", self.settings.log_format, *(["--log-prompts"] if self.settings.log_prompts else [])]
        py = [sys.executable, "-m"]
        self.children.append(Child("balancer", [*py, "balancer", *common, *self._metrics_args(0),
                                                 *self.balancer_args]))
        base = f"{socket.gethostname()}-{os.getpid()}"
        specs = [spec for spec in (self.models or [self.model]) for _ in range(self.groups)]
        for i, spec in enumerate(specs):
            self.children.append(Child(
                f"worker{i}",
                [*py, "gpu_workers", *common, "--model", spec, "--tp", str(self.tp),
                 "--group", f"{base}-g{i}", *self._metrics_args(1 + i), *self.worker_args],
            ))
        for child in self.children:
            self._spawn(child)
        return self

    def wait_until_serving(self, *, timeout_s: float, poll_s: float = 0.5) -> float | None:
        """Seconds until some worker group was ready (its model loaded), or None after ``timeout_s``.

        The balancer fails a request that finds no live group for ``no_group_wait_s`` (30 s), which a
        model's load on a busy machine can exceed: callers that send right after start wait here first."""
        began = time.monotonic()
        r = connect(self.url, self.settings)
        try:
            while time.monotonic() - began < timeout_s:
                groups = read_groups(r, Keys(self.settings.prefix), dead_after_s=self.settings.dead_after_s)
                if any(g.routable for g in groups):
                    return time.monotonic() - began
                time.sleep(poll_s)
        finally:
            r.close()
        return None

    def _metrics_args(self, offset: int) -> list[str]:
        """The balancer serves metrics on the base port, group i on base + 1 + i (0: each a free port)."""
        base = self.settings.metrics_port
        if base is None:
            return []
        return ["--metrics-port", str(base + offset if base else 0), "--metrics-host", self.settings.metrics_host]

    def _spawn(self, child: Child) -> None:
        out = subprocess.DEVNULL if self.quiet else None
        # Own session: a terminal's Ctrl-C reaches only `up`, which stops children in order. If `up`
        # itself is killed, the kernel kills them (nothing is lost: their work stays in Redis).
        child.proc = subprocess.Popen(child.argv, stdout=out, stderr=out, start_new_session=True, env=self.child_env,
                                      preexec_fn=lambda: die_with_parent(signal.SIGKILL))  # noqa: PLW1509 - prctl only

    def supervise(self) -> None:
        """Restart children that exited (call now and then); raises ConfigError when one exited
        for a reason restarting cannot cure (exit code 2: bad configuration, credentials, TLS)."""
        now = time.monotonic()
        for child in self.children:
            if child.proc is not None and child.proc.poll() is not None and now >= child.next_start:
                if child.proc.returncode == EXIT_FATAL:
                    # bad configuration (its one line is above): restarting cannot cure it
                    raise ConfigError(f"{child.name} exited with code {EXIT_FATAL} (configuration); stopping")
                child.restarts += 1
                delay = min(30.0, 0.5 * 2 ** min(child.restarts, 6))
                log.warning("%s exited with %s; restarting (restart %d)", child.name, child.proc.returncode,
                            child.restarts)
                child.next_start = now + delay
                self._spawn(child)

    def stop(self, *, timeout_s: float = 30.0) -> None:
        """Workers drain first (they finish or hand back work), then the balancer, then Redis."""
        workers = [c for c in self.children if c.name.startswith("worker")]
        others = [c for c in self.children if not c.name.startswith("worker")]
        for group in (workers, others):
            for child in group:
                if child.proc is not None and child.proc.poll() is None:
                    child.proc.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + timeout_s
            for child in group:
                if child.proc is None:
                    continue
                try:
                    child.proc.wait(max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    child.proc.kill()
                    child.proc.wait()
        if self.redis is not None:
            withdraw(prefix=self.settings.prefix)
            self.redis.stop()

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", action="append", default=None, metavar="SPEC",
                        help="model SPEC: a Hugging Face directory, a .gguf file, random:<preset>, or echo "
                             "(default); repeat it to serve several models, each by its default served name "
                             "(requests pick one with their 'model' field)")
    parser.add_argument("--groups", type=int, default=1, help="worker groups of each model (default 1)")
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel ranks per group (default 1)")
    parser.add_argument("--default-model", default=None, metavar="NAME",
                        help="served model name for requests without 'model' when several are served")
    add_engine_args(parser)
    add_metrics(parser, what="the balancer serves metrics on PORT, group i on PORT+1+i; ")


def submit_hint(url: str, *, prefix: str, models: list[str], default_model: str | None) -> str:
    """The `ryzanstein submit` line that reaches a stack: with its prefix when not the default, a
    model when several are served and none is the default; a URL with a password stays out of it."""
    extra = "" if prefix == "ryz" else f" --prefix {prefix}"
    if len(models) > 1 and not default_model:
        extra += f" --model {default_served_name(models[0])}"
    if mask_url(url) == url:
        return f"try: ryzanstein submit --redis-url {url}{extra} \"hello\""
    return f"try: ryzanstein submit{extra} \"hello\"   (with RYZ_REDIS_URL set to the URL)"


def run(args: argparse.Namespace) -> int:
    setup_logging(args)
    settings = settings_from_args(args)
    stop = threading.Event()

    def on_signal(_signum: int, _frame: FrameType | None) -> None:
        stop.set()

    models = args.model or ["echo"]
    if args.served_model_name and len(models) > 1:
        raise ConfigError("--served-model-name names one model: with several --model, each is served "
                          "under its default name (or start `ryzanstein worker` groups for other names)")
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    stack = Stack(settings, models=models, groups=args.groups, tp=args.tp, worker_args=engine_argv(args),
                  balancer_args=["--default-model", args.default_model] if args.default_model else []).start()
    shown = mask_url(stack.url)
    print(f"ryzanstein up: Redis at {shown} (prefix {settings.prefix!r}); "
          f"{args.groups} group(s) of {', '.join(models)}. Ctrl-C stops.", flush=True)
    print(f"  {submit_hint(stack.url, prefix=settings.prefix, models=models, default_model=args.default_model)}",
          flush=True)
    if settings.metrics_port:
        print(f"  metrics: balancer on port {settings.metrics_port}, groups on "
              f"{settings.metrics_port + 1}..{settings.metrics_port + args.groups * len(models)} "
              "(/metrics, /livez, /readyz)",
              flush=True)
    try:
        while not stop.wait(0.5):
            stack.supervise()
            if stack.redis is not None and stack.redis.proc is not None and stack.redis.proc.poll() is not None:
                print("embedded redis-server exited; stopping", file=sys.stderr, flush=True)
                break
    finally:
        print("stopping: draining worker groups...", flush=True)
        stack.stop()
        print("stopped", flush=True)
    return 0
