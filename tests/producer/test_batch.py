"""Batch jobs: reading lines, the output file, a run against the protocol stub (resuming included), and
the job on RQ's queue with a BatchWorker. The real pipeline, with a worker killed mid-job, is in
tests/integration/test_batch.py."""

from __future__ import annotations

import argparse
import io
import json
from pathlib import Path
from typing import Any

import pytest
import redis
from rq.job import Job

from broker.events import done_event
from broker.keys import Keys
from broker.scripts import Scripts, pack_events
from broker.settings import Settings
from producer.batch import cli as batch_cli
from producer.batch.job import BatchRun, BatchSpec, Progress, line_of, request_id
from producer.batch.lines import BadLine, LineRequest, parse_line, scan_output
from producer.batch.queue import BatchWorker, batch_queue, job_view, submit_job
from tests.producer.conftest import Responder, register_group

# --- lines --------------------------------------------------------------------------------------


def test_good_lines() -> None:
    line = parse_line(3, json.dumps({"id": "q3", "prompt": "hi", "max_tokens": 5, "stop": ".", "note": "ignored"}),
                      defaults={"temperature": 0.0, "max_tokens": 9})
    assert line == LineRequest(3, "q3", prompt="hi", options={"max_tokens": 5, "temperature": 0.0, "stop": ["."]})
    ids = parse_line(4, '{"prompt_ids": [1, 2], "seed": 7}')
    assert isinstance(ids, LineRequest) and ids.prompt_ids == [1, 2] and ids.options == {"seed": 7}
    chat = parse_line(5, json.dumps({"messages": [{"role": "user", "content": "x"}], "max_completion_tokens": 4}))
    assert isinstance(chat, LineRequest) and chat.messages == [{"role": "user", "content": "x"}]
    assert chat.options == {"max_tokens": 4}
    openai_form = {"custom_id": "c6", "method": "POST", "url": "/v1/chat/completions",
                   "body": {"model": "m", "messages": [{"role": "user", "content": "y"}], "max_tokens": 3}}
    parsed = parse_line(6, json.dumps(openai_form))
    assert isinstance(parsed, LineRequest) and parsed.user_id == "c6" and parsed.options == {"max_tokens": 3}
    assert parse_line(7, "   \n") is None


def test_sampling_controls_are_passed_on() -> None:
    controls = {"presence_penalty": 0.5, "frequency_penalty": 1.0, "repetition_penalty": 1.2, "min_p": 0.1,
                "min_tokens": 1, "ignore_eos": True, "stop_token_ids": [7, 9], "logit_bias": {"5": -100},
                "bad_words": ["x"]}
    line = parse_line(2, json.dumps({"prompt": "hi", **controls}))
    assert isinstance(line, LineRequest) and line.options == controls


@pytest.mark.parametrize(("fields", "refused"), [
    ({"prompt": "hi", "logprobs": True}, "logprobs"),
    ({"prompt": "hi", "top_logprobs": 2}, "top_logprobs"),
    ({"prompt": "hi", "echo": True}, "echo"),
    ({"prompt": "hi", "add_special_tokens": False}, "add_special_tokens"),
    ({"messages": [{"role": "user", "content": "hi"}], "add_special_tokens": True}, "add_special_tokens"),
    ({"prompt": "hi", "use_beam_search": True}, "use_beam_search"),
])
def test_fields_a_result_record_cannot_honour_make_the_line_bad(fields: dict[str, object], refused: str) -> None:
    bad = parse_line(4, json.dumps({"custom_id": "r", "body": fields}))
    assert isinstance(bad, BadLine) and bad.user_id == "r" and f"field '{refused}'" in bad.message


@pytest.mark.parametrize("fields", [
    {"prompt": "hi", "logprobs": False, "top_logprobs": 0, "echo": False, "add_special_tokens": True},
    {"messages": [{"role": "user", "content": "hi"}], "add_special_tokens": False, "logprobs": None},
])
def test_fields_at_their_defaults_pass(fields: dict[str, object]) -> None:
    assert isinstance(parse_line(5, json.dumps(fields)), LineRequest)


