"""The llama.cpp comparison's pure parts (benchmarks/llama_cpp.py): its flags, the ratio table, the
greedy-text comparison and llama-server's command line. The timed runs themselves are a benchmark."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from benchmarks import llama_cpp


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    llama_cpp.add_arguments(parser)
    return parser.parse_args(list(argv))


def test_the_flags_default_to_the_issue_workload() -> None:
    args = parse()
    assert args.llama_cpp is None
    assert (args.concurrency, args.prompt_tokens, args.max_tokens) == ([1, 8, 64], 128, 128)


def test_concurrency_levels_parse_in_order() -> None:
    args = parse("--llama-cpp", "/opt/llama/bin", "--concurrency", "64,1,8", "--max-tokens", "32")
    assert args.llama_cpp == Path("/opt/llama/bin")
    assert args.concurrency == [64, 1, 8]
    assert args.max_tokens == 32


@pytest.mark.parametrize("text", ["", "1,,8", "one", "0,8", "-1", "8,8"])
def test_bad_concurrency_is_a_usage_error(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        llama_cpp.parse_concurrency(text)
    with pytest.raises(SystemExit):
        parse("--concurrency", text)


def summary(tok_s: float, ttft: float = 100.0) -> dict[str, float]:
    return {"output_tok_per_s": tok_s, "ttft_p50_ms": ttft, "ttft_p99_ms": 2 * ttft}


def test_ratio_rows_divide_ours_by_llama_cpp_per_level_and_pair() -> None:
    runs = {"fp32": {"ryzanstein": {1: summary(15.0), 64: summary(142.9)},
                     "llama.cpp": {1: summary(30.6), 64: summary(143.5)}},
            "4-bit": {"ryzanstein": {1: summary(20.0)}, "llama.cpp": {1: summary(0.0)}}}
    rows = llama_cpp.ratio_rows(runs, [1, 64])
    assert rows[0] == {"concurrency": 1, "fp32": {"ryzanstein": 15.0, "llama.cpp": 30.6, "ratio": 0.49},
                       "4-bit": {"ryzanstein": 20.0, "llama.cpp": 0.0, "ratio": None}}
    assert rows[1] == {"concurrency": 64, "fp32": {"ryzanstein": 142.9, "llama.cpp": 143.5, "ratio": 1.0}}
    table = llama_cpp.format_table(rows, runs)
    assert "0.49x" in table and "1.00x" in table
    assert table.splitlines()[3].split("|")[2].split() == ["-"]  # 4-bit did not run at 64
    assert "100 / 200" in table  # TTFT p50 / p99


def test_text_equality_counts_identical_texts_and_finds_the_first_difference() -> None:
    assert llama_cpp.text_equality(["a b", "c"], ["a b", "c"]) == {"identical": 2, "requests": 2}
    out = llama_cpp.text_equality(["same", "abcX", "abc"], ["same", "abcY", "ab"])
    assert out == {"identical": 1, "requests": 3, "first_unequal": {"request": 1, "at_char": 3}}
    assert llama_cpp.text_equality(["abc"], ["ab"])["first_unequal"] == {"request": 0, "at_char": 2}
    with pytest.raises(ValueError):
        llama_cpp.text_equality(["a"], [])


def test_llama_server_listens_on_loopback_with_a_slot_per_request() -> None:
    argv = llama_cpp.llama_server_argv(Path("/b/llama-server"), Path("/m.gguf"), port=8123, threads=2,
                                       parallel=64, ctx_per_slot=272, kv_type="f32")
    flags = dict(zip(argv[1::2], argv[2::2]))
    assert argv[0] == "/b/llama-server"
    assert flags["--host"] == "127.0.0.1" and flags["--port"] == "8123"
    assert flags["-np"] == "64" and flags["-c"] == str(64 * 272)
    assert flags["-ctk"] == flags["-ctv"] == "f32" and flags["-t"] == "2"
