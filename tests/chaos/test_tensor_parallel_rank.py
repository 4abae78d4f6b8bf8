"""SIGKILL the non-leader rank of a tensor-parallel group (TP=2) with 240 requests in flight: the
whole group stops without a wrong event, and its requests move to the other group and finish there
exactly as a healthy group would have answered them."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest

from broker.protocol import SamplingParams
from gpu_workers.engine import EXIT_ENGINE_FAILED, EngineRequest
from gpu_workers.engine_mapping import engine_sampling
from gpu_workers.llm_engine import LlamaEngine, LlamaEngineOptions
from gpu_workers.output import OutputState
from tests.chaos.conftest import Chaos, Job, check_stream, redis_ms, state, submit, workload
from tests.gpu_workers.reference import save_hf_model
from tests.integration.conftest import wait_for
from tests.integration.test_tensor_parallel import children

pytestmark = [pytest.mark.chaos, pytest.mark.integration, pytest.mark.slow]

KV = ["--kv-dtype", "fp32", "--kv-memory", "16MiB"]
DETECTION_LIMIT_S = 5.0


def healthy(model_dir: Path, jobs: list[Job]) -> dict[str, dict[str, object]]:
    """What one healthy group answers (greedy): the engine and output code in-process, all at once."""
    engine = LlamaEngine(model_dir, name="ref", options=LlamaEngineOptions(kv_dtype="fp32", kv_memory="16MiB"))
    outputs: dict[str, OutputState] = {}
    for job in jobs:
        ids = engine.tokenizer.encode(job.prompt)
        sampling = SamplingParams(max_tokens=job.max_tokens, stop=job.stop, temperature=0.0)
        outputs[job.id] = OutputState(sampling=sampling, prompt_ids=ids, tokenizer=engine.tokenizer,
                                      eos_token_ids=engine.info.eos_token_ids, max_context=engine.info.max_context)
        engine.add(EngineRequest(job.id, ids, engine_sampling(sampling)))
    while engine.has_work():
        for step in engine.step():
            out = outputs[step.request_id]
            if out.finished:
                continue
            out.push(step.token_id, engine_finish=step.finish_reason)
            if out.finished and step.finish_reason is None:
                engine.abort(step.request_id)
    return {rid: {"text": o.text, "token_ids": o.token_ids, "finish_reason": o.finish_reason}
            for rid, o in outputs.items()}


def test_non_leader_rank_sigkill_with_240_in_flight(chaos: Chaos, tmp_path: Path) -> None:
    model_dir = save_hf_model(tmp_path / "model", family="llama", seed=2)
    jobs = [Job(j.id, j.prompt, 12 + i % 20, j.stop) for i, j in enumerate(workload(240, tag="tp"))]
    want = healthy(model_dir, jobs)
    chaos.procs.balancer()
    leader = chaos.procs.spawn("gpu_workers", "--model", str(model_dir), "--tp", "2", "--group", "tp",
                               "--tp-timeout", "3", *KV)
    chaos.procs.spawn("gpu_workers", "--model", str(model_dir), "--group", "solo", *KV)
    chaos.wait_groups({"tp", "solo"}, timeout=90)
    (follower,) = children(leader.pid)

    ids = [j.id for j in jobs]
    submit(chaos.r, chaos.keys, jobs)
    wait_for(lambda: any(state(chaos.r, chaos.keys, rid).get("owner") == "tp"
                         and int(state(chaos.r, chaos.keys, rid).get("next", 0)) >= 3 for rid in ids),
             timeout=60, what="the TP group to be mid-stream")
    in_flight = len(ids) - sum(1 for rid in ids if "final" in state(chaos.r, chaos.keys, rid))
    killed_at, killed_ms = time.monotonic(), redis_ms(chaos.r)
    os.kill(follower, signal.SIGKILL)
    assert leader.wait(timeout=15) == EXIT_ENGINE_FAILED
    wait_for(lambda: not chaos.r.exists(chaos.keys.group_accepting("tp")), timeout=10, what="failover of tp")
    detection_s = time.monotonic() - killed_at
    chaos.wait_finished(jobs, timeout=180)

    moved = 0
    for job in jobs:
        final = check_stream(chaos.r, chaos.keys, job)  # one final, last; indices 0..n-1; text = deltas
        assert final["event"] == "done", (job.id, final)
        got = {"text": final["text"], "token_ids": json.loads(final["token_ids"]),
               "finish_reason": final["finish_reason"]}
        assert got == want[job.id], job.id
        moved += state(chaos.r, chaos.keys, job.id).get("epoch", "1") != "1"
    chaos.record(in_flight_at_kill=in_flight, detection_s=round(detection_s, 3), moved=moved,
                 killed_ms=killed_ms)
    assert in_flight >= 200
    assert detection_s <= DETECTION_LIMIT_S
    assert moved >= 1
