"""``ryzanstein batch``: offline batch jobs on RQ — ``submit``, ``worker``, ``status``, ``resume``.

RQ itself is imported only when a verb runs, so that ``ryzanstein --help`` stays quick.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TextIO

from broker.cli_common import add_common, settings_from_args, setup_logging
from broker.connection import connect, mask_url, resolve_url
from broker.errors import ConfigError
from broker.keys import Keys
from broker.redis_url import parse_url

DEFAULT_WINDOW = 64
DEFAULT_RETRIES = 3
DEFAULT_RETRY_INTERVAL = "10,60,300"
DEFAULT_WATCH_S = 1.0
BAR_WIDTH = 30
ENDED = {"finished", "failed", "stopped", "canceled"}
_COMMON = {"redis_url", "prefix", "log_level", "log_json"}


def _add_common_after(parser: argparse.ArgumentParser) -> None:
    """The shared options, also after the verb; unset ones keep what was given before it."""
    add_common(parser)
    for action in parser._actions:
        if action.dest in _COMMON:
            action.default = argparse.SUPPRESS


def configure(parser: argparse.ArgumentParser) -> None:
    verbs = parser.add_subparsers(dest="verb", metavar="VERB", required=True)

    submit = verbs.add_parser("submit", help="enqueue a batch job for a JSONL file of prompts",
                              description="Enqueue a batch job: every line of INPUT (JSON Lines: prompt, "
                                          "prompt_ids or messages, plus request fields) becomes a request; "
                                          "each result is appended to --out as it finishes. Prints the job id.")
    submit.add_argument("input", help="JSONL file of requests (the worker must be able to read this path)")
    submit.add_argument("--out", required=True, help="JSONL file the results are appended to; lines already "
                                                     "in it are skipped (so a job can be re-run)")
    submit.add_argument("--window", type=int, default=DEFAULT_WINDOW, metavar="N",
                        help=f"requests in flight at most (default {DEFAULT_WINDOW})")
    submit.add_argument("--max-tokens", type=int, default=None, help="for lines that set none (default 16)")
    submit.add_argument("--temperature", type=float, default=None, help="for lines that set none (default 1.0)")
    submit.add_argument("--top-p", type=float, default=None, help="for lines that set none (default 1.0)")
    submit.add_argument("--top-k", type=int, default=None, help="for lines that set none (default 0: off)")
    submit.add_argument("--seed", type=int, default=None, help="for lines that set none")
    submit.add_argument("--stop", action="append", default=None, metavar="S",
                        help="stop sequence for lines that set none (repeatable)")
    submit.add_argument("--priority", type=int, default=None, help="for lines that set none; lower is served "
                                                                   "earlier (default 0)")
    submit.add_argument("--timeout", type=float, default=None, metavar="S",
                        help="server-side deadline of each request, for lines that set none")
    submit.add_argument("--chat-template", default=None, metavar="PATH",
                        help="chat template for 'messages' lines: a model directory, tokenizer_config.json or "
                             "Jinja file (default: the one the served model's groups publish)")
    submit.add_argument("--model-dir", default=None, metavar="DIR", help="same as --chat-template DIR")
    submit.add_argument("--retries", type=int, default=DEFAULT_RETRIES, metavar="N",
                        help=f"times RQ retries the job after a failure or a dead worker (default {DEFAULT_RETRIES})")
    submit.add_argument("--retry-interval", default=DEFAULT_RETRY_INTERVAL, metavar="S[,S...]",
                        help=f"seconds before each retry (default {DEFAULT_RETRY_INTERVAL}; 0: at once)")
    submit.add_argument("--json", action="store_true", help="print the job as one JSON object")
    _add_common_after(submit)

    worker = verbs.add_parser("worker", help="run batch jobs (RQ SimpleWorkers)",
                              description="Run batch jobs from the batch queue: each worker runs one job at a "
                                          "time in its process (an RQ SimpleWorker that heartbeats its job); "
                                          "--jobs N runs N such workers (an RQ WorkerPool) for N jobs at once. "
                                          "SIGTERM stops it after the current job; a second one at once (the "
                                          "job is then retried later).")
    worker.add_argument("--name", default=None, help="worker name (default: RQ's, unique; not with --jobs)")
    worker.add_argument("--jobs", type=int, default=1, metavar="N",
                        help="run up to N jobs at once, each in a worker process of its own (default 1)")
    worker.add_argument("--burst", action="store_true", help="quit when the queue is empty")
    worker.add_argument("--wait-broker", type=float, default=30.0, metavar="S",
                        help="without a URL, wait this long for the embedded broker to be announced (default 30)")
    _add_common_after(worker)

    status = verbs.add_parser("status", help="progress of batch jobs",
                              description="Progress of one batch job, or of the latest ones.")
    status.add_argument("job_id", nargs="?", default=None, metavar="JOB_ID", help="one job (default: the latest)")
    status.add_argument("--json", action="store_true", help="print JSON (with --watch: one object per line)")
    status.add_argument("--watch", nargs="?", type=float, const=DEFAULT_WATCH_S, default=None, metavar="SECONDS",
                        help=f"refresh every SECONDS (default {DEFAULT_WATCH_S:g}) until the job(s) ended")
    status.add_argument("--limit", type=int, default=20, help="jobs listed without JOB_ID (default 20)")
    _add_common_after(status)

    resume = verbs.add_parser("resume", help="run a failed or cancelled job again, from where it stopped",
                              description="Requeue a failed, stopped or cancelled batch job; it skips the lines "
                                          "its output already holds.")
    resume.add_argument("job_id", metavar="JOB_ID")
    _add_common_after(resume)


def run(args: argparse.Namespace) -> int:
    setup_logging(args)
    settings = settings_from_args(args)
    keys = Keys(settings.prefix)
    if args.verb == "worker":
        return _worker(args, settings, keys)
    conn = connect(rq_url(settings, resolve_url(settings)), settings)
    try:
        return {"submit": _submit, "status": _status, "resume": _resume}[args.verb](args, conn, keys)
    finally:
        conn.close()


def rq_url(settings: Any, pipeline_url: str) -> str:
    """The Redis of the RQ queue: ``batch_redis_url``, else the pipeline's, which RQ cannot use when it
    is a cluster (ConfigError)."""
    if settings.batch_redis_url:
        return str(settings.batch_redis_url)
    if parse_url(pipeline_url).kind == "cluster":
        raise ConfigError("batch jobs keep their RQ queue on one Redis server, and RQ does not run on a Redis "
                          "Cluster: set RYZ_BATCH_REDIS_URL to a single-server URL (the requests still go to "
                          "the cluster)")
    return pipeline_url


# --- submit -------------------------------------------------------------------------------------


def _intervals(text: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        values = []
    if not values or any(v < 0 for v in values):
        raise ConfigError(f"--retry-interval: expected seconds like 10,60,300, got {text!r}")
    return values


def _submit(args: argparse.Namespace, conn: Any, keys: Keys) -> int:
    from producer.batch.job import BatchSpec
    from producer.batch.queue import job_view, submit_job

    source, out = Path(args.input).resolve(), Path(args.out).resolve()
    if not source.is_file():
        raise ConfigError(f"{args.input}: no such file")
    if out == source:
        raise ConfigError("--out must not be the input file")
    if not out.parent.is_dir():
        raise ConfigError(f"--out: directory {out.parent} does not exist")
    if args.window < 1:
        raise ConfigError("--window must be at least 1")
    if args.chat_template and args.model_dir:
        raise ConfigError("give --chat-template or --model-dir, not both")
    template = args.chat_template or args.model_dir
    if template is not None:
        from producer.chat_template import TemplateSource

        TemplateSource(template)  # fails now, not in the worker, if it has no usable template
        template = str(Path(template).resolve())
    defaults = {"max_tokens": args.max_tokens, "temperature": args.temperature, "top_p": args.top_p,
                "top_k": args.top_k, "seed": args.seed, "stop": args.stop, "priority": args.priority,
                "timeout_s": args.timeout}
    spec = BatchSpec(input=str(source), output=str(out), prefix=keys.prefix, window=args.window,
                     defaults={k: v for k, v in defaults.items() if v is not None}, chat_template=template)
    job = submit_job(conn, keys, spec, retries=max(0, args.retries), retry_interval=_intervals(args.retry_interval))
    if args.json:
        print(json.dumps(job_view(job)), flush=True)
    else:
        print(job.id, flush=True)
        print(f"queued on {keys.batch_queue}; follow it with: ryzanstein batch status {job.id} --watch",
              file=sys.stderr, flush=True)
    return 0


# --- worker -------------------------------------------------------------------------------------


def _worker(args: argparse.Namespace, settings: Any, keys: Keys) -> int:
    from producer.batch.queue import BatchWorker, batch_queue

    url = rq_url(settings, resolve_url(settings, wait_s=args.wait_broker))
    conn = connect(url, settings)
    if args.jobs < 1:
        raise ConfigError(f"--jobs {args.jobs}: at least 1")
    if args.jobs > 1:
        from rq.worker_pool import WorkerPool

        # RQ's pool forks the workers, restarts any that die, and stops them all on SIGTERM/SIGINT;
        # each BatchWorker reads its heartbeat TTL from the environment (RYZ_BATCH_HEARTBEAT_TTL_S).
        pool = WorkerPool([batch_queue(conn, keys)], connection=conn, num_workers=args.jobs, worker_class=BatchWorker)
        print(f"batch workers: {args.jobs} on queue {keys.batch_queue} at {mask_url(url)}", flush=True)
        pool.start(burst=args.burst, logging_level=args.log_level)
        return 0
    worker = BatchWorker([batch_queue(conn, keys)], connection=conn, name=args.name,
                         heartbeat_ttl_s=settings.batch_heartbeat_ttl_s)
    print(f"batch worker {worker.name} on queue {keys.batch_queue} at {mask_url(url)}", flush=True)
    worker.work(burst=args.burst, with_scheduler=True, logging_level=args.log_level)
    return 0


# --- status -------------------------------------------------------------------------------------


def progress_meter(done: int, total: int | None, elapsed_s: float, *, width: int = BAR_WIDTH + 40) -> str:
    """tqdm's meter: ``45%|#####     | 45/100 [00:10<00:12, 4.50 lines/s]`` (rate, elapsed and time
    left; without a total yet, the count and the rate)."""
    from tqdm import tqdm

    # a total of 0 is no total to tqdm: no bar, no time left
    return tqdm.format_meter(done, total or 0, max(0.0, elapsed_s), ncols=width, ascii=True, unit=" lines")


def _utc(moment: str | datetime) -> datetime:
    """A naive UTC datetime (RQ writes naive or aware ones, depending on its version)."""
    value = datetime.fromisoformat(moment) if isinstance(moment, str) else moment
    return value.astimezone(timezone.utc).replace(tzinfo=None) if value.tzinfo is not None else value


def _elapsed_s(view: dict[str, Any], now: datetime) -> float:
    started = view.get("started_at")
    if not started:
        return 0.0
    end = _utc(view["ended_at"]) if view.get("ended_at") else _utc(now)
    return (end - _utc(started)).total_seconds()


def render_job(view: dict[str, Any], *, now: datetime | None = None) -> str:
    """One job as a line: id, status, progress meter (rate, elapsed, ETA), errors, output file."""
    now = now or datetime.now(timezone.utc).replace(tzinfo=None)  # RQ's times are naive UTC
    meter = progress_meter(view.get("done", 0), view.get("total"), _elapsed_s(view, now))
    line = f"{view['id']}  {view['status']:<9} {meter}, {view.get('errors', 0)} errors"
    if view.get("run", 0) > 1:
        line += f", run {view['run']}"
    line += f"  -> {view.get('output')}"
    if view.get("error"):
        line += f"\n    {view['error']}"
    return line


def _views(args: argparse.Namespace, conn: Any, keys: Keys) -> list[dict[str, Any]] | None:
    from rq.exceptions import NoSuchJobError
    from rq.job import Job

    from producer.batch.queue import batch_queue, job_view, list_jobs

    if args.job_id is None:
        return [job_view(job) for job in list_jobs(batch_queue(conn, keys), limit=args.limit)]
    try:
        return [job_view(Job.fetch(args.job_id, connection=conn))]
    except NoSuchJobError:
        return None


def no_worker_hint(views: list[dict[str, Any]], workers: int, queue: str) -> str | None:
    """A line for queued jobs that no batch worker will ever take."""
    if workers == 0 and any(v["status"] in ("queued", "scheduled", "deferred") for v in views):
        return f"hint: no batch worker is running on {queue}: start one with `ryzanstein batch worker`"
    return None


def _text(views: list[dict[str, Any]], hint: str | None) -> str:
    text = "\n".join(render_job(v) for v in views) if views else "no batch jobs"
    return text + (f"\n{hint}" if hint else "")


class _Screen:
    """Where --watch prints: on a terminal each refresh redraws the previous one in place; elsewhere
    (a log, a pipe) a refresh is printed only when it changed."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.terminal = out.isatty()
        self._last: str | None = None

    def show(self, text: str) -> None:
        if self.terminal:
            up = f"\x1b[{self._last.count(chr(10)) + 1}F\x1b[J" if self._last is not None else ""  # up, clear
            print(up + text, file=self.out, flush=True)
        elif text != self._last:
            print(text, file=self.out, flush=True)
        self._last = text


