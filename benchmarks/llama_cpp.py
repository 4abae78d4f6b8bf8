"""ryzanstein next to llama.cpp's ``llama-server`` on the same GGUF weights, in one run, interleaved.

    python benchmarks/serving.py --model FILE.gguf --llama-cpp DIR \\
        --concurrency 1,8,64 --prompt-tokens 128 --max-tokens 128

``DIR`` holds llama.cpp's binaries (``llama-server``; ``llama-quantize`` when no ``--llama-f32``
file is given), built from llama.cpp's sources with cmake (CPU, Release). Three pairs, each on the
same weight values:

- fp32: ryzanstein serves ``FILE.gguf`` dequantized to fp32 (its default) against llama-server on an
  F32 GGUF of the same values (``llama-quantize --allow-requantize FILE.gguf OUT F32``, made once and
  kept in ``~/.cache/ryzanstein/``, or ``--llama-f32``);
- fp8-kv: the fp32 pair's weights with 8-bit KV caches: ours ``--kv-dtype fp8_e4m3`` (the default),
  llama-server's ``q8_0`` K and V (``-ctk q8_0 -ctv q8_0``, which needs its flash attention: ``-fa on``);
  the table also gives ours fp8 / ours fp32 KV per level (the issue's >= 0.9x target);
- 4-bit: ryzanstein with ``--quantization gguf`` against llama-server on ``FILE.gguf`` itself.

Both sides are reached the same way: OpenAI ``POST /v1/completions`` over HTTP with streaming,
prompts as token ids (random ids of exactly ``--prompt-tokens`` tokens, one seeded set per
concurrency level), temperature 0, ``ignore_eos`` so that every request makes ``--max-tokens``
tokens. Ours goes through the gateway (``python -m producer gateway``) over the whole stack
(embedded Redis, a balancer, one worker group). At each concurrency level the two systems of a pair
run one after another, so both meet the same machine state, ``--rounds`` times, the order alternating
(ours first, then llama.cpp first, ...): this VM's memory bandwidth, which a decode step at one
sequence is bound by, moved between 20 and 32 GB/s within minutes on 2026-12-02; ``C`` client tasks
keep ``C`` requests in flight (closed loop) until ``max(C, --min-requests)`` are done. Each engine
waits for work as it does by default: our workers' OpenMP threads sleep at once
(``OMP_WAIT_POLICY=PASSIVE``, gpu_workers/cpu_threads.py), llama-server's spin a while first (its
OpenMP default; the PASSIVE our process set is kept out of its environment); set
``GOMP_SPINCOUNT`` to give both the same bounded spin.

Per system and level: output tok/s (all tokens over the wall time), TTFT p50/p99 (from each
request's send to its first text); per level the ratio ours / llama.cpp; the greedy texts of the
fp32 pair compared request by request; the load average before each run (a shared host's other
work slows both sides); with several rounds (each on its own prompts, out of both prefix caches),
the figures pool them and each round's ratio is printed and kept (``round_ratios``). Results JSON:
benchmarks/results/serving-llama-cpp-<timestamp>.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.common import log, pct, write_results

CACHE = Path.home() / ".cache" / "ryzanstein"
FIRST_ID = 100  # random prompt ids start here: past SmolLM2's and Gemma's special tokens
PAIRS = ("fp32", "fp8-kv", "4-bit")
LABELS = {"fp32": ("ryz fp32", "llama F32"), "fp8-kv": ("ryz fp8 KV", "llama q8_0 KV"),
          "4-bit": ("ryz 4-bit", "llama GGUF")}  # column heads (4-bit: the source file itself, Q4_1 for SmolLM2)
LLAMA_KV = {"fp32": "f32", "fp8-kv": "q8_0", "4-bit": "f32"}  # llama-server's -ctk/-ctv per pair


def parse_concurrency(text: str) -> list[int]:
    """``"1,8,64"`` -> ``[1, 8, 64]``: distinct positive integers in the order given.

    Raises ``argparse.ArgumentTypeError`` for anything else (argparse prints it as a usage error)."""
    try:
        levels = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"comma-separated integers expected, got {text!r}") from None
    if any(n < 1 for n in levels) or len(set(levels)) != len(levels):
        raise argparse.ArgumentTypeError(f"distinct positive integers expected, got {text!r}")
    return levels


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The comparison's flags on serving.py's parser."""
    group = parser.add_argument_group("llama.cpp comparison (benchmarks/llama_cpp.py)")
    group.add_argument("--llama-cpp", type=Path, default=None, metavar="DIR",
                       help="directory of llama.cpp's binaries (llama-server, llama-quantize): run the "
                            "side-by-side comparison on --model (a GGUF file) instead of the default benchmark")
    group.add_argument("--llama-f32", type=Path, default=None, metavar="GGUF",
                       help="F32 GGUF of --model's values for llama-server (default: made with llama-quantize)")
    group.add_argument("--concurrency", type=parse_concurrency, default=[1, 8, 64], metavar="N,N,...",
                       help="requests in flight, one level after another (default 1,8,64)")
    group.add_argument("--prompt-tokens", type=int, default=128, help="tokens per prompt (default 128)")
    group.add_argument("--max-tokens", type=int, default=128, help="new tokens per request (default 128)")
    group.add_argument("--min-requests", type=int, default=4,
                       help="requests per level at least (default 4; a level runs max(N, this))")
    group.add_argument("--pairs", default=",".join(PAIRS), metavar="P,P",
                       help=f"which pairs run: {', '.join(PAIRS)} (default all)")
    group.add_argument("--threads", type=int, default=None,
                       help="threads of both engines (default: the machine's CPUs)")
    group.add_argument("--rounds", type=int, default=1,
                       help="runs of each level per system, the systems' order alternating from round to round "
                            "(default 1); the figures pool every round's requests, the table gives each round's "
                            "ratio too (a shared host's memory bandwidth moves by tens of percent in minutes)")


