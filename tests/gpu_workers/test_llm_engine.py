"""The Llama engine in-process (no Redis): greedy tokens equal transformers', with batching, prefix
cache hits, preemption and migration; sampling, limits and aborts behave."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from gpu_workers.block_manager import KVCacheGroups
from gpu_workers.engine import EngineRequest
from gpu_workers.llm_engine import LlamaEngine, LlamaEngineOptions
from gpu_workers.sampling_params import SamplingParams
from tests.gpu_workers.reference import MIN_MARGIN, Reference, hf_greedy, save_hf_model

NEW_TOKENS = 24
GREEDY = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0)


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_hf_model(tmp_path_factory.mktemp("llama"), family="llama")


def prompts_of(lengths: list[int], *, seed: int = 0, prefix: list[int] | None = None) -> list[list[int]]:
    rng = random.Random(seed)
    return [(prefix or []) + [rng.randrange(320) for _ in range(n)] for n in lengths]


def engine_for(model_dir: Path, **options: object) -> LlamaEngine:
    return LlamaEngine(model_dir, name="test", options=LlamaEngineOptions(**{"kv_dtype": "fp32", "kv_memory": "4MiB", **options}))


def generate(engine: LlamaEngine, requests: list[EngineRequest], *, max_steps: int = 2000) -> dict[str, list[int]]:
    """Run until every request is done; the tokens of each, checking each ends exactly once."""
    out: dict[str, list[int]] = {r.request_id: [] for r in requests}
    finished: dict[str, str] = {}
    for r in requests:
        engine.add(r)
    for _ in range(max_steps):
        if not engine.has_work():
            break
        for step in engine.step():
            assert step.request_id not in finished, f"{step.request_id} produced a token after finishing"
            out[step.request_id].append(step.token_id)
            if step.finish_reason is not None:
                finished[step.request_id] = step.finish_reason
    assert not engine.has_work(), "engine did not finish its requests"
    assert set(finished) == set(out), f"never finished: {set(out) - set(finished)}"
    return out


def greedy_requests(prompts: list[list[int]], sampling: SamplingParams = GREEDY) -> list[EngineRequest]:
    return [EngineRequest(f"r{i}", p, sampling) for i, p in enumerate(prompts)]


def assert_clear(reference: Reference) -> None:
    assert reference.min_margin >= MIN_MARGIN, f"reference has a near-tie ({reference.min_margin:.2e})"


def test_batch_of_different_lengths_matches_transformers(llama_dir: Path) -> None:
    prompts = prompts_of([3, 17, 40, 64, 129])
    reference = hf_greedy(llama_dir, prompts, NEW_TOKENS)
    assert_clear(reference)
    out = generate(engine_for(llama_dir, max_num_batched_tokens=64, max_num_seqs=16), greedy_requests(prompts))
    assert [out[f"r{i}"] for i in range(len(prompts))] == reference.tokens


def test_shared_prefixes_hit_the_prefix_cache_and_still_match(llama_dir: Path) -> None:
    prefix = prompts_of([48], seed=7)[0]
    prompts = prompts_of([5, 9, 21], seed=8, prefix=prefix)
    reference = hf_greedy(llama_dir, prompts, NEW_TOKENS)
    assert_clear(reference)
    engine = engine_for(llama_dir)
    first = generate(engine, greedy_requests(prompts[:1]))
    rest = generate(engine, [EngineRequest(f"r{i}", p, GREEDY) for i, p in enumerate(prompts) if i])
    stats = engine.stats()
    assert stats.prefix_cache_hit_rate > 0.3
    # the totals the metrics count: every prompt token queried, the shared prefix's full blocks hit
    assert stats.prefix_cache_queries == sum(map(len, prompts))
    assert stats.prefix_cache_hits == 2 * (len(prefix) // 16 * 16)
    assert [first["r0"], rest["r1"], rest["r2"]] == reference.tokens


def test_preemption_under_a_tiny_kv_cache_keeps_tokens_exact(llama_dir: Path) -> None:
    prompts = prompts_of([40, 41, 42, 43, 44, 45])
    reference = hf_greedy(llama_dir, prompts, NEW_TOKENS)
    assert_clear(reference)
    # 2 layers x 2 (K, V) x 2 KV heads x 16 dims x 4 bytes = 512 bytes per token: 10 blocks of 16 tokens,
    # while the six requests need 4 blocks each at their longest.
    engine = engine_for(llama_dir, kv_memory=str(10 * 16 * 512))
    assert engine.stats().kv_capacity_tokens == 160
    out = generate(engine, greedy_requests(prompts))
    assert engine.scheduler.num_preemptions > 0
    assert engine.stats().num_preemptions == engine.scheduler.num_preemptions
    assert [out[f"r{i}"] for i in range(len(prompts))] == reference.tokens
    assert engine.stats().kv_used_tokens == 0


@pytest.mark.parametrize("family,overrides", [
    ("mistral", {}),
    ("qwen2", {"num_key_value_heads": 1}),
    ("llama", {"tie_word_embeddings": True, "head_dim": 24, "num_key_value_heads": 4}),
    ("mistral", {"sliding_window": 9}),
    ("qwen3", {"use_sliding_window": True, "sliding_window": 10, "max_window_layers": 1, "seed": 6}),
    ("phi3", {"sliding_window": 11}),
    ("gemma3", {"head_dim": 16, "sliding_window": 9, "layer_types": ["sliding_attention", "full_attention"],
                "final_logit_softcapping": 30.0}),
], ids=["mistral", "qwen2-mqa", "llama-tied-headdim24", "mistral-window9", "qwen3-window10", "phi3-window11",
        "gemma3-window9"])
def test_other_families_match_transformers(tmp_path: Path, family: str, overrides: dict[str, object]) -> None:
    model_dir = save_hf_model(tmp_path, family=family, **{"seed": 3, **overrides})  # seeds with clear margins
    prompts = prompts_of([7, 33], seed=5)
    reference = hf_greedy(model_dir, prompts, 12)
    assert_clear(reference)
    sampling = SamplingParams(max_tokens=12, temperature=0.0)
    out = generate(engine_for(model_dir), greedy_requests(prompts, sampling))
    assert [out["r0"], out["r1"]] == reference.tokens


def test_a_migrated_request_continues_from_its_published_tokens(llama_dir: Path) -> None:
    prompt = prompts_of([30], seed=11)[0]
    reference = hf_greedy(llama_dir, [prompt], NEW_TOKENS)
    assert_clear(reference)
    done = reference.tokens[0][:10]
    out = generate(engine_for(llama_dir), [EngineRequest("m", prompt, GREEDY, output_ids=done)])
    assert out["m"] == reference.tokens[0][10:]  # the remaining budget, continuing the same path


def test_eos_ends_with_stop_and_max_tokens_with_length(tmp_path: Path) -> None:
    prompt = prompts_of([12], seed=2)[0]
    plain = save_hf_model(tmp_path / "plain", seed=4)
    path = hf_greedy(plain, [prompt], 8).tokens[0]
    eos = path[5]
    with_eos = save_hf_model(tmp_path / "eos", seed=4, eos_token_id=eos)
    engine = engine_for(with_eos)
    assert eos in engine.info.eos_token_ids
    finishes: list[tuple[int, str | None]] = []
    engine.add(EngineRequest("e", prompt, SamplingParams(max_tokens=8, temperature=0.0)))
    while engine.has_work():
        finishes += [(s.token_id, s.finish_reason) for s in engine.step()]
    first_eos = path.index(eos)
    assert finishes[-1] == (eos, "stop") and len(finishes) == first_eos + 1

    engine = engine_for(plain)
    engine.add(EngineRequest("l", prompt, SamplingParams(max_tokens=3, temperature=0.0)))
    steps = []
    while engine.has_work():
        steps += engine.step()
    assert [s.finish_reason for s in steps] == [None, None, "length"]


def test_seeded_sampling_does_not_depend_on_batch_neighbours(llama_dir: Path) -> None:
    seeded = SamplingParams(max_tokens=16, temperature=1.0, top_p=0.9, seed=1234)
    prompt = prompts_of([20], seed=9)[0]
    alone = generate(engine_for(llama_dir), [EngineRequest("s", prompt, seeded)])["s"]
    neighbours = [EngineRequest(f"n{i}", p, SamplingParams(max_tokens=16, temperature=1.0))
                  for i, p in enumerate(prompts_of([5, 50, 13], seed=10))]
    crowded = generate(engine_for(llama_dir, max_num_batched_tokens=32, max_num_seqs=16), [*neighbours, EngineRequest("s", prompt, seeded)])
    assert crowded["s"] == alone
    other_seed = SamplingParams(max_tokens=16, temperature=1.0, top_p=0.9, seed=99)
    assert generate(engine_for(llama_dir), [EngineRequest("o", prompt, other_seed)])["o"] != alone


def test_abort_frees_the_requests_blocks_at_once(llama_dir: Path) -> None:
    engine = engine_for(llama_dir)
    engine.add(EngineRequest("a", prompts_of([70])[0], GREEDY))
    engine.add(EngineRequest("b", prompts_of([20])[0], GREEDY))
    for _ in range(3):
        engine.step()
    assert engine.stats().kv_used_tokens > 0
    engine.abort("a")
    engine.abort("b")
    engine.abort("never-added")
    assert engine.stats().kv_used_tokens == 0
    assert not engine.has_work() and engine.step() == []


def test_kv_memory_too_small_for_one_block_is_a_clear_error(llama_dir: Path) -> None:
    from broker.errors import ConfigError

    with pytest.raises(ConfigError, match="holds no KV block"):
        engine_for(llama_dir, kv_memory="1KiB")


def test_kv_memory_too_small_fails_before_the_weights_load(llama_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from broker.errors import ConfigError
    from gpu_workers import model_runner

    loads: list[Path] = []
    monkeypatch.setattr(model_runner, "load_weights", lambda model, path: loads.append(path))
    with pytest.raises(ConfigError, match="holds no KV block"):
        engine_for(llama_dir, kv_memory="1KiB")
    assert loads == []


def test_default_kv_budget_is_measured_with_the_weights_loaded(llama_dir: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """On CUDA the share of free device memory must leave the weights' memory alone: read it after."""
    from gpu_workers import model_runner, rank

    events: list[str] = []
    real_load = model_runner.load_weights
    monkeypatch.setattr(model_runner, "load_weights", lambda *a: (events.append("weights"), real_load(*a))[1])

    def budget(kv_memory: str | None, *, device: str, ranks_on_host: int = 1) -> int:
        events.append(f"budget {kv_memory}")
        return 1 << 20

    monkeypatch.setattr(rank, "kv_budget_bytes", budget)
    engine = engine_for(llama_dir, kv_memory=None)
    assert events == ["weights", "budget None"]
    assert engine.stats().kv_capacity_tokens > 0
    engine.close()