@pytest.mark.parametrize("structured", [
    {"guided_json": {"type": "object"}}, {"guided_regex": "[0-9]+"}, {"guided_choice": ["a", "b"]},
    {"guided_grammar": 'root ::= "a"'}, {"response_format": {"type": "json_object"}},
    {"structured_outputs": {"regex": "a+"}},
])
def test_structured_output_is_passed_on(structured: dict[str, object]) -> None:
    line = parse_line(3, json.dumps({"custom_id": "s", "body": {"prompt": "hi", **structured}}))
    assert isinstance(line, LineRequest) and line.options == structured


@pytest.mark.parametrize(("text", "reason"), [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "not a JSON object"),
    ('{"id": "x"}', "exactly one of"),
    ('{"prompt": "a", "prompt_ids": [1]}', "exactly one of"),
    ('{"prompt": 5}', "field 'prompt'"),
    ('{"prompt": ""}', "field 'prompt'"),
    ('{"prompt": "a", "max_tokens": 1.5}', "field 'max_tokens'"),
    ('{"prompt": "a", "temperature": -1}', "field 'temperature'"),
    ('{"prompt": "a", "stop": [1]}', "field 'stop'"),
    ('{"prompt_ids": ["a"]}', "field 'prompt_ids'"),
    ('{"messages": [{"role": "robot", "content": "x"}]}', "field 'messages'"),
    ('{"prompt": "a", "repetition_penalty": 0}', "field 'repetition_penalty'"),
    ('{"prompt": "a", "logit_bias": {"1": 200}}', "field 'logit_bias'"),
    ('{"prompt": "a", "bad_words": "no"}', "field 'bad_words'"),
    ('{"prompt": "a", "n": 0}', "field 'n'"),
    ('{"prompt": "a", "n": 3, "best_of": 2}', "field 'best_of'"),
    ('{"custom_id": "c", "body": {"prompt": "a", "guided_whitespace_pattern": " "}}', "field 'guided_whitespace_pattern'"),
    ('{"prompt": "a", "guided_choice": []}', "field 'guided_choice'"),
    ('{"prompt": "a", "response_format": {"type": "xml"}}', "field 'response_format'"),
])
def test_bad_lines_say_why(text: str, reason: str) -> None:
    bad = parse_line(9, text)
    assert isinstance(bad, BadLine) and bad.line == 9
    assert reason in bad.message


def test_scan_output_cuts_a_torn_line_and_counts(tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    out.write_text('{"line":1,"text":"a"}\n{"line":2,"error":{"code":"x"}}\nnot ours\n{"line":1,"text":"again"}\n'
                   '{"line":3,"te')
    state = scan_output(out)
    assert (state.done, state.errors) == ({1, 2}, 1)
    assert out.read_text().endswith('"again"}\n')  # the torn record is gone, the rest kept
    assert scan_output(tmp_path / "missing.jsonl").done == set()


def test_request_ids_name_their_line() -> None:
    assert request_id("j1", 12) == "batch.j1.12"
    assert request_id("j1", 12, attempt=3) == "batch.j1.12.3"
    assert [line_of(request_id("a-b", 7)), line_of("batch.a-b.7.2"), line_of("other")] == [7, 7, None]


# --- a run against the stub ---------------------------------------------------------------------


def _write_input(path: Path, n: int, bad: dict[int, str] | None = None) -> None:
    rows = []
    for i in range(1, n + 1):
        rows.append((bad or {}).get(i) or json.dumps({"id": f"q{i}", "prompt": f"line {i}", "max_tokens": 8}))
    path.write_text("\n".join(rows) + "\n\n")


def _records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(raw) for raw in path.read_text().splitlines()]


def _run(r: redis.Redis, spec: BatchSpec, *, job_id: str = "j1", run: int = 1) -> tuple[Progress, list[Progress]]:
    saved: list[Progress] = []
    settings = Settings(prefix=spec.prefix, batch_progress_interval_s=0)
    progress = BatchRun(r, spec, job_id=job_id, settings=settings, run=run,
                        save_progress=lambda p: saved.append(Progress(**vars(p)))).run()
    return progress, saved