# --- the table (pure) -----------------------------------------------------------------------------


def ratio(ours: float, theirs: float) -> float | None:
    """ours / theirs rounded to 2 places; None when llama.cpp measured nothing."""
    return round(ours / theirs, 2) if theirs > 0 else None


def ratio_rows(runs: dict[str, dict[str, dict[int, dict[str, float]]]], levels: list[int]) -> list[dict[str, Any]]:
    """One row per concurrency level: each pair's output tok/s on both sides and their ratio.

    ``runs[pair][side][level]`` is a run summary (``output_tok_per_s``, ``ttft_p50_ms``, ...), pair in
    ``PAIRS``, side ``"ryzanstein"`` or ``"llama.cpp"``; a pair that did not run is left out. Where
    both KV pairs ran, ``fp8_over_fp32_kv`` is ours with the fp8 KV cache over ours with fp32's."""
    rows = []
    for level in levels:
        row: dict[str, Any] = {"concurrency": level}
        for pair, sides in runs.items():
            if level in sides.get("ryzanstein", {}) and level in sides.get("llama.cpp", {}):
                ours = sides["ryzanstein"][level]["output_tok_per_s"]
                theirs = sides["llama.cpp"][level]["output_tok_per_s"]
                row[pair] = {"ryzanstein": ours, "llama.cpp": theirs, "ratio": ratio(ours, theirs)}
        fp32, fp8 = (runs.get(pair, {}).get("ryzanstein", {}).get(level) for pair in ("fp32", "fp8-kv"))
        if fp32 and fp8:  # ours with the fp8 KV cache over ours with the fp32 one
            row["fp8_over_fp32_kv"] = ratio(fp8["output_tok_per_s"], fp32["output_tok_per_s"])
        rows.append(row)
    return rows