def test_sliding_window_blocks_are_given_back_while_generating(tmp_path: Path) -> None:
    """Every Mistral layer slides over 16 tokens: a running sequence gives back the blocks before its
    window, so three 80-token sequences run side by side in 12 blocks (they would need 15, and do
    preempt each other when the blocks are kept), with tokens still equal to transformers'."""
    model_dir = save_hf_model(tmp_path, family="mistral", seed=3, sliding_window=16)
    prompts = prompts_of([40, 41, 42], seed=9)
    sampling = SamplingParams(max_tokens=40, temperature=0.0)
    reference = hf_greedy(model_dir, prompts, 40)
    assert_clear(reference)
    # 2 layers x 2 (K, V) x 2 KV heads x 16 dims x 4 bytes = 512 bytes per token
    kv = {"kv_memory": str(12 * 16 * 512), "max_num_batched_tokens": 64, "max_num_seqs": 8}
    engine = engine_for(model_dir, **kv)
    assert engine.blocks.groups.windows == (16,)
    used: list[int] = []  # blocks in use after each step
    step = engine.step

    def recording_step() -> list:
        outputs = step()
        used.append(engine.blocks.num_used_blocks)
        return outputs

    engine.step = recording_step  # type: ignore[method-assign]
    out = generate(engine, greedy_requests(prompts, sampling))
    assert [out[f"r{i}"] for i in range(3)] == reference.tokens
    assert engine.scheduler.num_preemptions == 0
    assert max(used[-30:]) <= 3 * 3  # decoding: each holds its window's (at most) two blocks and the next one

    kept = engine_for(model_dir, **kv)
    kept.blocks.release_out_of_window = lambda seq: 0  # type: ignore[method-assign]
    out = generate(kept, greedy_requests(prompts, sampling))
    assert [out[f"r{i}"] for i in range(3)] == reference.tokens
    assert kept.scheduler.num_preemptions > 0


