"""A batch job of 500 lines through the real pipeline (balancer + echo group), run by ``ryzanstein
batch worker`` processes: the first worker is killed mid-job, RQ finds the job abandoned and retries
it on a second worker, and the output holds every line exactly once."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import redis
from rq.job import Job, JobStatus

from broker.keys import Keys
from tests.integration.conftest import Procs, wait_for, wait_groups

pytestmark = [pytest.mark.integration, pytest.mark.slow]

LINES = 500
# line -> (the bad line, the error code its record must carry)
BAD = {
    50: ("{not json", "invalid_request"),
    150: (json.dumps({"prompt": "x", "temperature": -1}), "invalid_request"),
    250: (json.dumps({"prompt": 5}), "invalid_request"),
    350: (json.dumps({"note": "no prompt"}), "invalid_request"),
    450: (json.dumps({"prompt_ids": [104, 999]}), "invalid_request"),  # refused by the worker group, not the job
}


def _input(path: Path) -> dict[int, str]:
    """Write the input; returns what each good line's result text must be (echo returns the prompt)."""
    rows, expected = [], {}
    for i in range(1, LINES + 1):
        if i in BAD:
            rows.append(BAD[i][0])
        elif i % 20 == 0:
            rows.append(json.dumps({"id": f"c{i}", "messages": [{"role": "user", "content": f"chat {i}"}],
                                    "max_tokens": 64}))
            expected[i] = f"user: chat {i}\nassistant:"
        else:
            rows.append(json.dumps({"id": f"q{i}", "prompt": f"prompt number {i:03d} " + "y" * 24, "max_tokens": 64}))
            expected[i] = f"prompt number {i:03d} " + "y" * 24
    path.write_text("\n".join(rows) + "\n\n")  # a trailing blank line is no line to answer
    return expected


def _complete_records(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(raw) for raw in path.read_text().split("\n")[:-1]]  # without a torn last line


def _cli(env: dict[str, str], *args: str) -> str:
    done = subprocess.run([sys.executable, "-m", "producer", "batch", *args], check=False, env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout


def _saved_done(r: redis.Redis, job_id: str) -> int:
    """The ``done`` count of the job's last saved progress (its RQ meta)."""
    return int(Job.fetch(job_id, connection=r).get_meta(refresh=True).get("done", 0))


def _status(env: dict[str, str], job_id: str) -> dict[str, Any]:
    return json.loads(_cli(env, "status", job_id, "--json"))


def test_batch_of_500_killed_mid_job_and_resumed_answers_every_line_once(
    procs: Procs, r: redis.Redis, keys: Keys, subprocess_env: dict[str, str], tmp_path: Path
) -> None:
    procs.balancer()
    procs.worker("b1")
    source, out = tmp_path / "prompts.jsonl", tmp_path / "results.jsonl"
    expected = _input(source)
    job_id = _cli(subprocess_env, "submit", str(source), "--out", str(out), "--window", "4",
                  "--retry-interval", "0").strip()
    assert _status(subprocess_env, job_id)["status"] == "queued"
    wait_groups(r, keys, {"b1"})

    # A 2 s heartbeat TTL: a dead worker's job is found abandoned within seconds, not a minute.
    env = {**subprocess_env, "RYZ_BATCH_HEARTBEAT_TTL_S": "2", "RYZ_BATCH_PROGRESS_INTERVAL_S": "0.2"}
    workers: list[subprocess.Popen[bytes]] = []

    def start_worker() -> subprocess.Popen[bytes]:
        log = open(tmp_path / f"batch-worker-{len(workers)}.log", "wb")  # noqa: SIM115
        # Its own session: the kill below takes RQ's scheduler process along, as a machine dying would.
        proc = subprocess.Popen([sys.executable, "-m", "producer", "batch", "worker"], env=env, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        workers.append(proc)
        return proc

    try:
        first = start_worker()
        # Progress is saved every 0.2 s: wait for a save that counts 100 lines, not for the output
        # file alone, or a kill right after a fast start finds the job's meta still at 0 done.
        wait_for(lambda: _saved_done(r, job_id) >= 100, timeout=30, what="progress saved at 100 results")
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
        cut = len(_complete_records(out))
        assert cut < LINES, "the job finished before the worker was killed: nothing was interrupted"
        mid = _status(subprocess_env, job_id)
        assert mid["status"] == "started" and mid["total"] == LINES and 100 <= mid["done"] <= cut < LINES
        assert _cli(subprocess_env, "status", job_id).startswith(f"{job_id}  started   ")

        start_worker()
        wait_for(lambda: Job.fetch(job_id, connection=r).get_status() == JobStatus.FINISHED, timeout=45,
                 what="the job to finish on the second worker")
    finally:
        for proc in workers:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in workers:
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        for log in sorted(tmp_path.glob("batch-worker-*.log")):
            print(f"--- {log.name}\n{log.read_text(errors='replace')[-3000:]}")

    records = _complete_records(out)
    assert out.read_text().endswith("\n")
    counts = Counter(rec["line"] for rec in records)
    assert set(counts) == set(range(1, LINES + 1)) and set(counts.values()) == {1}  # every line exactly once
    by_line = {rec["line"]: rec for rec in records}
    for line, (_text, code) in BAD.items():
        assert by_line[line]["error"]["code"] == code, by_line[line]
    assert "outside the vocabulary" in by_line[450]["error"]["message"]
    for line, text in expected.items():
        rec = by_line[line]
        assert (rec["text"], rec["finish_reason"]) == (text, "stop"), rec
        assert rec["usage"]["completion_tokens"] == len(text.encode())
        assert rec["id"] == (f"c{line}" if line % 20 == 0 else f"q{line}")
    final = _status(subprocess_env, job_id)
    assert (final["done"], final["total"], final["errors"]) == (LINES, LINES, len(BAD))
    assert final["run"] == 2 and final["retries_left"] == 2  # RQ retried it once, after the worker died
    assert "100%" in _cli(subprocess_env, "status", job_id)

    # No line went out under a second request id: results finished in Redis while no worker was
    # reading were taken from the job's reply stream, requests in flight were absorbed when resent.
    reply = keys.batch_replies(job_id)
    sent = {key.decode().rsplit(":state:", 1)[1] for key in r.scan_iter(match=keys.state(reply, "*"))}
    assert sent == {f"batch.{job_id}.{i}" for i in range(1, LINES + 1) if i not in BAD or i == 450}