def format_table(rows: list[dict[str, Any]], runs: dict[str, dict[str, dict[int, dict[str, float]]]]) -> str:
    """The rows as printed: output tok/s and ratio per pair, then TTFT p50/p99 of every system."""
    pairs = [p for p in PAIRS if p in runs]
    head = "".join(f" | {LABELS[p][0]:>11} {LABELS[p][1]:>12} {'ratio':>6}" for p in pairs)
    kv = any("fp8_over_fp32_kv" in row for row in rows)
    head += " | fp8/fp32 KV" if kv else ""
    lines = ["output tok/s", f"{'concurrency':>11}{head}"]
    for row in rows:
        cells = "".join(f" | {row[p]['ryzanstein']:>11} {row[p]['llama.cpp']:>12} "
                        f"{_fmt_ratio(row[p]['ratio']):>6}" if p in row else f" | {'-':>31}" for p in pairs)
        cells += f" | {_fmt_ratio(row.get('fp8_over_fp32_kv')):>11}" if kv else ""
        lines.append(f"{row['concurrency']:>11}{cells}")
    lines += ["", "TTFT p50 / p99 ms", f"{'concurrency':>11}" + "".join(
        f" | {label:>19}" for p in pairs for label in LABELS[p])]
    for row in rows:
        level = row["concurrency"]
        cells = ""
        for p in pairs:
            for side in ("ryzanstein", "llama.cpp"):
                s = runs[p].get(side, {}).get(level)
                ttft = f"{s['ttft_p50_ms']:.0f} / {s['ttft_p99_ms']:.0f}" if s else "-"
                cells += f" | {ttft:>19}"
        lines.append(f"{level:>11}{cells}")
    return "\n".join(lines)


def _fmt_ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def text_equality(ours: list[str], theirs: list[str]) -> dict[str, Any]:
    """How many greedy texts are byte-identical, request by request, and where the first unequal
    pair parts (a character index), for the report."""
    same = [a == b for a, b in zip(ours, theirs, strict=True)]
    first = next((i for i, s in enumerate(same) if not s), None)
    out: dict[str, Any] = {"identical": sum(same), "requests": len(same)}
    if first is not None:
        a, b = ours[first], theirs[first]
        out["first_unequal"] = {"request": first, "at_char": next(
            (i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))}
    return out


def llama_server_argv(binary: Path, gguf: Path, *, port: int, threads: int, parallel: int, ctx_per_slot: int,
                      kv_type: str) -> list[str]:
    """llama-server's command line: loopback only, ``parallel`` slots of ``ctx_per_slot`` tokens each
    (continuous batching is its default), the KV cache in ``kv_type``, no web UI. A quantized V cache
    needs llama.cpp's flash attention, which is then switched on (``-fa on``)."""
    flash = [] if kv_type in ("f32", "f16", "bf16") else ["-fa", "on"]
    return [str(binary), "-m", str(gguf), "--host", "127.0.0.1", "--port", str(port), "-t", str(threads),
            "-tb", str(threads), "-np", str(parallel), "-c", str(parallel * ctx_per_slot),
            "-ctk", kv_type, "-ctv", kv_type, *flash, "--no-webui"]


def llama_server_env(environ: Mapping[str, str]) -> dict[str, str]:
    """llama-server's environment: ours without the ``OMP_WAIT_POLICY=PASSIVE`` that importing
    gpu_workers set (llama.cpp's CPU build threads with OpenMP too, and its default, spinning, is what
    its users run); a policy the operator set is passed on."""
    import gpu_workers

    env = dict(environ)
    if gpu_workers.WAIT_POLICY_SET_HERE:
        env.pop("OMP_WAIT_POLICY", None)
    return env


# --- HTTP ------------------------------------------------------------------------------------------


@dataclass
class Run:
    """One system's requests at one concurrency level."""

    wall_s: float = 0.0
    ttft_s: list[float] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)
    tokens: int = 0
    load: float = 0.0  # 1-minute load average just before the run

    def summary(self) -> dict[str, float]:
        return {"requests": len(self.texts), "output_tokens": self.tokens, "wall_s": round(self.wall_s, 2),
                "output_tok_per_s": round(self.tokens / self.wall_s, 1),
                "ttft_p50_ms": round(pct(self.ttft_s, 50) * 1000, 1),
                "ttft_p99_ms": round(pct(self.ttft_s, 99) * 1000, 1), "load_1m": self.load}


def pooled(runs: list[Run]) -> Run:
    """Several rounds of one system at one level as one run: their tokens over their summed wall time,
    every request's TTFT, the first round's texts, the highest load average seen before a round."""
    return Run(wall_s=sum(r.wall_s for r in runs), ttft_s=[t for r in runs for t in r.ttft_s], texts=runs[0].texts,
               tokens=sum(r.tokens for r in runs), load=max(r.load for r in runs))


