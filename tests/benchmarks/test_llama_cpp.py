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


def test_the_fp8_kv_pair_adds_ours_fp8_over_fp32_kv_per_level() -> None:
    runs = {"fp32": {"ryzanstein": {1: summary(30.0), 8: summary(80.0)}, "llama.cpp": {1: summary(30.0)}},
            "fp8-kv": {"ryzanstein": {1: summary(27.0)}, "llama.cpp": {1: summary(25.0)}}}
    rows = llama_cpp.ratio_rows(runs, [1, 8])
    assert rows[0]["fp8_over_fp32_kv"] == 0.9 and rows[0]["fp8-kv"]["ratio"] == 1.08
    assert "fp8_over_fp32_kv" not in rows[1]  # no fp8 run at 8
    lines = llama_cpp.format_table(rows, runs).splitlines()
    assert lines[1].endswith("fp8/fp32 KV") and lines[2].split("|")[-1].split() == ["0.90x"]
    assert lines[3].split("|")[-1].split() == ["-"]


def test_llama_server_gets_flash_attention_only_for_a_quantized_kv_cache() -> None:
    def argv(kv: str) -> list[str]:
        return llama_cpp.llama_server_argv(Path("s"), Path("m"), port=1, threads=2, parallel=1, ctx_per_slot=8,
                                           kv_type=kv)

    quantized = argv("q8_0")
    assert quantized[quantized.index("-ctk") + 1] == quantized[quantized.index("-ctv") + 1] == "q8_0"
    assert quantized[quantized.index("-fa") + 1] == "on"
    assert "-fa" not in argv("f32")
    assert set(llama_cpp.LLAMA_KV) == set(llama_cpp.PAIRS)


def test_llama_server_runs_without_the_passive_policy_our_import_set(monkeypatch: pytest.MonkeyPatch) -> None:
    import gpu_workers

    environ = {"OMP_WAIT_POLICY": "PASSIVE", "GOMP_SPINCOUNT": "1000", "PATH": "/bin"}
    monkeypatch.setattr(gpu_workers, "WAIT_POLICY_SET_HERE", True)
    assert llama_cpp.llama_server_env(environ) == {"GOMP_SPINCOUNT": "1000", "PATH": "/bin"}
    monkeypatch.setattr(gpu_workers, "WAIT_POLICY_SET_HERE", False)  # the operator's own policy is kept
    assert llama_cpp.llama_server_env(environ) == environ


def test_the_serving_entry_point_leaves_llama_server_its_own_policy() -> None:
    """``benchmarks/serving.py --llama-cpp`` is how the comparison runs: a fresh interpreter importing
    it, with no policy of the operator's, must start llama-server without ``OMP_WAIT_POLICY``, while its
    own torch threads sleep as a worker's do (serving.py once set PASSIVE itself before gpu_workers
    could tell it was not the operator's, and llama-server inherited it)."""
    import os
    import subprocess
    import sys

    code = ("import os, benchmarks.serving; from benchmarks import llama_cpp; "
            "print(os.environ.get('OMP_WAIT_POLICY'), llama_cpp.llama_server_env(os.environ).get('OMP_WAIT_POLICY'))")
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120,
                         cwd=Path(__file__).resolve().parents[2], check=True).stdout.split()
    assert out == ["PASSIVE", "None"]


def test_rounds_pool_their_requests() -> None:
    """Several rounds of one system at one level count as one run: tokens over summed wall time, every
    TTFT, the first round's texts, the highest load."""
    a = llama_cpp.Run(wall_s=10.0, ttft_s=[0.1, 0.2], texts=["x", "y"], tokens=256, load=1.0)
    b = llama_cpp.Run(wall_s=6.0, ttft_s=[0.3, 0.4], texts=["z", "w"], tokens=256, load=2.5)
    pooled = llama_cpp.pooled([a, b])
    assert pooled.summary()["output_tok_per_s"] == 32.0  # 512 tokens in 16 s
    assert pooled.ttft_s == [0.1, 0.2, 0.3, 0.4] and pooled.texts == ["x", "y"] and pooled.load == 2.5
    assert parse("--rounds", "3").rounds == 3 and parse().rounds == 1


def test_a_missing_f32_file_stops_before_anything_runs(tmp_path: Path) -> None:
    """--llama-f32 naming no file: a usage error up front, not a llama-server that exits mid-run."""
    model = tmp_path / "m.gguf"
    model.write_bytes(b"GGUF")
    args = parse("--llama-cpp", str(tmp_path), "--llama-f32", str(tmp_path / "missing.gguf"))
    args.model, args.threads, args.rounds, args.pairs = str(model), 2, 1, "fp32"
    with pytest.raises(SystemExit, match="--llama-f32: no file"):
        llama_cpp.compare(args)
