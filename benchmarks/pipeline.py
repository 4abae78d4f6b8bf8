"""Pipeline benchmark: the echo engine end to end, next to RQ and a raw Redis round trip.

    python benchmarks/pipeline.py            (or: make bench-pipeline)
    python benchmarks/pipeline.py --cluster  (on Redis Clusters of 1 and 3 masters: pipeline_cluster.py)

Starts a fresh embedded Redis and the whole stack (one balancer, 2 echo worker groups, each its own
process) and measures, in one run on one machine:

- unloaded latency: one 1-token request at a time, submit to done, through the sync client;
- sustained throughput: many 1-token requests kept in flight by the async client;
- latency at fixed offered loads (open loop: requests sent on a schedule, whatever comes back);
- the same echo function through RQ's SimpleWorker (jobs/s), and a raw round trip (XADD + blocking
  XREAD through one echo process that answers with XADD) as the floor for latency. Raw round trips
  and unloaded requests are taken in alternating blocks while the stack is up and idle, so that both
  meet the same machine state (on a VM one alone swings by 2x from run to run).

Prints a table and writes JSON to benchmarks/results/pipeline-<timestamp>.json.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import redis

from benchmarks.common import log, pct, print_targets, write_results
from broker.embedded import EmbeddedRedis
from broker.settings import Settings
from producer.async_client import AsyncClient
from producer.client import Client
from ryzanstein.stack import Stack

PROMPT = "x"  # one byte: the echo engine answers with exactly one token


def ms(seconds: list[float]) -> dict[str, float]:
    return {"p50_ms": round(pct(seconds, 50) * 1000, 3), "p99_ms": round(pct(seconds, 99) * 1000, 3),
            "mean_ms": round(statistics.fmean(seconds) * 1000, 3), "n": len(seconds)}


# --- ryzanstein ---------------------------------------------------------------------------------


async def sustained(url: str, prefix: str, n: int, window: int) -> tuple[float, list[float]]:
    """Keep ``window`` requests in flight until ``n`` are done; (req/s, latencies)."""
    latencies: list[float] = []
    async with AsyncClient(url, prefix=prefix) as client:
        await asyncio.gather(*(client.generate(PROMPT, max_tokens=1, timeout=60) for _ in range(200)))
        sem = asyncio.Semaphore(window)

        async def one() -> None:
            async with sem:
                t0 = time.perf_counter()
                await client.generate(PROMPT, max_tokens=1, timeout=120)
                latencies.append(time.perf_counter() - t0)

        start = time.perf_counter()
        await asyncio.gather(*(one() for _ in range(n)))
        elapsed = time.perf_counter() - start
    return n / elapsed, latencies


async def offered(url: str, prefix: str, rate: float, duration_s: float) -> tuple[list[float], float]:
    """Open loop: send at ``rate`` req/s for ``duration_s``; (latencies, achieved send rate)."""
    latencies: list[float] = []
    async with AsyncClient(url, prefix=prefix) as client:
        await asyncio.gather(*(client.generate(PROMPT, max_tokens=1, timeout=60) for _ in range(100)))

        async def one(t_sched: float) -> None:
            await client.generate(PROMPT, max_tokens=1, timeout=120)
            latencies.append(time.perf_counter() - t_sched)

        loop = asyncio.get_running_loop()
        tasks = []
        total = int(rate * duration_s)
        start = time.perf_counter()
        for i in range(total):
            t_sched = start + i / rate
            delay = t_sched - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(loop.create_task(one(t_sched)))
        sent_rate = total / (time.perf_counter() - start)
        await asyncio.gather(*tasks)
    return latencies, sent_rate


# --- baselines ----------------------------------------------------------------------------------

RAW_ECHO = r"""
import sys, redis
r = getattr(redis, sys.argv[2]).from_url(sys.argv[1])  # redis.Redis or redis.RedisCluster
last = "$"
while True:
    got = r.xread({"raw:in": last}, block=0, count=100)
    for _s, entries in got:
        pipe = r.pipeline(transaction=False)
        for entry_id, f in entries:
            last = entry_id
            pipe.xadd(b"raw:out:" + f[b"id"], {"text": f[b"prompt"]})
        pipe.execute()
