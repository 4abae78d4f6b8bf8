"""Structured output and n=4 against plain requests, in one run on one stack.

    python benchmarks/structured.py                    (--requests 32; the real SmolLM2 if installed)
    python benchmarks/structured.py --model random:tiny --requests 16

One stack (embedded Redis, a balancer, one worker group of ``--model``) serves, all submitted at once
and streamed, with the same prompts:

- ``json_schema``: ``--requests`` requests, each with one of the seeded random JSON schemas of
  benchmarks/json_schemas.py (``guided_json``), sampled (temperature 1, a seed each);
- ``plain``: the same requests without a schema, each with ``ignore_eos`` and ``max_tokens`` set to
  the tokens its structured twin generated: the same work token for token, without masks. These
  two rows run twice, in the order json_schema, plain, plain, json_schema (the load of a shared
  machine drifts), and each row adds its two rounds up;
- ``n=4``: ``--requests`` / 4 requests with ``n`` 4 (four completions sharing a prompt), each
  completion as long as the plain rows' median. Where the server refuses ``n`` (not yet honoured),
  the row runs as 4 separate requests per prompt and says so;
- ``plain (n row's lengths)``: ``--requests`` plain requests of that same length, the n row's yardstick.

Per row: output tokens/s (all completions' tokens over the row's wall time), TPOT p50/p99 (ms per
token after the first, per completion) and TTFT p50. The structured row must keep at least half the
plain row's throughput (the target in issue 18), and every document it returns that ended by the
schema (``stop``, not cut at ``--max-tokens``) must validate.

Prints a table and writes benchmarks/results/structured-<timestamp>.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.common import log, pct, print_targets, write_results
from benchmarks.json_schemas import random_schemas
from broker.errors import RequestFailed
from broker.settings import Settings
from producer.async_client import AsyncClient
from ryzanstein.stack import Stack

PROMPT = "Write one JSON document about item {i}, nothing else:\n"


class Row:
    """One row's per-completion token arrival times (seconds after the row started)."""

    def __init__(self, name: str, note: str = "") -> None:
        self.name, self.note = name, note
        self.times: dict[tuple[int, int], list[float]] = {}  # (request, completion index) -> times
        self.texts: dict[int, str] = {}
        self.finish: dict[int, str] = {}
        self.wall_s = 0.0

    def summary(self) -> dict[str, Any]:
        runs = [t for t in self.times.values() if t]
        tokens = sum(len(t) for t in runs)
        tpot = [(t[-1] - t[0]) / (len(t) - 1) for t in runs if len(t) > 1]
        return {"completions": len(runs), "output_tokens": tokens, "wall_s": round(self.wall_s, 2),
                "output_tok_per_s": round(tokens / self.wall_s, 1) if self.wall_s else 0.0,
                "tpot_p50_ms": round(pct(tpot, 50) * 1000, 1) if tpot else None,
                "tpot_p99_ms": round(pct(tpot, 99) * 1000, 1) if tpot else None,
                "ttft_p50_ms": round(pct([t[0] for t in runs], 50) * 1000, 1) if runs else None,
                "note": self.note}


async def _run(client: AsyncClient, row: Row, requests: list[dict[str, Any]]) -> None:
    start = time.perf_counter()

    async def one(i: int, options: dict[str, Any]) -> None:
        handle = await client.submit(PROMPT.format(i=i), stream=True, **options)
        async for event in client.events(handle, timeout=3600):
            if event.kind == "token":
                # a completion of an n > 1 request names itself; a lone one is completion 0
                which = int(event.fields.get("completion", event.fields.get("choice", "0")) or 0)
                row.times.setdefault((i, which), []).append(time.perf_counter() - start)
            else:
                event.raise_for_error()
                row.texts[i] = event.fields.get("text", "")
                row.finish[i] = event.fields.get("finish_reason", "")

    await asyncio.gather(*(one(i, options) for i, options in enumerate(requests)))
    row.wall_s += time.perf_counter() - start


def _offset(row: Row, runs: int) -> None:
    """Keep a row's earlier rounds apart from the next: completions of round k are keyed (i + k * 10^6)."""
    row.times = {(i + runs * 1_000_000, c): t for (i, c), t in row.times.items()}


async def _n_supported(client: AsyncClient) -> bool:
    try:
        await client.generate(PROMPT.format(i=0), max_tokens=1, n=4, timeout=600)  # type: ignore[call-arg]
    except (RequestFailed, TypeError) as exc:  # refused by the server, or unknown to this client
        log(f"n=4 not available ({exc}); the n row runs as 4 requests per prompt")
        return False
    return True