def test_gemma3_sliding_layers_keep_only_their_window_beside_global_ones(tmp_path: Path) -> None:
    """Gemma 3 interleaves sliding-window layers with global ones: each kind keeps its own blocks
    (two KV cache groups of one layer here), the sliding group gives back what falls out of its
    16-token window, and tokens still equal transformers' on prompts five times the window. At the
    end each 99-token sequence holds 7 global blocks and 2 sliding ones (9 one-layer blocks, where
    every layer keeping every block would take 7 two-layer blocks: 14); prefix hits beyond the window
    serve the repeated prompt."""
    model_dir = save_hf_model(tmp_path, family="gemma3", seed=3, head_dim=16, sliding_window=16,
                              layer_types=["sliding_attention", "full_attention"])
    prompts = prompts_of([80, 81, 82], seed=9)
    sampling = SamplingParams(max_tokens=20, temperature=0.0)
    reference = hf_greedy(model_dir, prompts, 20)
    assert_clear(reference)
    engine = engine_for(model_dir, max_num_batched_tokens=64, max_num_seqs=8)
    assert engine.blocks.groups.windows == (None, 16) and engine.runner.kv_cache.num_layers == 1
    held: list[dict[str, int]] = []  # blocks each running sequence holds, after each step
    step = engine.step

    def recording_step() -> list:
        outputs = step()
        bm = engine.blocks
        held.append({s.request_id: sum(1 for i in range(len(s.block_table)) if not bm._is_released(s, i))
                     for s in engine.scheduler.running})
        return outputs

    engine.step = recording_step  # type: ignore[method-assign]
    out = generate(engine, greedy_requests(prompts, sampling))
    assert [out[f"r{i}"] for i in range(3)] == reference.tokens
    last = [h for h in held if len(h) == 3][-1]
    assert last == {"r0": 7 + 2, "r1": 7 + 2, "r2": 7 + 2}, last
    assert engine.blocks.groups.peak_blocks(99, 16) == 9 and KVCacheGroups.single([16, None]).peak_blocks(99, 16) == 7
    # the same prompt again: every full block but the last hits, the sliding group's from its window
    again = generate(engine, [EngineRequest("again", prompts[2], sampling)])
    assert again["again"] == reference.tokens[2]
    assert engine.stats().prefix_cache_hits >= 80


