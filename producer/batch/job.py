"""The batch job itself: feed a file of requests through the pipeline, a bounded window at a time.

``run_batch`` is the function RQ runs. It keeps at most ``window`` requests in flight, appends each
result to the output file as it arrives, and saves its progress in the job's ``meta`` (``total``,
``done``, ``errors``) every ``batch_progress_interval_s``.

Resuming. The output file is the record of what is done: a run (a retry, or the job requeued)
skips every line it already holds. A request's id is fixed by (job, line) and every request of the
job replies to one stream, ``Keys.batch_replies(job)``, so a result that arrived while no one was
reading is found there, and a request still running from an earlier attempt is absorbed when sent
again (PROTOCOL.md: a duplicate id is a re-delivery) — its result comes to the same stream. The
stream is trimmed only behind results already synced to the output file. Should a request be
finished in Redis but its result be gone (the output file was deleted, say), it is sent anew under
a fresh id.

Errors that say "not now" rather than "not this request" (``unavailable``: no live group for a
while; ``overloaded``) do not end a line: it is sent again, under a fresh id, after a backoff.
"""

from __future__ import annotations

import heapq
import logging
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import redis

from balancer.models import resolve_model
from broker.connection import TRANSIENT_ERRORS, backoff_delays, connect, resolve_url
from broker.errors import InvalidRequest, RequestFailed, Unavailable
from broker.keys import Keys
from broker.registry import read_groups
from broker.settings import Settings, load_settings
from producer.batch.lines import (
    BadLine,
    LineRequest,
    OutputFile,
    count_lines,
    error_record,
    parse_line,
    read_lines,
    result_record,
    scan_output,
)
from producer.chat_template import ChatTemplate, TemplateSource, registry_template
from producer.client import READ_COUNT, STREAM_START, _stream_entries
from producer.request import Completion, Event, request_fields

log = logging.getLogger(__name__)

_RID_RE = re.compile(r"^batch\.(?P<job>[^.]+)\.(?P<line>\d+)(?:\.[0-9a-z]+)?$")
READ_BLOCK_MS = 1000
# Error codes after which a line is sent again instead of getting an error record.
TRANSIENT_CODES = frozenset({"unavailable", "overloaded"})
# Seconds before the 1st, 2nd... re-send of a line that met a transient error (the last one repeats).
BACKOFF_S = (1.0, 2.0, 5.0, 10.0, 30.0)


def request_id(job_id: str, line: int, *, attempt: int | str = 0) -> str:
    """The request id of one line of one job; ``attempt`` only when the line is sent again."""
    base = f"batch.{job_id}.{line}"
    return base if attempt == 0 else f"{base}.{attempt}"


def line_of(rid: str) -> int | None:
    match = _RID_RE.match(rid)
    return int(match.group("line")) if match else None


@dataclass
class BatchSpec:
    """Everything a batch job needs; stored with the RQ job (plain values only)."""

    input: str  # absolute paths, as the worker sees them
    output: str
    prefix: str
    window: int = 64
    defaults: dict[str, Any] = field(default_factory=dict)  # request options for lines that set none
    chat_template: str | None = None  # model directory, tokenizer_config.json or Jinja file

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Progress:
    """A job's progress, as kept in its ``meta``."""

    total: int = 0
    done: int = 0  # lines with a record in the output (results and errors)
    errors: int = 0  # of which error records
    run: int = 0  # how many times the job has started (1 + retries and requeues)
    resent: int = 0  # lines sent again after a transient error (this run)

    def to_meta(self) -> dict[str, Any]:
        return {**asdict(self), "updated_at": time.time()}


