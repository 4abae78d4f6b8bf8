"""Starting the ranks of a tensor-parallel group and joining them into process groups.

Two ways to start a group of K ranks, one code path after that:

- ``ryzanstein worker --tp K``: this process is rank 0. It opens the rendezvous store on a loopback
  port the kernel picks (so groups on one host never collide), then starts ranks 1..K-1 as child
  processes of the same worker module, with torchrun's variables set and ``RYZ_TP_LEADER_PID``
  marking them as its own: they connect to its store directly and die with it.
- ``torchrun --nproc-per-node K [--nnodes N ...] -m gpu_workers --tp K ...``: torchrun starts every
  rank, on any number of hosts, and sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT; the
  ranks meet through ``env://``, and gloo binds to the interface each host reaches MASTER_ADDR
  through (gpu_workers.parallel.network).

Process groups: the default group (gloo) serves startup, where ranks wait for each other's weight
loading, and waits up to ``startup_timeout_s``. Serving uses groups with the short ``timeout_s``:
``compute`` for the layers' collectives (gloo on CPU, NCCL on CUDA, one device per rank by
LOCAL_RANK) and ``control`` for the leader's step messages (always gloo: they are CPU tensors; the
same group as ``compute`` on CPU).
"""

from __future__ import annotations

import ctypes
import logging
import os
import resource
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from broker.errors import ConfigError, EngineFailed
from gpu_workers.cpu_threads import torch_threads
from gpu_workers.engine import EXIT_ENGINE_FAILED
from gpu_workers.model.layers import TPContext
from gpu_workers.parallel.network import choose_gloo_interface

log = logging.getLogger(__name__)

LEADER_PID_ENV = "RYZ_TP_LEADER_PID"
_PR_SET_PDEATHSIG = 1


@dataclass(frozen=True, slots=True)
class RankEnv:
    """Where this process sits in its group, from torchrun's variables."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int  # ranks on this host
    master_addr: str
    master_port: int
    spawned: bool  # started by a leader's --tp (not by torchrun): its store is a plain TCPStore


def rank_env(environ: Mapping[str, str] = os.environ) -> RankEnv | None:
    """This process's rank from RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT; None when RANK is unset."""
    if "RANK" not in environ:
        return None
    try:
        world = int(environ["WORLD_SIZE"])
        rank = int(environ["RANK"])
        local_rank = int(environ.get("LOCAL_RANK", rank))
        return RankEnv(
            rank=rank,
            world_size=world,
            local_rank=local_rank,
            local_world_size=int(environ.get("LOCAL_WORLD_SIZE", world)),
            master_addr=environ["MASTER_ADDR"],
            master_port=int(environ["MASTER_PORT"]),
            spawned=LEADER_PID_ENV in environ,
        )
    except KeyError as e:
        raise ConfigError(f"RANK is set but {e.args[0]} is not: start ranks with torchrun, or use --tp K alone") from None
    except ValueError as e:
        raise ConfigError(f"bad torchrun variable: {e}") from None


def group_size(tp: int | None, environ: Mapping[str, str] = os.environ) -> int:
    """The group's size: ``--tp``, else torchrun's WORLD_SIZE, else 1; ConfigError if they disagree."""
    world = environ.get("WORLD_SIZE")
    if tp is None:
        return int(world) if world else 1
    if tp < 1:
        raise ConfigError(f"--tp {tp}: must be at least 1")
    if world is not None and "RANK" in environ and int(world) != tp:
        raise ConfigError(f"--tp {tp} but WORLD_SIZE is {world}: a group's ranks are all the processes torchrun starts")
    return tp


@dataclass(frozen=True, slots=True)
class RankReport:
    """What one rank holds after startup (logged, and in the leader's heartbeat)."""

    rank: int
    host: str
    pid: int
    weight_bytes: int  # this rank's parameters
    kv_bytes: int  # this rank's KV cache (its heads only)
    load_s: float  # building the model and reading its shards
    peak_rss_bytes: int  # the process's peak resident memory so far


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


