"""A follower rank's whole life: load its shards, report them, then compute what the leader sends."""

from __future__ import annotations

import logging
import time
from pathlib import Path

from gpu_workers.parallel.launch import TensorParallelGroup
from gpu_workers.parallel.runner import serve_follower
from gpu_workers.rank import LlamaEngineOptions, build_runner, rank_report

log = logging.getLogger(__name__)


def run_follower(model_dir: Path, options: LlamaEngineOptions, group: TensorParallelGroup) -> int:
    """Exit code: 0 when the leader stopped the group, EXIT_ENGINE_FAILED when a rank was lost."""
    began = time.perf_counter()
    runner = build_runner(model_dir, options, tp=group)  # the same options and KV blocks as the leader
    report = rank_report(runner, group, load_s=time.perf_counter() - began)
    log.info("rank %d loaded in %.1fs: weights %.1f MiB, KV cache %.1f MiB, peak RSS %.1f MiB", group.rank,
             report.load_s, report.weight_bytes / 2**20, report.kv_bytes / 2**20, report.peak_rss_bytes / 2**20)
    group.gather_reports(report)
    return serve_follower(runner, group)