def test_run_answers_every_line_once(responder: Responder, r: redis.Redis, keys: Keys, tmp_path: Path) -> None:
    register_group(r, keys)  # an echo group: its published template renders chat lines
    source, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    _write_input(source, 40, bad={7: "{oops", 8: '{"prompt": "fail:internal"}',
                                  9: json.dumps({"messages": [{"role": "user", "content": "hey you"}]})})
    spec = BatchSpec(input=str(source), output=str(out), prefix=keys.prefix, window=3)
    progress, saved = _run(r, spec)
    records = {rec["line"]: rec for rec in _records(out)}
    assert sorted(records) == list(range(1, 41))
    assert len(_records(out)) == 40
    assert records[1] == {"line": 1, "id": "q1", "text": "line 1", "finish_reason": "stop",
                          "usage": {"prompt_tokens": 2, "completion_tokens": 2, "total_tokens": 4}}
    assert records[7]["error"]["code"] == "invalid_request" and "JSON" in records[7]["error"]["message"]
    assert records[8]["error"] == {"code": "internal", "message": "the responder was told to fail"}
    assert records[9]["text"] == "user: hey you\nassistant:"  # the stub echoes the rendered chat prompt
    assert (progress.total, progress.done, progress.errors) == (40, 40, 2)
    assert saved[0].done == 0 and saved[-1].done == 40  # progress went out as the job went
    assert not r.exists(keys.batch_replies("j1"))  # the reply stream is removed at the end
    assert len(responder.requests) == 39  # every line but the bad JSON one was sent, once
    assert all(req.reply_to == keys.batch_replies("j1") for req in responder.requests)


def test_window_bounds_requests_in_flight(responder: Responder, r: redis.Redis, keys: Keys,
                                          tmp_path: Path) -> None:
    source, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    _write_input(source, 20)
    in_flight: list[int] = []

    class Watched(BatchRun):
        def _send(self, batch: list[LineRequest]) -> None:
            super()._send(batch)
            in_flight.append(len(self._pending))

    spec = BatchSpec(input=str(source), output=str(out), prefix=keys.prefix, window=3)
    Watched(r, spec, job_id="w", settings=Settings(prefix=keys.prefix), save_progress=lambda p: None).run()
    assert max(in_flight) == 3
    assert len(_records(out)) == 20


class FlakyPipeline(Responder):
    """The stub, answering the first request of each ``flaky ...`` prompt with a transient error."""

    def __init__(self, url: str, keys: Keys, code: str) -> None:
        super().__init__(url, keys)
        self.code = code
        self.failed: set[bytes] = set()

    def _answer(self, entry_id: str, fields: dict[bytes, bytes]) -> None:
        prompt = fields.get(b"prompt", b"")
        if prompt.startswith(b"flaky") and prompt not in self.failed:
            self.failed.add(prompt)
            fields = {**fields, b"prompt": f"fail:{self.code}".encode()}
        super()._answer(entry_id, fields)


@pytest.mark.parametrize("code", ["unavailable", "overloaded"])
def test_transient_errors_send_the_line_again(r: redis.Redis, keys: Keys, redis_url: str, tmp_path: Path,
                                              code: str) -> None:
    source, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    source.write_text("".join(json.dumps({"prompt": f"{kind} {i}"}) + "\n"
                              for i, kind in enumerate(["flaky", "steady", "flaky", "steady"], 1)))
    pipeline = FlakyPipeline(redis_url, keys, code)
    pipeline.start()
    try:
        spec = BatchSpec(input=str(source), output=str(out), prefix=keys.prefix, window=2)
        progress = BatchRun(r, spec, job_id="t", settings=Settings(prefix=keys.prefix), save_progress=lambda p: None,
                            backoff_s=(0.05,)).run()
    finally:
        pipeline.stop()
    assert {rec["line"]: rec["text"] for rec in _records(out)} == {1: "flaky 1", 2: "steady 2", 3: "flaky 3",
                                                                    4: "steady 4"}
    assert (progress.done, progress.errors, progress.resent) == (4, 0, 2)
    assert sorted(req.id for req in pipeline.requests) == sorted(
        [request_id("t", i) for i in (1, 2, 3, 4)] + [request_id("t", 1, attempt="1t1"),
                                                      request_id("t", 3, attempt="1t1")])