async def bench(url: str, prefix: str, count: int, schemas: list[dict[str, Any]], *, max_tokens: int) -> list[Row]:
    async with AsyncClient(url, prefix=prefix) as client:
        await client.generate("warm up", max_tokens=2, temperature=0.0, timeout=600)
        # the first constrained request builds the vocabulary's index (once per group): not in the row
        await client.generate("warm up", max_tokens=8, temperature=0.0, guided_json={"type": "integer"}, timeout=600)
        structured = Row("json_schema", "2 rounds")
        plain = Row("plain", "2 rounds; each as long as its json_schema twin")
        constrained = [{"max_tokens": max_tokens, "temperature": 1.0, "seed": i, "guided_json": s}
                       for i, s in enumerate(schemas)]
        log(f"json_schema: {count} requests (round 1)")
        await _run(client, structured, constrained)
        lengths = [len(structured.times.get((i, 0), [])) for i in range(count)]
        twins = [{"max_tokens": max(1, n), "temperature": 1.0, "seed": i, "ignore_eos": True}
                 for i, n in enumerate(lengths)]
        # A B B A: the machine's load drifts; each kind runs once early and once late
        log("plain: the same token counts (rounds 1 and 2)")
        await _run(client, plain, twins)
        _offset(plain, 1)
        await _run(client, plain, twins)
        log("json_schema (round 2)")
        _offset(structured, 1)
        await _run(client, structured, constrained)
        length = max(1, round(statistics.median(lengths)))
        prompts = max(1, count // 4)
        n_ok = await _n_supported(client)
        log(f"n=4: {prompts} prompts x 4 completions of {length} tokens")
        if n_ok:
            n_row = Row("n=4", f"{prompts} requests with n=4")
            await _run(client, n_row, [{"max_tokens": length, "temperature": 1.0, "seed": i, "ignore_eos": True,
                                        "n": 4} for i in range(prompts)])
        else:
            n_row = Row("n=4", "n not available on this server: 4 separate requests per prompt")
            await _run(client, n_row, [{"max_tokens": length, "temperature": 1.0, "seed": 4 * (i // 4) + i % 4,
                                        "ignore_eos": True} for i in range(4 * prompts)])
        log("plain: the n row's lengths")
        yardstick = Row("plain (n row's lengths)", f"{4 * prompts} requests")
        await _run(client, yardstick, [{"max_tokens": length, "temperature": 1.0, "seed": i, "ignore_eos": True}
                                       for i in range(4 * prompts)])
    return [structured, plain, n_row, yardstick]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="model SPEC (default: the real SmolLM2 GGUF if installed, "
                                                      "else random:tiny)")
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--kv-dtype", default="bf16")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-tokens", type=int, default=256, help="of each json_schema request")
    args = parser.parse_args()
    model = args.model
    if model is None:
        from gpu_workers.model.packaged import smollm2_gguf

        gguf = smollm2_gguf()
        model = str(gguf) if gguf is not None else "random:tiny"
    schemas = random_schemas(args.requests, seed=args.seed)
    settings = Settings(prefix="bench-structured")
    log(f"model {model}, {args.requests} requests")
    with Stack(settings, model=model, groups=1, quiet=True, worker_args=["--kv-dtype", args.kv_dtype]) as stack:
        if stack.wait_until_serving(timeout_s=600) is None:
            raise RuntimeError("no worker group became ready within 600 s")
        rows = asyncio.run(bench(stack.url, settings.prefix, args.requests, schemas, max_tokens=args.max_tokens))

    import jsonschema  # type: ignore[import-untyped]

    invalid = 0  # among the documents that ended with stop; those cut by max_tokens are counted apart
    cut = sum(reason == "length" for reason in rows[0].finish.values())
    for i, schema in enumerate(schemas):
        if rows[0].finish.get(i) != "stop":
            continue
        try:
            jsonschema.validate(json.loads(rows[0].texts.get(i, "")), schema)
        except (ValueError, jsonschema.ValidationError):
            invalid += 1
    summaries = {row.name: row.summary() for row in rows}
    print(f"\n{args.requests} requests, model {Path(model).name}, kv {args.kv_dtype}")
    print(f"{'row':<26} {'completions':>11} {'tokens':>7} {'wall s':>7} {'tok/s':>7} {'TPOT p50':>9} "
          f"{'p99':>7} {'TTFT p50':>9}  note")
    for name, s in summaries.items():
        print(f"{name:<26} {s['completions']:>11} {s['output_tokens']:>7} {s['wall_s']:>7.1f} "
              f"{s['output_tok_per_s']:>7.1f} {s['tpot_p50_ms'] or 0:>9.1f} {s['tpot_p99_ms'] or 0:>7.1f} "
              f"{s['ttft_p50_ms'] or 0:>9.1f}  {s['note']}")
    ratio = summaries["json_schema"]["output_tok_per_s"] / max(summaries["plain"]["output_tok_per_s"], 1e-9)
    n_ratio = summaries["n=4"]["output_tok_per_s"] / max(summaries["plain (n row's lengths)"]["output_tok_per_s"], 1e-9)
    print(f"\njson_schema / plain throughput: {ratio:.2f}; n=4 / plain: {n_ratio:.2f}; "
          f"json_schema documents: {invalid} invalid of {args.requests - cut} ended by the schema, {cut} cut at "
          f"max_tokens ({args.max_tokens})")
    targets = {"json_schema keeps at least half the plain throughput": ratio >= 0.5,
               "every json_schema document that ended validates": invalid == 0}
    print_targets(targets)
    write_results({"model": model, "kv_dtype": args.kv_dtype, "requests": args.requests, "seed": args.seed,
                   "machine": platform.processor() or platform.machine(), "rows": summaries,
                   "structured_over_plain": round(ratio, 3), "n4_over_plain": round(n_ratio, 3),
                   "invalid_documents": invalid, "cut_at_max_tokens": cut, "max_tokens": args.max_tokens,
                   "targets": targets}, "structured")


if __name__ == "__main__":
    main()