async def _complete(client: Any, base: str, model: str, prompt: list[int], max_tokens: int) -> tuple[float, str]:
    """(seconds to the first text, the whole text) of one streamed greedy completion that must run to
    ``max_tokens`` (finish_reason "length")."""
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "ignore_eos": True}
    sent = time.perf_counter()
    first: float | None = None
    text, finish = [], None
    async with client.stream("POST", f"{base}/v1/completions", json=body) as resp:
        if resp.status_code != 200:
            raise RuntimeError(f"{base}: HTTP {resp.status_code}: {(await resp.aread())[:300]!r}")
        async for line in resp.aiter_lines():
            data = line.removeprefix("data:").strip() if line.startswith("data:") else ""
            if not data or data == "[DONE]":
                continue
            chunk = json.loads(data)
            if "error" in chunk:
                raise RuntimeError(f"{base}: {chunk['error']}")
            for choice in chunk.get("choices") or []:
                if choice.get("text"):
                    first = time.perf_counter() - sent if first is None else first
                    text.append(choice["text"])
                finish = choice.get("finish_reason") or finish
    if finish != "length" or first is None:
        raise RuntimeError(f"{base}: finish_reason {finish!r} (expected 'length', ignore_eos), text {first is not None}")
    return first, "".join(text)


async def _run_level(base: str, model: str, prompts: list[list[int]], *, concurrency: int, max_tokens: int) -> Run:
    import httpx

    run = Run(load=round(os.getloadavg()[0], 2), texts=[""] * len(prompts), ttft_s=[0.0] * len(prompts))
    todo = list(range(len(prompts)))
    # A new connection per request: llama-server closed a kept-alive connection between two streamed
    # requests ("Server disconnected without sending a response"); on loopback a connect costs ~0.1 ms.
    limits = httpx.Limits(max_connections=concurrency + 2, max_keepalive_connections=0)
    async with httpx.AsyncClient(timeout=httpx.Timeout(3600.0), limits=limits) as client:
        async def one_by_one() -> None:
            while todo:
                i = todo.pop(0)
                run.ttft_s[i], run.texts[i] = await _complete(client, base, model, prompts[i], max_tokens)

        start = time.perf_counter()
        await asyncio.gather(*(one_by_one() for _ in range(concurrency)))
        run.wall_s = time.perf_counter() - start
    run.tokens = len(prompts) * max_tokens
    return run


def _served_model(base: str) -> str:
    import httpx

    return str(httpx.get(f"{base}/v1/models", timeout=30).json()["data"][0]["id"])