def test_resumed_run_uses_results_left_in_redis_and_skips_done_lines(
    responder: Responder, r: redis.Redis, keys: Keys, tmp_path: Path
) -> None:
    source, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    _write_input(source, 10)
    reply = keys.batch_replies("j2")
    # An earlier run wrote lines 1-3 (and was killed mid-write of line 4)...
    out.write_text("".join(json.dumps({"line": i, "id": f"q{i}", "text": f"line {i}"}) + "\n" for i in (1, 2, 3))
                   + '{"line": 4, "te')
    # ...line 5 finished while no one was reading (its event waits on the reply stream)...
    scripts = Scripts(r)
    rid5 = request_id("j2", 5)
    done5 = done_event(rid5, text="from the earlier run", token_ids=[1], finish_reason="stop", prompt_tokens=1)
    scripts.publish(reply_stream=reply, progress=keys.progress(reply, rid5), publisher="g", epoch=1,
                    ttl_ms=60_000, events=pack_events([("f", 0, done5)]))
    # ...and line 6 finished too, but its event is gone (trimmed, or the stream deleted).
    rid6 = request_id("j2", 6)
    done6 = done_event(rid6, text="lost", token_ids=[1], finish_reason="stop", prompt_tokens=1)
    scripts.publish(reply_stream=f"{reply}-gone", progress=keys.progress(reply, rid6), publisher="g", epoch=1,
                    ttl_ms=60_000, events=pack_events([("f", 0, done6)]))
    spec = BatchSpec(input=str(source), output=str(out), prefix=keys.prefix, window=4)
    progress, _ = _run(r, spec, job_id="j2", run=2)
    records = _records(out)
    assert sorted(rec["line"] for rec in records) == list(range(1, 11))  # each line once, torn line 4 redone
    by_line = {rec["line"]: rec for rec in records}
    assert by_line[5]["text"] == "from the earlier run"
    assert by_line[6]["text"] == "line 6" and by_line[4]["text"] == "line 4"
    sent = {req.id for req in responder.requests}
    assert sent == {request_id("j2", i) for i in (4, 7, 8, 9, 10)} | {request_id("j2", 6, attempt=2)}
    assert (progress.done, progress.total, progress.run) == (10, 10, 2)


# --- on RQ --------------------------------------------------------------------------------------