class BatchRun:
    """One run of a batch job, against one Redis connection."""

    def __init__(self, r: redis.Redis, spec: BatchSpec, *, job_id: str, settings: Settings,
                 save_progress: Callable[[Progress], None], run: int = 1,
                 clock: Callable[[], float] = time.monotonic, backoff_s: Sequence[float] = BACKOFF_S) -> None:
        self.redis = r
        self.spec = spec
        self.job_id = job_id
        self.keys = Keys(spec.prefix)
        self.settings = settings
        self.reply_to = self.keys.batch_replies(job_id)
        self.save_progress = save_progress
        self.clock = clock
        self.backoff_s = tuple(backoff_s)
        self.progress = Progress(run=run)
        self.resumed = run > 1
        self._pending: dict[int, tuple[str, LineRequest]] = {}  # line -> (request id, request) in flight
        self._early: dict[int, Event] = {}  # line -> final event read before its line was reached
        self._later: list[tuple[float, int, LineRequest]] = []  # heap: (when, line, request) to send again
        self._tries: dict[int, int] = {}  # line -> times sent again after a transient error
        self._last_id = STREAM_START
        self._template: ChatTemplate | None = None
        self._out: OutputFile | None = None
        self._done: set[int] = set()
        self._saved_at = 0.0

    # --- the run ------------------------------------------------------------------------------

    def run(self) -> Progress:
        out_path, in_path = Path(self.spec.output), Path(self.spec.input)
        state = scan_output(out_path)
        self._done = state.done
        self.progress.total = count_lines(in_path)
        self.progress.done, self.progress.errors = len(state.done), state.errors
        self._save(force=True)
        self._out = OutputFile(out_path, on_write=self._count)
        try:
            self._read_replies(block_ms=None)  # results that came while no one was reading
            to_send: list[LineRequest] = []
            for line, text in read_lines(in_path):
                if line in self._done:
                    continue
                parsed = self._parse(line, text)
                if parsed is None:
                    continue
                if isinstance(parsed, BadLine):
                    self._write(error_record(parsed.line, parsed.user_id, "invalid_request", parsed.message))
                    continue
                if line in self._early:
                    self._finish(parsed, self._early.pop(line))
                    continue
                to_send.append(parsed)
                if len(to_send) + len(self._pending) >= self.spec.window:
                    self._send(to_send)
                    to_send = []
                while len(self._pending) >= self.spec.window:
                    self._wait()
            self._send(to_send)
            while self._pending or self._later:
                self._wait()
        finally:
            self._save(force=True)
            self._out.close()
        self._retry(lambda: self.redis.delete(self.reply_to))
        return self.progress

    def _parse(self, line: int, text: str) -> LineRequest | BadLine | None:
        parsed = parse_line(line, text, defaults=self.spec.defaults,  # type: ignore[arg-type]
                            max_request_bytes=self.settings.max_request_bytes)
        if isinstance(parsed, LineRequest) and parsed.messages is not None:
            try:
                prompt = self._chat_template().render(parsed.messages)
            except (InvalidRequest, Unavailable) as exc:
                return BadLine(line, parsed.user_id, str(exc))
            parsed = LineRequest(line, parsed.user_id, prompt=prompt, options=parsed.options)
        return parsed

    def _chat_template(self) -> ChatTemplate:
        """The template for chat lines: the job's, else the one the groups of the served model (the
        only one, or the balancers' default) publish in the registry (broker.chat)."""
        if self._template is None:
            source = TemplateSource(self.spec.chat_template)
            if source.explicit is not None:
                self._template = source.explicit
            else:
                groups = self._retry(lambda: read_groups(self.redis, self.keys,
                                                         dead_after_s=self.settings.dead_after_s))
                model = resolve_model(None, groups, default=self.settings.default_model)
                if model is None:
                    raise Unavailable("no worker group is registered: no chat template for 'messages' lines")
                self._template = self._retry(lambda: registry_template(self.redis, self.keys, groups, model,
                                                                       source=source))
        return self._template

    # --- sending and receiving ----------------------------------------------------------------

    def _wait(self) -> None:
        """Read results for up to a second (less when a re-send is due), re-sending what is due."""
        self._send_due()
        block_ms = READ_BLOCK_MS
        if self._later:
            block_ms = max(1, min(block_ms, int((self._later[0][0] - self.clock()) * 1000)))
        self._read_replies(block_ms=block_ms)
        self._send_due()

    def _send_due(self) -> None:
        """Send again the lines whose backoff is over, as far as the window has room."""
        due: list[LineRequest] = []
        now = self.clock()
        while self._later and self._later[0][0] <= now and len(self._pending) + len(due) < self.spec.window:
            due.append(heapq.heappop(self._later)[2])
        if due:
            attempt = {req.line: f"{self.progress.run}t{self._tries[req.line]}" for req in due}
            self._send(due, ids={req.line: request_id(self.job_id, req.line, attempt=attempt[req.line])
                                 for req in due})
            self.progress.resent += len(due)

    def _send(self, batch: list[LineRequest], *, ids: dict[int, str] | None = None) -> None:
        """XADD the requests of ``batch`` in one pipeline (under ``ids``, or the lines' own)."""
        if not batch:
            return
        if ids is None:
            ids = {req.line: request_id(self.job_id, req.line) for req in batch}
            if self.resumed:
                ids = self._renew_lost(ids)
        pipe = self.redis.pipeline(transaction=False)
        for req in batch:
            fields = request_fields(req.prompt, request_id=ids[req.line], prompt_ids=req.prompt_ids,
                                    reply_to=self.reply_to, **req.options)
            pipe.xadd(self.keys.requests, fields)  # type: ignore[arg-type]
        self._retry(pipe.execute)
        for req in batch:
            self._pending[req.line] = (ids[req.line], req)

    def _renew_lost(self, ids: dict[int, str]) -> dict[int, str]:
        """Fresh ids for requests that finished in an earlier run but whose result is gone.

        Sending such an id again would be absorbed as a duplicate and get no event.
        """
        pipe = self.redis.pipeline(transaction=False)
        for rid in ids.values():
            pipe.hexists(self.keys.state(self.reply_to, rid), "final")
        finished = self._retry(pipe.execute)
        return {line: request_id(self.job_id, line, attempt=self.progress.run) if gone else rid
                for (line, rid), gone in zip(ids.items(), finished, strict=True)}

    def _read_replies(self, *, block_ms: int | None) -> None:
        """Take the final events off the reply stream; ``block_ms`` None: what is there, no waiting."""
        while True:
            reply = self._retry(lambda: self.redis.xread({self.reply_to: self._last_id}, count=READ_COUNT,
                                                         block=block_ms))
            entries = _stream_entries(reply)
            for entry_id, raw in entries:
                self._last_id = entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)
                event = Event.from_entry(entry_id, raw)
                if event is not None and event.final:
                    self._on_final(event)
            self._save()
            if block_ms is not None or len(entries) < READ_COUNT:
                return

    def _on_final(self, event: Event) -> None:
        line = line_of(event.id)
        if line is None or line in self._done:
            return  # not ours, or a line answered already (a duplicate from an earlier run)
        pending = self._pending.pop(line, None)
        if pending is None:
            self._early[line] = event  # its line is not reached yet: a result from an earlier run
            return
        self._finish(pending[1], event)

    def _finish(self, req: LineRequest, event: Event) -> None:
        if event.kind == "error":
            code, message = event.fields.get("code", "internal"), event.fields.get("message", "")
            if code in TRANSIENT_CODES:
                self._send_later(req, code)
                return
            self._write(error_record(req.line, req.user_id, code, message))
            return
        try:
            done = Completion.from_event(event)
        except RequestFailed as exc:  # a malformed done event
            self._write(error_record(req.line, req.user_id, "internal", str(exc)))
            return
        self._write(result_record(req.line, req.user_id, done))

    def _send_later(self, req: LineRequest, code: str) -> None:
        tries = self._tries.get(req.line, 0)
        delay = self.backoff_s[min(tries, len(self.backoff_s) - 1)]
        self._tries[req.line] = tries + 1
        log.info("batch job %s: line %d got %s; sending it again in %gs", self.job_id, req.line, code, delay)
        heapq.heappush(self._later, (self.clock() + delay, req.line, req))

    # --- output, progress, trimming -----------------------------------------------------------

    def _write(self, record: dict[str, Any]) -> None:
        assert self._out is not None
        self._out.write(record)

    def _count(self, record: dict[str, Any]) -> None:
        self._done.add(record["line"])
        self.progress.done += 1
        self.progress.errors += "error" in record

    def _save(self, *, force: bool = False) -> None:
        """Sync the output, then trim the replies behind it and save the progress (every interval)."""
        now = self.clock()
        if not force and now - self._saved_at < self.settings.batch_progress_interval_s:
            return
        self._saved_at = now
        if self._out is not None:
            self._out.sync()
            # Results read but not yet written (their lines come later, or are to be sent again)
            # must stay in the stream.
            if not self._early and not self._later and self._last_id != STREAM_START:
                self._retry(lambda: self.redis.xtrim(self.reply_to, minid=self._last_id, approximate=True))
        self._retry(lambda: self.save_progress(self.progress))

    def _retry(self, fn: Callable[[], Any]) -> Any:
        """``fn()``, retried through Redis blips (a batch job outlives them rather than fail)."""
        delays = None
        while True:
            try:
                return fn()
            except TRANSIENT_ERRORS as exc:
                delays = delays or backoff_delays(self.settings)
                delay = next(delays)
                log.warning("batch job %s: Redis error (%s); retrying in %.2fs", self.job_id, exc, delay)
                time.sleep(delay)


def run_batch(spec: dict[str, Any]) -> dict[str, Any]:
    """The RQ job function: run the batch described by ``spec`` (a ``BatchSpec`` as a dict).

    Returns the final progress, which RQ keeps as the job's result.
    """
    from rq import get_current_job

    job = get_current_job()
    if job is None:
        raise RuntimeError("run_batch runs inside an RQ worker (ryzanstein batch worker)")
    batch = BatchSpec(**spec)
    run = int(job.meta.get("run", 0)) + 1

    def save(progress: Progress) -> None:
        job.meta.update(progress.to_meta())
        job.save_meta()

    settings = load_settings(prefix=batch.prefix)
    # With a queue of its own (a cluster pipeline: batch_redis_url), the requests go to the pipeline's Redis.
    pipeline = connect(resolve_url(settings), settings) if settings.batch_redis_url else job.connection
    try:
        result = BatchRun(pipeline, batch, job_id=job.id, settings=settings, save_progress=save, run=run).run()
    finally:
        if pipeline is not job.connection:
            pipeline.close()
    log.info("batch job %s: %d/%d lines done, %d errors", job.id, result.done, result.total, result.errors)
    return asdict(result)