def _wait_http(url: str, proc: subprocess.Popen[bytes], *, timeout_s: float, what: str) -> None:
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}")
        try:
            if httpx.get(url, timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{what} not ready after {timeout_s:.0f}s")


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# --- the two servers -------------------------------------------------------------------------------


@contextmanager
def llama_server(bin_dir: Path, gguf: Path, args: argparse.Namespace, threads: int, kv_type: str) -> Iterator[str]:
    """llama-server on ``gguf`` (a free loopback port), its KV cache in ``kv_type``; yields its base URL."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    argv = llama_server_argv(bin_dir / "llama-server", gguf, port=port, threads=threads,
                             parallel=max(args.concurrency), ctx_per_slot=args.prompt_tokens + args.max_tokens + 16,
                             kv_type=kv_type)
    with tempfile.TemporaryFile() as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=llama_server_env(os.environ))
        try:
            _wait_http(f"http://127.0.0.1:{port}/health", proc, timeout_s=300, what="llama-server")
            yield f"http://127.0.0.1:{port}"
        except BaseException:
            out.seek(0)
            log(out.read()[-3000:].decode(errors="replace"))
            raise
        finally:
            _stop(proc)


@contextmanager
def ryzanstein_gateway(model: str, worker_args: list[str]) -> Iterator[str]:
    """The whole stack on ``model`` and a gateway process in front of it; yields the gateway's base URL."""
    from broker.settings import Settings
    from ryzanstein.stack import Stack

    settings = Settings(prefix="bench-llama-cpp")
    with Stack(settings, model=model, groups=1, quiet=True, worker_args=worker_args) as stack:
        if stack.wait_until_serving(timeout_s=600) is None:
            raise RuntimeError("no worker group became ready within 600 s")
        with tempfile.NamedTemporaryFile(suffix=".log") as out:
            env = {**os.environ, "RYZ_REDIS_URL": stack.url}
            proc = subprocess.Popen([sys.executable, "-m", "producer", "gateway", "--port", "0",
                                     "--prefix", settings.prefix], env=env, stdout=out, stderr=subprocess.STDOUT)
            try:
                deadline = time.monotonic() + 60
                while not (found := re.search(rb"serving (http://\S+)/v1", Path(out.name).read_bytes())):
                    if proc.poll() is not None or time.monotonic() > deadline:
                        raise RuntimeError(f"the gateway did not start: {Path(out.name).read_text()[-2000:]}")
                    time.sleep(0.2)
                yield found.group(1).decode()
            finally:
                _stop(proc)


def f32_gguf(bin_dir: Path, source: Path) -> Path:
    """An F32 GGUF of ``source``'s values (every tensor dequantized), made once with llama-quantize."""
    out = CACHE / f"{source.stem}.F32.gguf"
    if not out.exists():
        CACHE.mkdir(parents=True, exist_ok=True)
        partial = out.with_suffix(".partial")
        subprocess.run([str(bin_dir / "llama-quantize"), "--allow-requantize", str(source), str(partial), "F32"],
                       check=True, stdout=subprocess.DEVNULL)
        partial.rename(out)
    return out


# --- the run ---------------------------------------------------------------------------------------


def compare(args: argparse.Namespace) -> int:
    """Run both pairs over every level, print the tables, write the JSON; 0."""
    source = Path(args.model)
    if source.suffix != ".gguf" or not source.is_file():
        raise SystemExit("--llama-cpp needs --model FILE.gguf (the weights both engines serve)")
    threads = args.threads or os.cpu_count() or 1
    if args.rounds < 1:
        raise SystemExit("--rounds: at least 1")
    if not set(args.pairs.split(",")) <= set(PAIRS):
        raise SystemExit(f"--pairs: {args.pairs!r} is not a subset of {','.join(PAIRS)}")
    if args.llama_f32 is not None and not args.llama_f32.is_file():
        raise SystemExit(f"--llama-f32: no file {args.llama_f32}")
    f32 = args.llama_f32 or f32_gguf(args.llama_cpp, source)
    version = subprocess.run([str(args.llama_cpp / "llama-server"), "--version"], check=False,
                             capture_output=True, text=True)
    from gguf import GGUFReader

    vocab = len(GGUFReader(source).fields["tokenizer.ggml.tokens"].data)
    # One seeded prompt set per level and round (round 0's seed as before rounds existed): a round that
    # repeated the last one's prompts would meet both engines' prefix caches.
    prompts = {(level, r): [[rng.randrange(FIRST_ID, vocab) for _ in range(args.prompt_tokens)]
                            for _ in range(max(level, args.min_requests))]
               for level in args.concurrency for r in range(args.rounds)
               for rng in [random.Random(args.seed * 1000 + level + 100_000 * r)]}
    def ours(kv_dtype: str, *more: str) -> list[str]:  # our worker's flags
        return ["--kv-dtype", kv_dtype, "--threads", str(threads), *more]

    setups = {"fp32": (ours("fp32"), f32), "fp8-kv": (ours("fp8_e4m3"), f32),
              "4-bit": (ours("fp32", "--quantization", "gguf"), source)}
    setups = {pair: setups[pair] for pair in args.pairs.split(",")}
    runs: dict[str, dict[str, dict[int, dict[str, float]]]] = {}
    texts: dict[str, dict[int, list[str]]] = {"ryzanstein": {}, "llama.cpp": {}}
    round_ratios: dict[str, dict[int, list[float | None]]] = {}  # pair -> level -> ours / llama.cpp per round
    loads = [round(os.getloadavg()[0], 2)]
    for pair, (worker_args, llama_gguf) in setups.items():
        log(f"{pair}: starting ryzanstein ({' '.join(worker_args)}) and llama-server ({llama_gguf.name}) ...")
        runs[pair] = {"ryzanstein": {}, "llama.cpp": {}}
        with ryzanstein_gateway(str(source), worker_args) as ours, llama_server(args.llama_cpp, llama_gguf, args,
                                                                               threads, LLAMA_KV[pair]) as theirs:
            bases = {"ryzanstein": (ours, _served_model(ours)), "llama.cpp": (theirs, "llama")}
            for base, model in bases.values():  # warm: a short request each
                asyncio.run(_run_level(base, model, [[FIRST_ID + 1] * 8], concurrency=1, max_tokens=4))
            for level in args.concurrency:
                rounds: dict[str, list[Run]] = {side: [] for side in bases}
                for r in range(args.rounds):
                    for side in list(bases)[:: 1 if r % 2 == 0 else -1]:  # ours first, then llama.cpp first, ...
                        base, model = bases[side]
                        run = asyncio.run(_run_level(base, model, prompts[level, r], concurrency=level,
                                                     max_tokens=args.max_tokens))
                        rounds[side].append(run)
                        loads.append(run.load)
                        log(f"  {pair} {side} at {level}, round {r + 1}: {run.summary()}")
                for side, done in rounds.items():
                    runs[pair][side][level] = pooled(done).summary()
                    if pair == "fp32":
                        texts[side][level] = done[0].texts
                if args.rounds > 1:
                    round_ratios.setdefault(pair, {})[level] = [
                        ratio(a.tokens / a.wall_s, b.tokens / b.wall_s)
                        for a, b in zip(rounds["ryzanstein"], rounds["llama.cpp"], strict=True)]
    rows = ratio_rows(runs, args.concurrency)
    equality = {level: text_equality(texts["ryzanstein"][level], texts["llama.cpp"][level])
                for level in args.concurrency if level in texts["ryzanstein"]}
    results = {
        "benchmark": "serving-llama-cpp", "model": str(source), "llama_f32": str(f32),
        "llama_cpp_version": (version.stdout + version.stderr).strip().splitlines()[-2:],
        "workload": {"concurrency": args.concurrency, "prompt_tokens": args.prompt_tokens,
                     "max_tokens": args.max_tokens, "min_requests": args.min_requests, "seed": args.seed,
                     "temperature": 0, "ignore_eos": True, "api": "OpenAI /v1/completions, streamed, token-id prompts"},
        "ryzanstein": {"path": "gateway (HTTP) -> Redis -> balancer -> one worker group",
                       "worker_args": {p: s[0] for p, s in setups.items()}},
        "llama_server_argv": {pair: llama_server_argv(Path("llama-server"), Path("MODEL.gguf"), port=0,
                                                      threads=threads, parallel=max(args.concurrency),
                                                      ctx_per_slot=args.prompt_tokens + args.max_tokens + 16,
                                                      kv_type=LLAMA_KV[pair]) for pair in setups},
        "openmp": {side: {k: env.get(k) for k in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
                   for side, env in (("ryzanstein", dict(os.environ)), ("llama.cpp", llama_server_env(os.environ)))},
        "machine": {"cpus": os.cpu_count(), "threads": threads, "load_1m_before_runs": loads,
                    "load_1m_max": max(loads)},
        "started": args.started, "runs": {p: {s: {str(k): v for k, v in lv.items()} for s, lv in sides.items()}
                                          for p, sides in runs.items()},
        "ratios": rows, "fp32_greedy_text_equality": {str(k): v for k, v in equality.items()},
        "rounds": args.rounds,
        "round_ratios": {p: {str(k): v for k, v in lv.items()} for p, lv in round_ratios.items()},
    }
    print(f"\nryzanstein (gateway, HTTP) vs llama-server (HTTP), {source.name}, {args.prompt_tokens}-token prompts, "
          f"{args.max_tokens} new tokens, temperature 0, {threads} threads each, load average "
          f"{min(loads)}-{max(loads)}\n")
    print(format_table(rows, runs))
    for pair, levels in round_ratios.items():
        print(f"{pair}, ours / llama.cpp round by round: " + "; ".join(
            f"{level}: " + " ".join(_fmt_ratio(r) for r in ratios) for level, ratios in levels.items()))
    print("\nfp32 pair, greedy texts identical: " + ", ".join(
        f"{e['identical']}/{e['requests']} at {level}" for level, e in equality.items()))
    write_results(results, "serving-llama-cpp", args.out)
    return 0