def test_job_on_rq_runs_in_a_batch_worker_and_reports_progress(
    responder: Responder, r: redis.Redis, keys: Keys, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    _write_input(source, 25, bad={5: "[]"})
    spec = BatchSpec(input=str(source), output=str(out), prefix=keys.prefix, window=4)
    job = submit_job(r, keys, spec, retries=2, retry_interval=[0])
    queued = job_view(job)
    assert (queued["status"], queued["done"], queued["total"]) == ("queued", 0, None)
    worker = BatchWorker([batch_queue(r, keys)], connection=r, heartbeat_ttl_s=5)
    assert worker.work(burst=True)
    job = Job.fetch(job.id, connection=r)
    view = job_view(job)
    assert (view["status"], view["done"], view["total"], view["errors"], view["run"]) == ("finished", 25, 25, 1, 1)
    assert view["retries_left"] == 2
    assert job.return_value() == {"total": 25, "done": 25, "errors": 1, "run": 1, "resent": 0}
    assert sorted(rec["line"] for rec in _records(out)) == list(range(1, 26))

    capsys.readouterr()
    args = argparse.Namespace(job_id=None, json=False, watch=None, limit=20)
    assert batch_cli._status(args, r, keys) == 0
    printed = capsys.readouterr().out
    assert printed.startswith(f"{job.id}  finished  100%|") and "| 25/25 [" in printed and ", 1 errors" in printed
    assert "hint:" not in printed  # nothing queued
    args.job_id, args.json = job.id, True
    assert batch_cli._status(args, r, keys) == 0
    assert json.loads(capsys.readouterr().out) == job_view(job)


def test_progress_shows_rate_elapsed_and_time_left() -> None:
    from datetime import datetime

    view = {"id": "j1", "status": "started", "done": 450, "total": 1000, "errors": 2, "output": "out.jsonl",
            "started_at": "2026-11-30T10:00:00", "ended_at": None}
    line = batch_cli.render_job(view, now=datetime(2026, 11, 30, 10, 1, 30))
    # 450 lines in 90 s: 5 lines/s, 550 left: 01:50
    assert line == ("j1  started    45%|" + line.split("|")[1] + "| 450/1000 [01:30<01:50,  5.00 lines/s], 2 errors"
                    "  -> out.jsonl")
    queued = batch_cli.render_job({**view, "status": "queued", "done": 0, "total": None, "started_at": None})
    assert queued.startswith("j1  queued    0 lines [00:00, ? lines/s]")
    ended = batch_cli.render_job({**view, "status": "finished", "done": 1000, "ended_at": "2026-11-30T10:03:20"},
                                 now=datetime(2026, 11, 30, 12, 0))
    assert "1000/1000 [03:20<00:00," in ended  # elapsed stops at the end
    aware = {**view, "started_at": "2026-11-30T10:00:00+00:00"}  # RQ 3 writes aware times
    assert "[01:30<01:50," in batch_cli.render_job(aware, now=datetime(2026, 11, 30, 10, 1, 30))


def test_a_queued_job_without_a_batch_worker_gets_a_hint() -> None:
    views = [{"id": "j1", "status": "queued"}]
    assert batch_cli.no_worker_hint(views, 0, "ryz:batch") == (
        "hint: no batch worker is running on ryz:batch: start one with `ryzanstein batch worker`")
    assert batch_cli.no_worker_hint(views, 1, "ryz:batch") is None
    assert batch_cli.no_worker_hint([{"id": "j1", "status": "finished"}], 0, "ryz:batch") is None


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_watch_redraws_in_place_on_a_terminal_and_prints_changes_elsewhere() -> None:
    terminal = _Terminal()
    screen = batch_cli._Screen(terminal)
    screen.show("a 10%\nb 20%")
    screen.show("a 50%\nb 60%")
    assert terminal.getvalue() == "a 10%\nb 20%\n\x1b[2F\x1b[Ja 50%\nb 60%\n"  # up two lines, clear, redraw
    log = io.StringIO()
    screen = batch_cli._Screen(log)
    for text in ("a 10%", "a 10%", "a 50%"):
        screen.show(text)
    assert log.getvalue() == "a 10%\na 50%\n"


def test_a_worker_with_jobs_2_runs_two_jobs_at_once(responder: Responder, r: redis.Redis, keys: Keys,
                                                    tmp_path: Path, subprocess_env: dict[str, str]) -> None:
    import subprocess
    import sys

    from tests.integration.conftest import wait_for

    (tmp_path / "hang.jsonl").write_text(json.dumps({"id": "h", "prompt": "hang"}) + "\n")
    _write_input(tmp_path / "quick.jsonl", 3)
    hanging = submit_job(r, keys, BatchSpec(input=str(tmp_path / "hang.jsonl"), output=str(tmp_path / "h.out"),
                                            prefix=keys.prefix), retries=0, retry_interval=[0])
    quick = submit_job(r, keys, BatchSpec(input=str(tmp_path / "quick.jsonl"), output=str(tmp_path / "q.out"),
                                          prefix=keys.prefix), retries=0, retry_interval=[0])
    pool = subprocess.Popen([sys.executable, "-m", "ryzanstein", "batch", "worker", "--jobs", "2", "--burst"],
                            env=subprocess_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        # the quick job, queued behind one that never ends by itself, finishes: it ran beside it
        wait_for(lambda: job_view(Job.fetch(quick.id, connection=r))["status"] == "finished", timeout=60,
                 what="the second job to finish while the first runs")
        assert job_view(Job.fetch(hanging.id, connection=r))["status"] == "started"
        r.xadd(keys.cancel, {"id": request_id(hanging.id, 1)})  # let the first one end
        assert pool.wait(60) == 0
    finally:
        if pool.poll() is None:
            pool.kill()
            pool.wait()
    assert job_view(Job.fetch(hanging.id, connection=r))["status"] == "finished"