def _status(args: argparse.Namespace, conn: Any, keys: Keys) -> int:
    from rq import Worker

    from producer.batch.queue import batch_queue

    single = args.job_id is not None
    screen = _Screen(sys.stdout)
    while True:
        views = _views(args, conn, keys)
        if views is None:
            print(f"ryzanstein batch status: no job {args.job_id}", file=sys.stderr)
            return 1
        if args.json:
            print(json.dumps(views[0] if single else {"jobs": views}), flush=True)
        else:
            hint = no_worker_hint(views, Worker.count(queue=batch_queue(conn, keys)), keys.batch_queue)
            screen.show(_text(views, hint))
        if args.watch is None or all(v["status"] in ENDED for v in views):
            return 0
        try:
            time.sleep(max(0.1, args.watch))
        except KeyboardInterrupt:
            return 0


# --- resume -------------------------------------------------------------------------------------


def _resume(args: argparse.Namespace, conn: Any, keys: Keys) -> int:
    from rq.exceptions import InvalidJobOperation, NoSuchJobError
    from rq.job import Job
    from rq.registry import CanceledJobRegistry, FailedJobRegistry

    from producer.batch.queue import batch_queue

    try:
        job = Job.fetch(args.job_id, connection=conn)
    except NoSuchJobError:
        print(f"ryzanstein batch resume: no job {args.job_id}", file=sys.stderr)
        return 1
    queue = batch_queue(conn, keys)
    for registry in (FailedJobRegistry(queue=queue), CanceledJobRegistry(queue=queue)):
        try:
            registry.requeue(job)
        except InvalidJobOperation:
            continue
        print(f"requeued {job.id}; it skips the lines {job.meta.get('output')} already holds", flush=True)
        return 0
    status = job.get_status()
    print(f"ryzanstein batch resume: job {job.id} is {status.value if hasattr(status, 'value') else status}, "
          "not failed or cancelled; nothing to resume", file=sys.stderr)
    return 1
