"""Rank 0 of a real tensor-parallel group, for tests: ``python -m tests.gpu_workers.parallel.tp_leader JOB OUT``.

JOB is a JSON file: ``{"tp": K, "models": [{"dir", "kv_memory", "prompts", "max_tokens", "batched_tokens"}]}``.
For each model this process starts a group of K ranks the way ``ryzanstein worker --tp K`` does
(the other ranks run the real ``python -m gpu_workers`` follower), generates every prompt greedily
through ``LlamaEngine``, records the logits of every step, stops the group, and goes on with the
next model. OUT receives ``torch.save`` of one ``Run`` dict per model.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

import torch

from gpu_workers.engine import EngineRequest
from gpu_workers.llm_engine import LlamaEngine, LlamaEngineOptions
from gpu_workers.parallel.launch import start_group
from gpu_workers.sampling_params import SamplingParams


def options(model: dict[str, Any]) -> LlamaEngineOptions:
    return LlamaEngineOptions(kv_dtype="fp32", kv_memory=str(model["kv_memory"]),
                              max_num_seqs=8, max_num_batched_tokens=model["batched_tokens"])


def run_greedy(engine: LlamaEngine, prompts: list[list[int]], max_tokens: int) -> dict[str, Any]:
    """Every prompt to ``max_tokens`` greedy tokens, all admitted at once; the logits of each step."""
    logits: list[torch.Tensor] = []
    run = engine.runner.run

    def recording(chunks: Any, **_options: Any) -> torch.Tensor:
        out = run(chunks)  # the logits, always (a greedy step's screen would give only its tokens)
        logits.append(out.clone())
        return out

    engine.runner.run = recording  # type: ignore[method-assign]
    sampling = SamplingParams(max_tokens=max_tokens, temperature=0.0)
    tokens: dict[str, list[int]] = {f"r{i}": [] for i in range(len(prompts))}
    for i, prompt in enumerate(prompts):
        engine.add(EngineRequest(f"r{i}", prompt, sampling))
    steps = 0
    while engine.has_work():
        for out in engine.step():
            tokens[out.request_id].append(out.token_id)
        steps += 1
        assert steps < 5000, "engine did not finish"
    return {"tokens": [tokens[f"r{i}"] for i in range(len(prompts))], "logits": logits,
            "preemptions": engine.scheduler.num_preemptions}


def main(job_path: str, out_path: str) -> int:
    job = json.loads(Path(job_path).read_text())
    size = job["tp"]
    runs = []
    for model in job["models"]:
        argv = ["--model", model["dir"], "--tp", str(size), "--kv-dtype", "fp32", "--kv-memory", str(model["kv_memory"]),
                "--tp-timeout", "30", "--log-level", "WARNING"]
        group = start_group(size, device="cpu", follower_argv=argv, timeout_s=30.0, startup_timeout_s=120.0)
        try:
            engine = LlamaEngine(Path(model["dir"]), name="tp-test", options=options(model), tp=group)
            run = run_greedy(engine, model["prompts"], model["max_tokens"])
            run.update(ranks=[dataclasses.asdict(r) for r in engine.ranks], tp=engine.info.tp,
                       kv_heads=engine.runner.kv_cache.num_kv_heads, capacity=engine.stats().kv_capacity_tokens)
            engine.close()  # tells the followers to stop
            run["follower_codes"] = [p.wait(30) for p in group.followers]
            runs.append(run)
        finally:
            group.close()
    torch.save(runs, out_path)
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
