"""The pipeline benchmark on Redis Cluster (``benchmarks/pipeline.py --cluster``).

For each cluster size (``--masters``, default 1 and 3; each master with one replica) it starts a local
cluster of its own (tests/redis_cluster.py's ``LocalCluster``: system ``redis-server`` 7 and
``redis-cli``) and measures, in one run:

- the floor: raw cluster round trips (XADD to one stream, an echo process's blocking XREAD and XADD
  to a reply stream, the client's blocking XREAD of it; the keys on different slots, as the pipeline's
  are), through redis-py's ``RedisCluster``;
- for each count of ingress streams (``--shards``, default 1 and 4: ``RYZ_INGRESS_SHARDS``), the whole
  stack (one balancer, ``--groups`` echo groups) kept busy with ``--requests`` 1-token requests,
  ``--window`` in flight, through the async client: req/s and latency.
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

import redis

from benchmarks.common import log
from benchmarks.pipeline import PROMPT, RawEcho
from broker.settings import Settings
from producer.async_client import AsyncClient
from ryzanstein.stack import Stack
from tests.redis_cluster import LocalCluster


def raw_round_trips(plain_url: str, n: int) -> list[float]:
    """``n`` raw cluster round trips (seconds) through one echo process, after 20 to warm up."""
    echo = RawEcho(plain_url, client_class=redis.RedisCluster)
    try:
        return echo.round_trips(n)
    finally:
        echo.close()


async def sustained(settings: Settings, n: int, window: int) -> tuple[float, list[float]]:
    """Keep ``window`` requests in flight until ``n`` are done (after a warm-up); (req/s, latencies)."""
    latencies: list[float] = []
    async with AsyncClient(settings=settings) as client:
        await asyncio.gather(*(client.generate(PROMPT, max_tokens=1, timeout=60) for _ in range(min(200, n))))
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


def run_cluster(args: Any, ms: Any) -> dict[str, Any]:
    """Every cluster size and shard count of ``args``; ``ms`` summarises latencies. The results' dict."""
    out: dict[str, Any] = {"benchmark": "pipeline-cluster", "engine": "echo", "groups": args.groups,
                           "requests": args.requests, "window": args.window, "runs": []}
    for masters in args.masters:
        log(f"starting a local cluster of {masters} master(s) + {masters} replica(s) ...")
        with LocalCluster(masters=masters) as cluster:
            plain = "redis://" + cluster.url.removeprefix("redis+cluster://").split(",")[0]
            log(f"raw cluster round trip x{args.latency_samples} ...")
            floor = ms(raw_round_trips(plain, args.latency_samples))
            out["runs"].append({"masters": masters, "path": "raw cluster round trip", **floor})
            for shards in args.shards:
                settings = Settings(redis_url=cluster.url, prefix=f"bench{shards}", ingress_shards=shards)
                os.environ["RYZ_INGRESS_SHARDS"] = str(shards)  # the balancer's (Stack's children inherit it)
                try:
                    with Stack(settings, groups=args.groups, quiet=True) as stack:
                        if stack.wait_until_serving(timeout_s=180) is None:
                            raise RuntimeError("no worker group came up in 180 s")
                        log(f"{masters} master(s), {shards} ingress stream(s): {args.requests} requests, "
                            f"{args.window} in flight ...")
                        rate, lat = asyncio.run(sustained(settings, args.requests, args.window))
                finally:
                    os.environ.pop("RYZ_INGRESS_SHARDS", None)
                out["runs"].append({"masters": masters, "ingress_streams": shards, "req_per_s": round(rate, 1),
                                    **ms(lat)})
    return out


def print_cluster(results: dict[str, Any]) -> None:
    print(f"\nPipeline benchmark on Redis Cluster: echo engine, 1-token requests, {results['groups']} groups, "
          f"{os.cpu_count()} CPUs, {results['window']} in flight, load {results['load']}")
    print(f"{'masters':>7} {'path':<36} {'req/s':>10} {'p50 ms':>9} {'p99 ms':>9}")
    for run in results["runs"]:
        path = run.get("path") or f"ryzanstein, {run['ingress_streams']} ingress stream(s)"
        print(f"{run['masters']:>7} {path:<36} {run.get('req_per_s', '-')!s:>10} {run['p50_ms']!s:>9} "
              f"{run['p99_ms']!s:>9}")