def test_deadline_orders_what_waits_among_equal_priorities(llama_dir: Path) -> None:
    engine = engine_for(llama_dir, max_num_seqs=1, max_num_batched_tokens=16)
    for rid, priority, deadline in (("none", 0, None), ("loose", 0, 50.0), ("tight", 0, 10.0), ("low", 1, 1.0)):
        engine.add(EngineRequest(rid, [5, 6, 7], GREEDY, priority=priority, deadline=deadline))
    assert [s.request_id for s in engine.scheduler.waiting] == ["tight", "loose", "none", "low"]
    assert engine.not_started() == ["tight", "loose", "none", "low"]
    engine.step()
    assert [s.request_id for s in engine.scheduler.running] == ["tight"]
    assert engine.not_started() == ["loose", "none", "low"]


def test_default_kv_budget_follows_the_cgroup_and_never_exceeds_what_sequences_can_use(
        llama_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without --kv-memory on a CPU: a quarter of what the pod's cgroup still allows, and never more
    blocks than max_num_seqs sequences at the model's full context could fill."""
    from gpu_workers import kv_memory

    cgroup = tmp_path / "cgroup"
    cgroup.mkdir()
    (tmp_path / "self").write_text("0::/\n")
    (cgroup / "memory.current").write_text("0\n")
    monkeypatch.setattr(kv_memory, "CGROUP_ROOT", cgroup)
    monkeypatch.setattr(kv_memory, "SELF_CGROUP", tmp_path / "self")

    (cgroup / "memory.max").write_text(f"{8 << 20}\n")  # an 8 MiB pod on this (much larger) host
    engine = engine_for(llama_dir, kv_memory=None)
    block_bytes = engine.runner.kv_cache.bytes_per_block()
    assert engine.blocks.num_blocks == (2 << 20) // block_bytes  # 25% of 8 MiB
    engine.close()

    (cgroup / "memory.max").write_text("max\n")  # no limit: the host's memory, capped by what fits
    engine = engine_for(llama_dir, kv_memory=None, max_num_seqs=2)
    assert engine.blocks.num_blocks == -(-2 * engine.config.max_context // 16)
    engine.close()


@pytest.mark.parametrize("kv_dtype", ["fp8_e4m3", "bf16"])
def test_gemma3_tokens_do_not_depend_on_what_the_sliding_groups_gave_back(tmp_path: Path, kv_dtype: str) -> None:
    """A request's greedy tokens are the same on a cold engine and on one whose prefix cache holds
    its first 64 tokens (four times the window: the sliding group serves the hit from its window's
    blocks, placeholders before them) while neighbours run beside it in small chunks."""
    model_dir = save_hf_model(tmp_path, family="gemma3", seed=3, head_dim=16, sliding_window=16,
                              layer_types=["sliding_attention", "full_attention"])
    prefix = prompts_of([64], seed=21)[0]
    target, donor, neighbour = prompts_of([13, 30, 45], seed=22)
    sampling = SamplingParams(max_tokens=16, temperature=0.0)
    cold = generate(engine_for(model_dir, kv_dtype=kv_dtype), [EngineRequest("t", prefix + target, sampling)])
    warm_engine = engine_for(model_dir, kv_dtype=kv_dtype, max_num_batched_tokens=24, max_num_seqs=8)
    generate(warm_engine, [EngineRequest("donor", prefix + donor, sampling)])
    warm = generate(warm_engine, [EngineRequest("t", prefix + target, sampling),
                                  EngineRequest("n", neighbour, sampling)])
    assert warm_engine.stats().prefix_cache_hits == 64  # its 4 prefix blocks: sliding block 3 and placeholders
    assert warm["t"] == cold["t"]