@dataclass(slots=True)
class TensorParallelGroup:
    """This rank's view of its group: its place, device and process groups."""

    rank: int
    size: int
    local_rank: int
    local_size: int  # ranks on this host
    device: str  # "cpu" or "cuda:<local rank>"
    compute: Any  # ProcessGroup of the layers' collectives
    control: Any  # ProcessGroup (gloo) of step messages
    timeout_s: float
    followers: list[subprocess.Popen[bytes]] = field(default_factory=list)  # ranks this leader started
    store: Any = None  # the rendezvous store, kept alive while the group lives
    _started: threading.Event = field(default_factory=threading.Event)

    @property
    def is_leader(self) -> bool:
        return self.rank == 0

    @property
    def context(self) -> TPContext:
        """What the parallel layers need: rank, size and the compute group."""
        return TPContext(rank=self.rank, size=self.size, group=self.compute)

    def agree_min(self, value: int) -> int:
        """The smallest ``value`` over all ranks (the KV blocks every rank can hold)."""
        t = torch.tensor([value], dtype=torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return int(t.item())

    def gather_reports(self, report: RankReport) -> list[RankReport]:
        """Every rank's report on the leader (in rank order); [] on the other ranks. Ends startup."""
        out: list[Any] | None = [None] * self.size if self.is_leader else None
        dist.gather_object(report, out, dst=0)
        self._started.set()
        return list(out) if out is not None else []

    def close(self, *, grace_s: float = 5.0) -> None:
        """Leave the process groups; a leader waits ``grace_s`` for the ranks it started, then kills them."""
        self._started.set()
        deadline = time.monotonic() + grace_s
        for proc in self.followers:
            try:
                proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("rank process %d did not exit; killing it", proc.pid)
                proc.kill()
                proc.wait()
        try:
            dist.destroy_process_group()
        except (RuntimeError, ValueError, AssertionError):  # already gone, or a peer died mid-way
            pass


def start_group(
    size: int, *, device: str, follower_argv: list[str], timeout_s: float, startup_timeout_s: float,
    environ: Mapping[str, str] = os.environ, threads: int | None = None,
) -> TensorParallelGroup:
    """Join (under torchrun) or start (``--tp``) a group of ``size`` ranks and set up its process groups.

    ``follower_argv``: arguments of ``python -m gpu_workers`` for the ranks this process starts.
    ``threads``: torch CPU threads of this rank (``--threads``; default: the host's usable CPUs shared
    by its ranks, see gpu_workers.cpu_threads).
    """
    env = rank_env(environ)
    startup = timedelta(seconds=startup_timeout_s)
    followers: list[subprocess.Popen[bytes]] = []
    store = None
    try:
        if env is None:
            _gloo_on_loopback()
            store = dist.TCPStore("127.0.0.1", 0, size, is_master=True, wait_for_workers=False, timeout=startup)
            env = RankEnv(0, size, 0, size, "127.0.0.1", store.port, spawned=True)
            followers = [_spawn(env, rank, follower_argv) for rank in range(1, size)]
            log.info("tensor-parallel group of %d: started ranks %s (rendezvous 127.0.0.1:%d)",
                     size, ", ".join(str(p.pid) for p in followers), store.port)
        elif env.world_size != size:
            raise ConfigError(f"--tp {size} but WORLD_SIZE is {env.world_size}")
        elif env.spawned:
            store = dist.TCPStore(env.master_addr, env.master_port, size, is_master=False, timeout=startup)
        else:  # torchrun's ranks, maybe on several hosts: gloo over the network the rendezvous is on
            choose_gloo_interface(env.master_addr, env.master_port, os.environ)
        cuda = device.startswith("cuda")
        if cuda:
            torch.cuda.set_device(env.local_rank)
        else:  # the host's usable CPUs, shared by its ranks
            count = torch_threads(threads, ranks_on_host=env.local_world_size, environ=environ)
            if count is not None:
                torch.set_num_threads(count)
        group = TensorParallelGroup(
            rank=env.rank, size=size, local_rank=env.local_rank, local_size=env.local_world_size,
            device=f"cuda:{env.local_rank}" if cuda else "cpu",
            compute=None, control=None, timeout_s=timeout_s, followers=followers, store=store,
        )
        if followers:
            threading.Thread(target=_watch_startup, args=(group,), name="tp-startup-watch", daemon=True).start()
        _form(group, env, store=store, startup=startup, cuda=cuda)
    except BaseException:
        for proc in followers:
            proc.kill()
        raise
    log.info("rank %d of %d joined (%s, %s, %d torch threads)", env.rank, size, socket.gethostname(),
             group.device, torch.get_num_threads())
    return group


def _form(group: TensorParallelGroup, env: RankEnv, *, store: Any, startup: timedelta, cuda: bool) -> None:
    """The group's process groups, once every rank has joined. EngineFailed if they cannot all
    connect within ``startup``: a rank that failed before joining (on another host, say, one
    without the model files) or that no other can reach."""
    init: dict[str, Any] = {"store": store} if store is not None else {"init_method": "env://"}
    try:
        dist.init_process_group("gloo", rank=env.rank, world_size=group.size, timeout=startup, **init)
        short = timedelta(seconds=group.timeout_s)
        group.compute = dist.new_group(backend="nccl" if cuda else "gloo", timeout=short)
        group.control = dist.new_group(backend="gloo", timeout=short) if cuda else group.compute
    except RuntimeError as exc:  # torch's DistError (a store timeout) and gloo's connection errors
        what = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise EngineFailed(f"the {group.size} ranks did not all join the group within {startup.total_seconds():.0f}s "
                           f"(tp_startup_timeout_s; rendezvous {env.master_addr}:{env.master_port}): {what}") from exc


def _spawn(env: RankEnv, rank: int, argv: list[str]) -> subprocess.Popen[bytes]:
    child_env = {
        **os.environ,
        "RANK": str(rank), "WORLD_SIZE": str(env.world_size),
        "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": str(env.local_world_size),
        "MASTER_ADDR": env.master_addr, "MASTER_PORT": str(env.master_port),
        LEADER_PID_ENV: str(os.getpid()),
    }
    return subprocess.Popen(
        [sys.executable, "-m", "gpu_workers", *argv], env=child_env, stdin=subprocess.DEVNULL,
        # no other thread runs yet (ranks start before the engine, the metrics server and the pinger)
        preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,  # noqa: PLW1509
    )


def _die_with_parent() -> None:
    """In a spawned rank, before exec: the kernel kills it when the leader dies, however it dies."""
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def _gloo_on_loopback() -> None:
    """Spawned ranks share this host: gloo connects them over loopback, not whatever the host name
    resolves to (set for this process, inherited by the ranks it starts)."""
    if "GLOO_SOCKET_IFNAME" not in os.environ and Path("/sys/class/net/lo").exists():
        os.environ["GLOO_SOCKET_IFNAME"] = "lo"


def _watch_startup(group: TensorParallelGroup) -> None:
    """Until startup ends: a rank that exits means the group can never form, so the leader (blocked
    in a rendezvous that would wait for the startup timeout) exits now, taking the others along."""
    while not group._started.wait(0.2):
        dead = [p for p in group.followers if p.poll() is not None]
        if dead:
            log.error("rank process %d exited with code %s while the group started; giving up",
                      dead[0].pid, dead[0].returncode)
            for proc in group.followers:
                proc.kill()
            logging.shutdown()
            os._exit(EXIT_ENGINE_FAILED)
