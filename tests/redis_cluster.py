"""Real local Redis Clusters and Sentinels for the tests: system ``redis-server`` (7.x) child processes.

``LocalCluster``: 3 masters + 3 replicas (``redis-server --cluster-enabled yes`` and
``redis-cli --cluster create ... --cluster-replicas 1``; the same steps by hand for fewer than 3
masters) on free loopback ports, a small ``cluster-node-timeout`` so that a killed master's replica
is promoted within about a second.
``LocalSentinel``: one master, one replica and one sentinel watching them.
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

import redis

from broker.embedded import die_with_parent

if TYPE_CHECKING:
    from typing_extensions import Self

NODE_TIMEOUT_MS = 500  # cluster-node-timeout: a dead master is failed over ~2x this after its death


def _binary(name: str) -> str:
    found = shutil.which(name)
    if found is None:
        raise FileNotFoundError(f"{name} is not on PATH")
    return found


def cluster_ports(count: int) -> list[int]:
    """``count`` ports free right now whose cluster bus ports (port + 10000) are free too."""
    ports: list[int] = []
    while len(ports) < count:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = int(sock.getsockname()[1])
        if port + 10000 > 65535 or port in ports:
            continue
        with socket.socket() as bus:
            try:
                bus.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        ports.append(port)
    return ports


class _Servers:
    """redis-server children, each in a directory of its own under one temp dir."""

    def __init__(self, prefix: str) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix=prefix))
        self.procs: dict[int, subprocess.Popen[bytes]] = {}

    def spawn(self, port: int, *extra: str, sentinel_conf: str | None = None) -> None:
        node_dir = self.dir / str(port)
        node_dir.mkdir()
        argv = [_binary("redis-server")]
        if sentinel_conf is not None:
            conf = node_dir / "sentinel.conf"
            conf.write_text(sentinel_conf)
            argv += [str(conf), "--sentinel"]
        argv += ["--port", str(port), "--bind", "127.0.0.1", "--dir", str(node_dir), "--save", "",
                 "--appendonly", "no", "--daemonize", "no", "--loglevel", "warning",
                 "--logfile", str(node_dir / "redis.log"), *extra]
        self.procs[port] = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                            preexec_fn=die_with_parent, start_new_session=True)  # noqa: PLW1509

    def wait_ready(self, ports: list[int], *, timeout_s: float = 10.0) -> None:
        deadline = time.monotonic() + timeout_s
        for port in ports:
            while True:
                try:
                    with redis.Redis(port=port, socket_timeout=1.0) as conn:
                        conn.ping()
                    break
                except redis.ConnectionError:
                    if time.monotonic() > deadline or self.procs[port].poll() is not None:
                        raise RuntimeError(f"redis-server on {port} did not start: {self.log(port)}") from None
                    time.sleep(0.02)

    def log(self, port: int) -> str:
        path = self.dir / str(port) / "redis.log"
        return path.read_text(errors="replace")[-2000:] if path.exists() else ""

    def kill(self, port: int) -> None:
        proc = self.procs[port]
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait(5)

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs.values():
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        shutil.rmtree(self.dir, ignore_errors=True)


class LocalCluster:
    """A Redis Cluster of ``masters`` masters (1 or more) with one replica each, on loopback.

    ``url``: its ``redis+cluster://`` URL naming every master as a startup node.
    """

    def __init__(self, *, masters: int = 3) -> None:
        self.masters = masters
        self.ports = cluster_ports(masters * 2)
        self._servers = _Servers("ryz-cluster-")

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"127.0.0.1:{p}" for p in self.ports[: self.masters])

    def start(self) -> Self:
        try:
            for port in self.ports:
                self._servers.spawn(port, "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                                    "--cluster-node-timeout", str(NODE_TIMEOUT_MS),
                                    # The cluster answers for the slots it still covers while one is down.
                                    "--cluster-require-full-coverage", "no")
            self._servers.wait_ready(self.ports)
            if self.masters >= 3:
                subprocess.run([_binary("redis-cli"), "--cluster", "create", *(f"127.0.0.1:{p}" for p in self.ports),
                                "--cluster-replicas", "1", "--cluster-yes"], check=True, capture_output=True, timeout=30)
            else:  # redis-cli --cluster create wants 3 masters at least: the same steps by hand
                self._create_by_hand()
            self.wait_healthy()
        except BaseException:
            self.stop()
            raise
        return self

    def _create_by_hand(self, *, timeout_s: float = 20.0) -> None:
        """Slots split evenly over the masters (CLUSTER ADDSLOTSRANGE), every node met, then each
        replica told whose it is (CLUSTER REPLICATE) once it knows every node."""
        masters, replicas = self.ports[: self.masters], self.ports[self.masters:]
        bounds = [16384 * i // self.masters for i in range(self.masters + 1)]
        for port, start, end in zip(masters, bounds, bounds[1:]):
            with self.node(port) as conn:
                conn.execute_command("CLUSTER", "ADDSLOTSRANGE", start, end - 1)
        for port in self.ports[1:]:
            with self.node(port) as conn:
                conn.execute_command("CLUSTER", "MEET", "127.0.0.1", self.ports[0])
        deadline = time.monotonic() + timeout_s
        for port in self.ports:
            with self.node(port) as conn:
                while int(conn.cluster("info")["cluster_known_nodes"]) < len(self.ports):
                    if time.monotonic() > deadline:
                        raise TimeoutError("the cluster's nodes did not meet")
                    time.sleep(0.05)
        for port, master in zip(replicas, masters):
            with self.node(master) as conn:
                master_id = conn.execute_command("CLUSTER", "MYID").decode()
            with self.node(port) as conn:
                conn.execute_command("CLUSTER", "REPLICATE", master_id)

    def node(self, port: int) -> redis.Redis:
        return redis.Redis(port=port, socket_timeout=2.0, socket_connect_timeout=1.0)

    def live_ports(self) -> list[int]:
        return [p for p, proc in self._servers.procs.items() if proc.poll() is None]

    def primaries(self) -> dict[int, list[tuple[int, int]]]:
        """Port of each live master -> the slot ranges it serves (as a live node sees it)."""
        with self.node(self.live_ports()[0]) as conn:
            slots = conn.execute_command("CLUSTER", "SLOTS")
        out: dict[int, list[tuple[int, int]]] = {}
        for start, end, master, *_replicas in slots:
            out.setdefault(int(master[1]), []).append((int(start), int(end)))
        return out

    def wait_healthy(self, *, timeout_s: float = 20.0) -> None:
        """Until every live node reports ``cluster_state:ok`` with all 16384 slots served by live masters,
        and every live replica is in sync with its master."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                live = self.live_ports()
                states = []
                for port in live:
                    with self.node(port) as conn:
                        states.append(conn.cluster("info"))
                masters = self.primaries()
                if (all(s["cluster_state"] == "ok" and int(s["cluster_slots_ok"]) == 16384 for s in states)
                        and set(masters) <= set(live) and self._replicas_in_sync(set(live) - set(masters))):
                    return
            except (redis.ConnectionError, redis.ResponseError, redis.TimeoutError):
                pass
            if time.monotonic() > deadline:
                raise TimeoutError("the cluster did not become healthy")
            time.sleep(0.05)

    def _replicas_in_sync(self, replicas: set[int]) -> bool:
        """Every live replica has finished its sync with its master (else it could not be promoted)."""
        for port in replicas:
            with self.node(port) as conn:
                info = conn.info("replication")
            if info.get("role") == "slave" and info.get("master_link_status") != "up":
                return False
        return True

    def flush(self) -> None:
        for port in self.primaries():
            with self.node(port) as conn:
                conn.flushall()
                conn.script_flush()

    def master_of(self, key: str) -> int:
        """Port of the master serving ``key``'s slot."""
        with self.node(self.live_ports()[0]) as conn:
            slot = int(conn.cluster("keyslot", key))
        for port, ranges in self.primaries().items():
            if any(start <= slot <= end for start, end in ranges):
                return port
        raise LookupError(f"no master serves slot {slot}")

    def kill(self, port: int) -> None:
        """SIGKILL the node on ``port`` (its replica takes over after ``NODE_TIMEOUT_MS`` or so)."""
        self._servers.kill(port)

    def stop(self) -> None:
        self._servers.stop()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class LocalSentinel:
    """A master, a replica of it and one sentinel monitoring them as ``service``.

    ``url``: the ``redis+sentinel://`` URL of the service.
    """

    def __init__(self, *, service: str = "ryzmaster") -> None:
        self.service = service
        self.master_port, self.replica_port, self.sentinel_port = cluster_ports(3)
        self._servers = _Servers("ryz-sentinel-")

    @property
    def url(self) -> str:
        return f"redis+sentinel://127.0.0.1:{self.sentinel_port}/{self.service}"

    def start(self) -> Self:
        try:
            self._servers.spawn(self.master_port)
            self._servers.spawn(self.replica_port, "--replicaof", "127.0.0.1", str(self.master_port))
            self._servers.wait_ready([self.master_port, self.replica_port])
            conf = (f"sentinel monitor {self.service} 127.0.0.1 {self.master_port} 1\n"
                    f"sentinel down-after-milliseconds {self.service} 500\n"
                    f"sentinel failover-timeout {self.service} 2000\n")
            self._servers.spawn(self.sentinel_port, sentinel_conf=conf)
            self._servers.wait_ready([self.sentinel_port])
            self._wait_replicated()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_replicated(self, *, timeout_s: float = 20.0) -> None:
        """Until the replica is in sync and the Sentinel knows it (else it would have no one to promote)."""
        deadline = time.monotonic() + timeout_s
        with redis.Redis(port=self.replica_port) as replica, redis.Redis(port=self.sentinel_port) as watcher:
            while (replica.info("replication").get("master_link_status") != "up"
                   or not watcher.sentinel_slaves(self.service)):
                if time.monotonic() > deadline:
                    raise TimeoutError("the replica did not sync, or the Sentinel did not find it")
                time.sleep(0.05)

    def kill_master(self) -> None:
        self._servers.kill(self.master_port)

    def stop(self) -> None:
        self._servers.stop()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
