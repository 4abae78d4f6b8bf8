"""``ryzanstein demo`` (what ``make demo`` runs): the whole stack on the embedded Redis, a few
requests through the Python clients, the results printed, then a clean stop."""

from __future__ import annotations

import argparse
import asyncio
import time

from broker.cli_common import settings_from_args, setup_logging
from broker.connection import mask_url
from broker.errors import RequestFailed
from producer.client import AsyncClient, Client
from producer.stack import Stack


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="random:tiny",
                        help="model SPEC (default: random:tiny, seeded random weights; echo: no model at all)")
    parser.add_argument("--groups", type=int, default=2, help="worker groups (default 2)")


def _show(label: str, text: str) -> None:
    print(f"  {label:<34} {text!r}")


async def _concurrent(url: str, prefix: str, n: int, *, echo: bool) -> tuple[int, int, float]:
    async with AsyncClient(url, prefix=prefix) as client:
        start = time.perf_counter()
        results = await asyncio.gather(*(client.generate(f"request {i}", max_tokens=32, timeout=300) for i in range(n)))
        elapsed = time.perf_counter() - start
    if echo:
        assert all(r.text == f"request {i}" for i, r in enumerate(results)), "a result came back wrong"
    assert all(r.completion_tokens >= 1 for r in results), "a request came back without tokens"
    return len(results), sum(r.completion_tokens for r in results), elapsed


def run(args: argparse.Namespace) -> int:
    setup_logging(args)
    settings = settings_from_args(args).model_copy(update={"redis_url": args.redis_url})
    print(f"Starting the stack: embedded Redis, a balancer, {args.groups} worker group(s) of {args.model!r}...")
    echo = args.model == "echo"
    if echo:
        print("(the echo engine has no model: it returns the prompt's tokens, to show the pipeline itself)")
    elif args.model.startswith("random:"):
        print(f"({args.model} has seeded RANDOM weights: its text is gibberish by design. It shows the real "
              "engine at work: tokens, streaming, stop strings, limits. Serve a real checkpoint with "
              "--model /path/to/hf-model-dir for meaningful text.)")
    with Stack(settings, model=args.model, groups=args.groups, quiet=True) as stack:
        print(f"Redis at {mask_url(stack.url)}\n")
        with Client(stack.url, prefix=settings.prefix) as client:
            print("Sync client:")
            done = client.generate("Hello, ryzanstein!", max_tokens=64, timeout=300)
            _show("generate('Hello, ryzanstein!')", f"{done.text}  [{done.finish_reason}, "
                  f"{done.completion_tokens} tokens]")
            done = client.generate("The quick brown fox", max_tokens=9, timeout=60)
            _show("max_tokens=9", f"{done.text}  [{done.finish_reason}, {done.completion_tokens} tokens]")
            done = client.generate("stop right here. not this", stop=["."], timeout=60)
            _show("stop=['.']", f"{done.text}  [{done.finish_reason}]")
            if not echo:
                once = client.generate("Seeded sampling", max_tokens=12, temperature=0.8, seed=7, timeout=60)
                again = client.generate("Seeded sampling", max_tokens=12, temperature=0.8, seed=7, timeout=60)
                _show("seed=7, twice", f"same tokens: {once.token_ids == again.token_ids}")
            deltas = list(client.stream("streamed, token by token: héllo", max_tokens=64, timeout=60))
            _show("stream(...) deltas", "|".join(deltas))
            try:
                client.generate(prompt_ids=[1, 2, 10_000_000], timeout=60)
            except RequestFailed as exc:
                _show("prompt_ids=[1, 2, 10_000_000]", f"error {exc.code}: {exc.message}")
        print("\nAsync client (one shared reply stream):")
        n, tokens, elapsed = asyncio.run(_concurrent(stack.url, settings.prefix, 200, echo=echo))
        _show(f"{n} concurrent generate()", f"all {'correct' if echo else 'done'} in {elapsed:.2f}s "
              f"({n / elapsed:.0f} req/s, {tokens / elapsed:.0f} tokens/s)")
        print("\nStopping (worker groups drain first)...")
    print("Done.")
    return 0
