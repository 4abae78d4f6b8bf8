"""Batch jobs on RQ: the queue, enqueueing a job, the worker that runs them, and reading their state.

The queue is an ordinary RQ queue on the pipeline's own Redis, named ``Keys.batch_queue``
(``<prefix>:batch``), so any RQ tool (``rq info``, rq-dashboard) sees it too.

``BatchWorker`` is RQ's ``SimpleWorker`` (the job runs in the worker process: no fork per job) with
one addition. A SimpleWorker is busy inside the job, so nothing would heartbeat the job while it
runs; a batch job runs for hours. A thread does it, every third of ``batch_heartbeat_ttl_s``: should
the worker die, the job's heartbeat lapses, RQ's registry maintenance (in any batch worker, every
``batch_heartbeat_ttl_s``) finds it abandoned and retries it under its ``Retry`` policy, and the
retry resumes where the output file ends.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable
from datetime import datetime
from typing import Any

import redis
from rq import Queue, Retry, SimpleWorker
from rq.job import Job, JobStatus
from rq.registry import (
    CanceledJobRegistry,
    DeferredJobRegistry,
    FailedJobRegistry,
    FinishedJobRegistry,
    ScheduledJobRegistry,
    StartedJobRegistry,
)
from rq.worker import WorkerStatus

from broker.connection import TRANSIENT_ERRORS
from broker.keys import Keys
from broker.settings import Settings
from producer.batch.job import BatchSpec, run_batch

log = logging.getLogger(__name__)

# Results and failures of batch jobs are kept a week (RQ's default is minutes).
KEEP_S = 7 * 24 * 3600


def batch_queue(connection: redis.Redis, keys: Keys) -> Queue:
    return Queue(keys.batch_queue, connection=connection)


def submit_job(connection: redis.Redis, keys: Keys, spec: BatchSpec, *, retries: int,
               retry_interval: list[int]) -> Job:
    """Enqueue one batch job; it never times out, and is retried ``retries`` times if it fails."""
    retry = Retry(max=retries, interval=retry_interval) if retries > 0 else None
    return batch_queue(connection, keys).enqueue(
        run_batch, spec.to_dict(), job_timeout=-1, result_ttl=KEEP_S, failure_ttl=KEEP_S, retry=retry,
        description=f"batch {spec.input} -> {spec.output}",
        meta={"input": spec.input, "output": spec.output, "total": None, "done": 0, "errors": 0, "run": 0},
    )


class BatchWorker(SimpleWorker):
    """A SimpleWorker that heartbeats its job while it runs, with a short abandonment TTL."""

    def __init__(self, queues: Any, *, heartbeat_ttl_s: int | None = None, **kwargs: Any) -> None:
        """``heartbeat_ttl_s``: None reads ``batch_heartbeat_ttl_s`` from the settings (the environment),
        as RQ's WorkerPool, which passes no extra arguments, creates it."""
        if heartbeat_ttl_s is None:
            heartbeat_ttl_s = Settings().batch_heartbeat_ttl_s
        self.heartbeat_ttl_s = max(1, int(heartbeat_ttl_s))
        # RQ runs registry maintenance between two blocking dequeues of worker_ttl - 15 s: both every TTL.
        kwargs.setdefault("worker_ttl", self.heartbeat_ttl_s + 15)
        kwargs.setdefault("maintenance_interval", self.heartbeat_ttl_s)
        super().__init__(queues, **kwargs)

    def get_heartbeat_ttl(self, job: Job, working_time: float = 0.0) -> int:
        return self.heartbeat_ttl_s

    def execute_job(self, job: Job, queue: Queue) -> None:
        execution = self.prepare_execution(job)
        stop = threading.Event()
        beat = threading.Thread(target=self._beat, args=(job, execution, stop), daemon=True,
                                name=f"heartbeat-{job.id}")
        beat.start()
        try:
            self.perform_job(job, queue, execution)
        finally:
            stop.set()
            beat.join()
        self.set_state(WorkerStatus.IDLE)

    def _beat(self, job: Job, execution: Any, stop: threading.Event) -> None:
        while not stop.wait(self.heartbeat_ttl_s / 3):
            try:
                self.maintain_heartbeats(job, execution)
            except TRANSIENT_ERRORS + (redis.RedisError,) as exc:  # the next beat may get through in time
                log.warning("heartbeat of batch job %s failed: %s", job.id, exc)


# --- reading jobs -------------------------------------------------------------------------------


def _registries(queue: Queue) -> Iterable[Any]:
    for registry in (StartedJobRegistry, ScheduledJobRegistry, DeferredJobRegistry, FailedJobRegistry,
                     FinishedJobRegistry, CanceledJobRegistry):
        yield registry(queue=queue)


def list_jobs(queue: Queue, *, limit: int = 20) -> list[Job]:
    """The queue's jobs, queued, running and ended (newest first)."""
    ids = list(queue.get_job_ids())
    for registry in _registries(queue):
        ids += registry.get_job_ids()
    seen: dict[str, None] = dict.fromkeys(ids)
    jobs = [job for job in Job.fetch_many(list(seen), connection=queue.connection) if job is not None]
    jobs.sort(key=lambda j: j.enqueued_at or j.created_at or datetime.min, reverse=True)
    return jobs[:limit]


def job_view(job: Job) -> dict[str, Any]:
    """A job's state and progress, as ``batch status --json`` prints it."""
    meta = job.get_meta(refresh=False)
    status = job.get_status(refresh=False)
    view: dict[str, Any] = {
        "id": job.id,
        "status": str(status.value if isinstance(status, JobStatus) else status),
        "input": meta.get("input"),
        "output": meta.get("output"),
        "total": meta.get("total"),
        "done": meta.get("done", 0),
        "errors": meta.get("errors", 0),
        "run": meta.get("run", 0),
        "resent": meta.get("resent", 0),
        "retries_left": job.retries_left,
        "enqueued_at": _iso(job.enqueued_at),
        "started_at": _iso(job.started_at),
        "ended_at": _iso(job.ended_at),
        "updated_at": meta.get("updated_at"),
    }
    if status == JobStatus.FAILED:
        result = job.latest_result()
        exc = getattr(result, "exc_string", None) or ""
        view["error"] = exc.strip().splitlines()[-1] if exc.strip() else "failed"
    return view


def _iso(moment: datetime | None) -> str | None:
    return moment.isoformat() if moment is not None else None

