"""Failover benchmark: how fast a dead worker group is noticed, how fast its streams go on elsewhere,
and how well adaptive routing places requests compared with round robin.

    python benchmarks/failover.py            (or: make bench-failover)

1. Kills. A fresh embedded Redis, one balancer and ``--groups`` echo worker groups (each its own
   process; the echo engine sleeps ``--token-delay-ms`` per step, so requests are really mid-stream).
   ``--kills`` times: a wave of streamed requests, SIGKILL one group while it streams, measure
   - detection: from the kill until a balancer has failed the group over (its accepting flag gone),
     and the age of its last heartbeat at that moment (the balancer's own record);
   - kill to next token: for every request that moved mid-stream, from the kill to its next token
     event (entry ids of the reply stream, Redis clock);
   - that every request still ends exactly once with the healthy group's completion.
   Then the group is started again and the next kill takes another one.
2. Routing quality, simulated: the balancer's Router, adaptive and round robin, places the same
   workload of prompts that share system prompts over simulated groups. The echo engine has no prefix
   cache, so a "hit" is counted when a request goes to a group that served its prefix recently (and
   still holds it in a small LRU of prefixes); a hit skips the prefill of the shared prefix, which
   shortens service. Reported: prefix hit rate, spread of work over the groups, latency.

Prints a table and writes JSON to benchmarks/results/failover-<timestamp>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import signal
import statistics
import subprocess
import sys
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import redis

from balancer.admission import request_cost
from balancer.routing import Router, prefix_key
from benchmarks.common import log, pct, write_results
from broker.embedded import EmbeddedRedis
from broker.keys import Keys
from broker.protocol import GenerationRequest, SamplingParams
from broker.registry import GroupStatus, QueueLoad, read_groups


def dist(values: list[float]) -> dict[str, float]:
    if not values:
        return {"n": 0}
    return {"n": len(values), "min": round(min(values), 1), "p50": round(pct(values, 50), 1),
            "p90": round(pct(values, 90), 1), "max": round(max(values), 1),
            "mean": round(statistics.fmean(values), 1)}


# --- 1. kills ---------------------------------------------------------------------------------------


@dataclass
class Stack:
    url: str
    keys: Keys
    env: dict[str, str]
    log_dir: Path
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def spawn(self, name: str, *argv: str) -> None:
        out = open(self.log_dir / f"{name}-{len(self.procs)}.log", "wb")  # noqa: SIM115
        self.procs[name] = subprocess.Popen([sys.executable, "-m", *argv], env=self.env, stdout=out,
                                            stderr=subprocess.STDOUT, cwd=ROOT)
        out.close()

    def group(self, name: str) -> None:
        self.spawn(name, "gpu_workers", "--model", "echo", "--group", name)

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs.values():
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()


def wait_until(condition, *, timeout: float, what: str, poll: float = 0.01):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(poll)
    return value


def healthy_text(prompt: str, max_tokens: int) -> str:
    return prompt.encode()[:max_tokens].decode("utf-8", "ignore")


def kills(args: argparse.Namespace, log_dir: Path) -> dict[str, object]:
    with EmbeddedRedis() as server:
        r = redis.Redis.from_url(server.url)
        keys = Keys(f"fo{uuid.uuid4().hex[:6]}")
        env = {**os.environ, "RYZ_REDIS_URL": server.url, "RYZ_PREFIX": keys.prefix, "PYTHONUNBUFFERED": "1",
               "RYZ_ECHO_TOKEN_DELAY_MS": str(args.token_delay_ms)}
        stack = Stack(server.url, keys, env, log_dir)
        names = [f"g{n + 1}" for n in range(args.groups)]
        try:
            stack.spawn("balancer", "balancer", "--name", "bench")
            for name in names:
                stack.group(name)

            def routable(want: set[str]) -> bool:
                if not want <= {g.name for g in read_groups(r, keys, dead_after_s=3.0) if g.routable}:
                    return False
                time.sleep(0.5)  # the balancer sees them at its next registry refresh (every 0.25 s)
                return True

            wait_until(lambda: routable(set(names)), timeout=60, what="groups")
            detections: list[float] = []
            gaps: list[float] = []
            wrong = moved_total = 0
            for k in range(args.kills):
                victim = names[k % len(names)]
                ids = [f"k{k}-{i}" for i in range(args.wave)]
                prompts = {rid: f"wave {k} request {i:04d}, streamed token by token " + "x" * (i % 20)
                           for i, rid in enumerate(ids)}
                pipe = r.pipeline(transaction=False)
                for rid in ids:
                    pipe.xadd(keys.requests, {"id": rid, "prompt": prompts[rid], "max_tokens": 500, "stream": 1})
                pipe.execute()

                def streaming(ids: list[str] = ids, victim: str = victim) -> bool:
                    pipe = r.pipeline(transaction=False)
                    for rid in ids:
                        pipe.hmget(keys.state(keys.result(rid), rid), "owner", "next")
                    return any(o == victim.encode() and int(n or 0) >= 5 for o, n in pipe.execute())

                def finished(ids: list[str] = ids) -> bool:
                    return all(r.hexists(keys.state(keys.result(x), x), "final") for x in ids)

                wait_until(streaming, timeout=30, what=f"{victim} to stream")
                time.sleep(random.uniform(0.0, 1.0))  # any phase of its heartbeat
                t_kill = time.monotonic()
                stack.procs[victim].kill()
                secs, micros = r.time()
                kill_ms = secs * 1000 + micros // 1000
                def failed_over(accepting: str = keys.group_accepting(victim)) -> bool:
                    return not r.exists(accepting)

                wait_until(failed_over, timeout=15, what="failover")
                detections.append((time.monotonic() - t_kill) * 1000)
                wait_until(finished, timeout=120, what="wave to finish")
                for rid in ids:
                    evs = [(int(e.split(b"-")[0]), f) for e, f in r.xrange(keys.result(rid))]
                    final = evs[-1][1]
                    if final.get(b"text", b"").decode() != healthy_text(prompts[rid], 500):
                        wrong += 1
                    epoch = int(r.hget(keys.state(keys.result(rid), rid), "epoch") or 1)
                    before = [ms for ms, f in evs if ms <= kill_ms and f[b"event"] == b"token"]
                    after = [ms for ms, f in evs if ms > kill_ms and f[b"event"] == b"token"]
                    if epoch >= 2 and before and after:
                        moved_total += 1
                        gaps.append(float(after[0] - kill_ms))
                stack.group(victim)  # started again: it registers afresh (its old queue was retired)
                wait_until(lambda: routable(set(names)), timeout=60, what=f"{victim} back")
                log(f"  kill {k + 1}/{args.kills}: {victim} detected after {detections[-1]:.0f} ms")
            time.sleep(args.stats_wait_s)
            recorded = json.loads(r.hget(keys.balancer_stats("bench"), "detections_ms") or "[]")
            heartbeat_ages = [float(x) for x in recorded]
        finally:
            stack.stop()
    return {"detection_from_kill_ms": dist(detections), "heartbeat_age_at_failover_ms": dist(heartbeat_ages),
            "kill_to_next_token_ms": dist(gaps), "moved_mid_stream": moved_total,
            "requests": args.kills * args.wave, "wrong_completions": wrong}


# --- 2. routing quality (simulated) ------------------------------------------------------------------


@dataclass
class SimGroup:
    """A simulated group: runs up to ``batch`` requests at once, each for its own service time, and
    keeps the last ``cache`` prefixes it served (its prefix cache)."""

    name: str
    batch: int
    cache: int
    slowdown: float = 1.0  # service time multiplier (a slower GPU, a noisy neighbour)
    running: list[tuple[float, str, float]] = field(default_factory=list)  # (done at, id, arrived)
    queue: list[tuple[str, float, float, int]] = field(default_factory=list)  # (id, service s, arrived, cost)
    prefixes: OrderedDict[str, None] = field(default_factory=OrderedDict)
    served: int = 0
    tokens: int = 0

    def status(self) -> GroupStatus:
        return GroupStatus(name=self.name, tp=1, model="sim", kv_dtype="none", kv_capacity_tokens=0,
                           kv_used_tokens=0, running=len(self.running), waiting=0, queue_depth=len(self.queue),
                           leader_pid=0, host="sim", max_context=4096, vocab_size=256, alive=True)


def simulate(*, adaptive: bool, args: argparse.Namespace, seed: int, slow: float = 1.0) -> dict[str, object]:
    """One run; ``slow``: how much slower the first group serves than the others."""
    rng = random.Random(seed)
    systems = [f"system prompt {p:02d}: " + rng.choice("abcdefgh") * 200 for p in range(args.prefixes)]
    weights = [1 / (p + 1) for p in range(args.prefixes)]  # a few popular system prompts, a long tail
    groups = [SimGroup(f"g{n + 1}", batch=args.sim_batch, cache=args.sim_cache, slowdown=slow if n == 0 else 1.0)
              for n in range(args.groups)]
    by_name = {g.name: g for g in groups}
    router = Router(adaptive=adaptive)
    now, next_refresh, hits, latencies, samples = 0.0, 0.0, 0, [], []
    per_token_s, prefill_per_token_s = 0.002, 0.0004
    costs: dict[str, int] = {}
    for i in range(args.sim_requests):
        now += rng.expovariate(args.sim_rate)
        for g in groups:  # finish what is done, start what fits
            for done_at, rid, arrived in [x for x in g.running if x[0] <= now]:
                g.running.remove((done_at, rid, arrived))
                latencies.append(done_at - arrived)
            while g.queue and len(g.running) < g.batch:
                rid, service, arrived, _cost = g.queue.pop(0)
                start = max(now, arrived)
                g.running.append((start + service, rid, arrived))
        if now >= next_refresh:  # what a balancer reads every groups_refresh_s
            next_refresh = now + 0.25
            router.update([g.status() for g in groups], {g.name: QueueLoad(len(g.queue) + len(g.running),
                          sum(c for *_x, c in g.queue) + sum(costs[rid] for _d, rid, _a in g.running))
                          for g in groups})
            samples.append([len(g.queue) + len(g.running) for g in groups])
        system = rng.choices(systems, weights=weights)[0]
        prompt = system + f" user question {i}: " + "q" * rng.randint(10, 200)
        max_tokens = rng.randint(16, 128)
        request = GenerationRequest(id=f"s{i}", prompt=prompt, reply_to="x",
                                    sampling=SamplingParams(max_tokens=max_tokens))
        key = prefix_key(request, chars=128, tokens=32)
        cost = request_cost(request, max_context=4096)
        chosen = router.pick(prefix=key, cost=cost, now=now)
        assert chosen is not None
        router.sent(chosen.name, cost)
        g = by_name[chosen.name]
        hit = system in g.prefixes
        hits += hit
        g.prefixes[system] = None
        g.prefixes.move_to_end(system)
        while len(g.prefixes) > g.cache:
            g.prefixes.popitem(last=False)
        prefill = len(prompt) - (len(system) if hit else 0)
        service = (prefill * prefill_per_token_s + max_tokens * per_token_s) * g.slowdown
        costs[request.id] = cost
        g.queue.append((request.id, service, now, cost))
        g.served += 1
        g.tokens += cost
    served = [g.served for g in groups]
    depth = [max(s) - min(s) for s in samples]
    return {
        "prefix_hit_rate": round(hits / args.sim_requests, 3),
        "requests_per_group": served,
        "requests_max_over_mean": round(max(served) / statistics.fmean(served), 3),
        # load spread: the most minus the least outstanding requests across groups, averaged over time
        "outstanding_spread_mean": round(statistics.fmean(depth), 2),
        "latency_ms": dist([x * 1000 for x in latencies]),
    }


# --- main -------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--groups", type=int, default=3, help="worker groups (killed in turn)")
    parser.add_argument("--kills", type=int, default=6, help="groups killed, one after another")
    parser.add_argument("--wave", type=int, default=150, help="streamed requests in flight at each kill")
    parser.add_argument("--token-delay-ms", type=float, default=20.0, help="echo engine time per step")
    parser.add_argument("--stats-wait-s", type=float, default=1.2, help="for the balancer's last stats write")
    parser.add_argument("--prefixes", type=int, default=24, help="distinct system prompts in the routing workload")
    parser.add_argument("--sim-requests", type=int, default=20_000)
    parser.add_argument("--sim-rate", type=float, default=150.0, help="simulated arrivals per second")
    parser.add_argument("--sim-batch", type=int, default=16, help="requests a simulated group runs at once")
    parser.add_argument("--sim-cache", type=int, default=8, help="prefixes a simulated group keeps cached")
    parser.add_argument("--skip-kills", action="store_true", help="only the routing simulation")
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default: benchmarks/results/...)")
    args = parser.parse_args(argv)

    results: dict[str, object] = {
        "benchmark": "failover", "engine": "echo", "groups": args.groups,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
        "started": time.strftime("%Y-%m-%dT%H:%M:%S"), "settings": {"dead_after_s": 3.0, "heartbeat_interval_s": 1.0,
                                                                    "groups_refresh_s": 0.25},
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
    }
    if not args.skip_kills:
        log_dir = Path(os.environ.get("TMPDIR", "/tmp")) / f"ryz-failover-{uuid.uuid4().hex[:6]}"
        log_dir.mkdir(parents=True)
        log(f"{args.kills} kills of {args.groups} echo groups, {args.wave} streamed requests each (logs: {log_dir})")
        results["kills"] = kills(args, log_dir)
    log(f"routing simulation: {args.sim_requests} requests, {args.prefixes} shared system prompts")
    results["routing"] = {
        "adaptive": simulate(adaptive=True, args=args, seed=7),
        "round_robin": simulate(adaptive=False, args=args, seed=7),
        "adaptive, g1 half speed": simulate(adaptive=True, args=args, seed=7, slow=2.0),
        "round_robin, g1 half speed": simulate(adaptive=False, args=args, seed=7, slow=2.0),
    }

    print(f"\nFailover benchmark: echo engine, {args.groups} groups, {os.cpu_count()} CPUs")
    if "kills" in results:
        k = results["kills"]
        assert isinstance(k, dict)
        print(f"{'measure (ms)':<44} {'n':>5} {'min':>8} {'p50':>8} {'p90':>8} {'max':>8}")
        for name, label in (("detection_from_kill_ms", "detection, from kill"),
                            ("heartbeat_age_at_failover_ms", "last heartbeat age at failover"),
                            ("kill_to_next_token_ms", "kill to next token of a moved request")):
            d = k[name]
            print(f"{label:<44} {d['n']:>5} {d.get('min', '-'):>8} {d.get('p50', '-'):>8} "
                  f"{d.get('p90', '-'):>8} {d.get('max', '-'):>8}")
        print(f"requests {k['requests']}, moved mid-stream {k['moved_mid_stream']}, "
              f"completions differing from a healthy run: {k['wrong_completions']}")
    routing = results["routing"]
    assert isinstance(routing, dict)
    print(f"\n{'routing (simulated)':<28} {'prefix hits':>12} {'requests max/mean':>18} {'load spread':>12} "
          f"{'p50 ms':>8} {'p90 ms':>9}")
    for name, row in routing.items():
        print(f"{name:<28} {row['prefix_hit_rate']:>12.1%} {row['requests_max_over_mean']:>18} "
              f"{row['outstanding_spread_mean']:>12} {row['latency_ms']['p50']:>8} {row['latency_ms']['p90']:>9}")
    print("(load spread: most minus least outstanding requests over the groups, time average. The echo engine "
          "has no prefix cache:\n a hit is a request placed on a group that holds its system prompt in a "
          "simulated LRU of prefixes.)")

    write_results(results, "failover", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
