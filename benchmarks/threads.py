"""CPU threads under a shared host: decode step time by thread count and OpenMP wait policy, with
other processes competing for the cores.

    python benchmarks/threads.py                       (SmolLM2-135M when its wheel is installed)
    python benchmarks/threads.py --model random:small --busy 0,2,4 --batch 1,64

For each number of competing busy processes (``--busy``: pure-Python spinners, the stand-in for
other workers or tenants on the host) and each decode batch, every configuration runs in a fresh
process, because libgomp reads ``OMP_WAIT_POLICY`` once, when torch loads:

- ``threads=all, ACTIVE``: OpenMP's spin-then-sleep default with a thread per CPU (what a worker did
  before ``--threads``);
- ``threads=all, PASSIVE``: the worker's default now (threads sleep as soon as they wait);
- ``threads=1, PASSIVE``: one thread (``--threads 1``).

Each child builds the engine (fp32 KV), prefills ``--batch`` sequences of ``--context`` tokens and
times ``--steps`` decode steps; the median is reported, with the host's 1-minute load average.
Prints a table and writes JSON to benchmarks/results/threads-<timestamp>.json.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = (("all", "ACTIVE"), ("all", "PASSIVE"), ("1", "PASSIVE"))


def _spin(stop: multiprocessing.synchronize.Event) -> None:
    while not stop.is_set():
        sum(range(10_000))


def child(model: str, batch: int, context: int, steps: int) -> dict[str, float]:
    """Run in a fresh process: ms per decode step (median of ``steps``) of ``batch`` sequences."""
    import random

    from gpu_workers.engine import EngineRequest
    from gpu_workers.engine_spec import EngineOptions, build_engine
    from gpu_workers.sampling_params import SamplingParams

    engine = build_engine(model, EngineOptions(kv_dtype="fp32", kv_memory="2GiB"))
    rng = random.Random(1)
    greedy = SamplingParams(max_tokens=10_000, temperature=0.0)
    for i in range(batch):
        engine.add(EngineRequest(f"r{i}", [rng.randrange(3, engine.info.vocab_size) for _ in range(context)], greedy))
    while len(engine.step()) < batch:
        pass
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - t0)
    engine.close()
    import torch

    return {"ms_per_step": round(statistics.median(times) * 1000, 2), "torch_threads": torch.get_num_threads(),
            "load_1m": round(os.getloadavg()[0], 2)}


def run_config(model: str, threads: str, wait: str, *, batch: int, context: int, steps: int) -> dict[str, float]:
    env = {**os.environ, "OMP_WAIT_POLICY": wait, "PYTHONPATH": str(ROOT)}
    env.pop("OMP_NUM_THREADS", None)
    if threads != "all":
        env["OMP_NUM_THREADS"] = threads
    code = (f"import json, sys; sys.path.insert(0, {str(ROOT / 'benchmarks')!r}); import threads; "
            f"print(json.dumps(threads.child({model!r}, {batch}, {context}, {steps})))")
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def default_model() -> str:
    sys.path.insert(0, str(ROOT))
    from gpu_workers.model.packaged import smollm2_gguf

    path = smollm2_gguf()
    return str(path) if path is not None else "random:small"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model SPEC (default: SmolLM2 GGUF if installed, else random:small)")
    parser.add_argument("--busy", default="0,2,4", help="competing busy processes, comma-separated")
    parser.add_argument("--batch", default="1,64", help="decode batch sizes, comma-separated")
    parser.add_argument("--context", type=int, default=128)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    model = args.model or default_model()
    rows: list[dict[str, object]] = []
    out = args.out or ROOT / "benchmarks" / "results" / f"threads-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)

    def save() -> None:  # after every row: a run stopped early keeps what it measured
        out.write_text(json.dumps({"model": model, "cpus": os.cpu_count(), "machine": platform.machine(),
                                   "context": args.context, "steps": args.steps, "rows": rows}, indent=2) + "\n")

    print(f"model {model}, {os.cpu_count()} CPUs, context {args.context}, {args.steps} steps per point")
    print(f"| busy | batch | {' | '.join(f'threads={t} {w}' for t, w in CONFIGS)} | load |")
    print("|---|---|" + "---|" * len(CONFIGS) + "---|")
    for busy in (int(b) for b in args.busy.split(",")):
        stop = multiprocessing.Event()
        spinners = [multiprocessing.Process(target=_spin, args=(stop,), daemon=True) for _ in range(busy)]
        for p in spinners:
            p.start()
        try:
            for batch in (int(b) for b in args.batch.split(",")):
                results = [run_config(model, t, w, batch=batch, context=args.context, steps=args.steps)
                           for t, w in CONFIGS]
                rows.append({"busy": busy, "batch": batch,
                             "configs": [{"threads": t, "wait": w, **r} for (t, w), r in zip(CONFIGS, results)]})
                cells = " | ".join(f"{r['ms_per_step']:.1f} ms ({r['torch_threads']}t)" for r in results)
                print(f"| {busy} | {batch} | {cells} | {max(r['load_1m'] for r in results):.1f} |", flush=True)
                save()
        finally:
            stop.set()
            for p in spinners:
                p.join()
    save()
    print(f"wrote {out.relative_to(ROOT) if out.is_relative_to(ROOT) else out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