"""


class RawEcho:
    """The floor for latency: XADD + blocking XREAD through one echo process that answers with XADD.
    ``client_class``: ``redis.Redis``, or ``redis.RedisCluster`` for the raw cluster round trip."""

    def __init__(self, url: str, *, client_class: type[redis.Redis | redis.RedisCluster] = redis.Redis) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", RAW_ECHO, url, client_class.__name__])
        self.redis = client_class.from_url(url)
        self.sent = 0
        time.sleep(0.5)  # let the echo process block on its read (it reads from "$")
        self.round_trips(20)  # warm up

    def round_trips(self, n: int) -> list[float]:
        out = []
        for _ in range(n):
            key = f"raw:out:{self.sent}"
            t0 = time.perf_counter()
            self.redis.xadd("raw:in", {"id": str(self.sent), "prompt": PROMPT})
            got = self.redis.xread({key: "0-0"}, block=10_000)
            out.append(time.perf_counter() - t0)
            assert got, "raw echo did not answer"
            self.sent += 1
        return out

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()
        self.redis.close()


def interleaved(url: str, prefix: str, n: int, rounds: int = 10) -> tuple[list[float], list[float]]:
    """(raw round trips, unloaded latencies): ``n`` of each, taken in alternating blocks so that the
    machine's state (CPU idle states, caches, other load) weighs on both alike."""
    raw: list[float] = []
    idle: list[float] = []
    echo = RawEcho(url)
    try:
        with Client(url, prefix=prefix) as client:
            for _ in range(20):  # warm up connections and scripts
                client.generate(PROMPT, max_tokens=1, timeout=30)
            for i in range(rounds):
                block = n // rounds + (i < n % rounds)
                raw += echo.round_trips(block)
                for _ in range(block):
                    t0 = time.perf_counter()
                    client.generate(PROMPT, max_tokens=1, timeout=30)
                    idle.append(time.perf_counter() - t0)
    finally:
        echo.close()
    return raw, idle


def rq_simpleworker(url: str, n: int) -> float:
    """Jobs/s of the echo function through RQ (enqueue all, then one SimpleWorker in burst mode)."""
    from rq import Queue

    r = redis.Redis.from_url(url)
    queue = Queue("ryz-bench", connection=r)
    for _ in range(n):
        queue.enqueue("benchmarks.rq_echo.echo", PROMPT)
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "rq.cli", "worker", "--burst", "--worker-class", "rq.SimpleWorker",
                    "--url", url, "--quiet", "ryz-bench"], env=env, check=True, cwd=ROOT)
    elapsed = time.perf_counter() - t0
    finished = queue.finished_job_registry.count
    assert finished == n, f"RQ finished {finished} of {n} jobs"
    return n / elapsed


# --- main ---------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--groups", type=int, default=2)
    parser.add_argument("--requests", type=int, default=20_000, help="requests in the sustained run")
    parser.add_argument("--window", type=int, default=2_000, help="requests in flight in the sustained run")
    parser.add_argument("--latency-samples", type=int, default=500)
    parser.add_argument("--offered", type=float, nargs="*", default=[100.0, 1000.0], help="offered loads, req/s")
    parser.add_argument("--offered-seconds", type=float, default=8.0)
    parser.add_argument("--rq-jobs", type=int, default=500)
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default: benchmarks/results/...)")
    cluster = parser.add_argument_group("Redis Cluster (benchmarks/pipeline_cluster.py)")
    cluster.add_argument("--cluster", action="store_true",
                         help="run on local Redis Clusters instead: sustained req/s for each of --masters and "
                              "--shards, next to the raw cluster round trip (needs redis-server 7 and redis-cli)")
    cluster.add_argument("--masters", type=int, nargs="+", default=[1, 3], help="cluster sizes (masters, each with a replica)")
    cluster.add_argument("--shards", type=int, nargs="+", default=[1, 4], help="ingress streams (RYZ_INGRESS_SHARDS)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.cluster:
        from benchmarks.pipeline_cluster import print_cluster, run_cluster

        cluster_results = {**run_cluster(args, ms), "load": [round(x, 2) for x in os.getloadavg()],
                           "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
                           "started": time.strftime("%Y-%m-%dT%H:%M:%S")}
        print_cluster(cluster_results)
        write_results(cluster_results, "pipeline-cluster", args.out)
        return 0

    results: dict[str, object] = {
        "benchmark": "pipeline", "engine": "echo", "groups": args.groups,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
        "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    with EmbeddedRedis() as server:
        url = server.url
        results["redis_version"] = redis.Redis.from_url(url).info("server")["redis_version"]
        log(f"redis-server {results['redis_version']} at {url}")

        log(f"RQ SimpleWorker, {args.rq_jobs} jobs ...")
        rq_rate = rq_simpleworker(url, args.rq_jobs)

        settings = Settings(redis_url=url, prefix="bench")
        with Stack(settings, groups=args.groups, quiet=True):
            Client(url, prefix="bench").generate(PROMPT, max_tokens=1, timeout=60)  # stack is up
            log(f"raw round trip and unloaded latency, x{args.latency_samples} each, interleaved ...")
            raw, idle = interleaved(url, "bench", args.latency_samples)
            log(f"sustained: {args.requests} requests, {args.window} in flight ...")
            rate, sustained_lat = asyncio.run(sustained(url, "bench", args.requests, args.window))
            loads = {}
            for load in args.offered:
                log(f"offered load {load:.0f} req/s for {args.offered_seconds}s ...")
                lat, sent = asyncio.run(offered(url, "bench", load, args.offered_seconds))
                loads[f"{load:.0f}"] = {**ms(lat), "sent_per_s": round(sent, 1)}

    results.update({
        "raw_round_trip": ms(raw),
        "rq_simpleworker_jobs_per_s": round(rq_rate, 1),
        "unloaded": ms(idle),
        "sustained_req_per_s": round(rate, 1),
        "sustained_latency": ms(sustained_lat),
        "offered": loads,
    })
    targets = {
        "sustained >= 2500 req/s": rate >= 2500,
        "p99 <= 20 ms at 1000 req/s offered": "1000" in loads and loads["1000"]["p99_ms"] <= 20,
        "unloaded p50 <= 3x raw round trip": results["unloaded"]["p50_ms"] <= 3 * results["raw_round_trip"]["p50_ms"],
    }
    results["targets"] = targets

    rows = [
        ("raw XADD+XREAD round trip", "-", ms(raw)["p50_ms"], ms(raw)["p99_ms"]),
        ("RQ SimpleWorker (jobs/s)", f"{rq_rate:.0f}", "-", "-"),
        ("ryzanstein unloaded", "-", results["unloaded"]["p50_ms"], results["unloaded"]["p99_ms"]),
        (f"ryzanstein sustained ({args.window} in flight)", f"{rate:.0f}",
         results["sustained_latency"]["p50_ms"], results["sustained_latency"]["p99_ms"]),
    ]
    for load, row in loads.items():
        rows.append((f"ryzanstein at {load} req/s offered", f"{row['sent_per_s']:.0f} sent", row["p50_ms"], row["p99_ms"]))
    print(f"\nPipeline benchmark: echo engine, 1-token requests, {args.groups} groups, "
          f"{os.cpu_count()} CPUs, redis {results['redis_version']}")
    print(f"{'path':<44} {'req/s':>10} {'p50 ms':>9} {'p99 ms':>9}")
    for name, rps, p50, p99 in rows:
        print(f"{name:<44} {rps:>10} {p50!s:>9} {p99!s:>9}")
    print_targets(targets)

    write_results(results, "pipeline", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
