"""``ryzanstein submit`` and ``python -m producer``, run in-process against the responder."""

from __future__ import annotations

import io
import json

import pytest

from broker.protocol import SamplingParams
from producer import __main__ as producer_main
from ryzanstein.cli import main
from tests.producer.conftest import Responder


@pytest.fixture
def submit(redis_url: str, prefix: str, capsys: pytest.CaptureFixture[str]):
    """Run ``ryzanstein submit ARGS`` against the test server; (exit code, stdout, stderr)."""

    def run(*args: str) -> tuple[int, str, str]:
        code = main(["submit", *args, "--redis-url", redis_url, "--prefix", prefix, "--log-level", "WARNING"])
        out, err = capsys.readouterr()
        return code, out, err

    return run


def test_prints_the_completion_text(submit, responder: Responder) -> None:
    assert submit("hello big world") == (0, "hello big world\n", "")


def test_options_reach_the_request(submit, responder: Responder) -> None:
    code, out, _ = submit(
        "one two three",
        "--max-tokens",
        "2",
        "--temperature",
        "0",
        "--top-p",
        "0.9",
        "--top-k",
        "5",
        "--seed",
        "7",
        "--stop",
        "X",
        "--stop",
        "Y",
        "--stop-token-id",
        "9",
        "--model",
        "echo",
        "--priority",
        "3",
        "--timeout",
        "30",
        "--id",
        "cli-1",
    )

    assert (code, out) == (0, "one two\n")
    [request] = responder.requests
    assert request.id == "cli-1"
    assert request.sampling == SamplingParams(max_tokens=2, temperature=0.0, top_p=0.9, top_k=5, seed=7,
                                              stop=("X", "Y"), stop_token_ids=(9,))
    assert (request.priority, request.timeout_s, request.stream, request.model) == (3, 30.0, False, "echo")


def test_sampling_controls_reach_the_request(submit, responder: Responder) -> None:
    code, _, _ = submit("one two three", "--max-tokens", "3", "--presence-penalty", "0.5", "--frequency-penalty",
                        "-1", "--repetition-penalty", "1.3", "--min-p", "0.1", "--min-tokens", "2", "--ignore-eos",
                        "--logit-bias", '{"7": -100, "9": 2.5}', "--bad-word", "foo", "--bad-word", "bar baz")
    assert code == 0
    [request] = responder.requests
    assert request.sampling == SamplingParams(max_tokens=3, presence_penalty=0.5, frequency_penalty=-1.0,
                                              repetition_penalty=1.3, min_p=0.1, min_tokens=2, ignore_eos=True,
                                              logit_bias=((7, -100.0), (9, 2.5)), bad_words=("foo", "bar baz"))
    assert submit("x", "--logit-bias", "[1]")[0] == 2


def test_json_prints_the_done_event(submit, responder: Responder) -> None:
    code, out, _ = submit("a b", "--json", "--id", "j-1")

    assert code == 0
    assert json.loads(out) == {
        "id": "j-1",
        "event": "done",
        "text": "a b",
        "token_ids": [1000, 1001],
        "finish_reason": "stop",
        "prompt_tokens": 2,
        "completion_tokens": 2,
    }


def test_stream_prints_deltas_then_a_newline(submit, responder: Responder) -> None:
    assert submit("streamed out", "--stream") == (0, "streamed out\n", "")
    assert responder.requests[0].stream is True


def test_stream_json_prints_every_event(submit, responder: Responder) -> None:
    code, out, _ = submit("x y", "--stream", "--json")

    events = [json.loads(line) for line in out.splitlines()]
    assert code == 0
    assert [(e["event"], e.get("index"), e["text"]) for e in events] == [
        ("token", 0, "x"),
        ("token", 1, " y"),
        ("done", None, "x y"),
    ]


def test_prompt_ids(submit, responder: Responder) -> None:
    assert submit("--prompt-ids", "[1, 2, 3]") == (0, "<1><2><3>\n", "")


def test_prompt_from_stdin(submit, responder: Responder, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO("piped in"))
    assert submit("-")[:2] == (0, "piped in\n")


@pytest.mark.parametrize(
    "args", [(), ("p", "--prompt-ids", "[1]"), ("--prompt-ids", "[1, 'a']"), ("--prompt-ids", "{}")]
)
def test_bad_prompt_arguments_exit_2(submit, args: tuple[str, ...]) -> None:
    code, out, err = submit(*args)
    assert (code, out) == (2, "")
    assert "ryzanstein submit:" in err


def test_error_event_prints_code_and_message_and_exits_1(submit, responder: Responder) -> None:
    code, out, err = submit("fail:overloaded")

    assert (code, out) == (1, "")
    assert err == "error overloaded: the responder was told to fail\n"


def test_error_event_with_json_also_prints_it_on_stdout(submit, responder: Responder) -> None:
    code, out, err = submit("fail:internal", "--json", "--id", "e-1")

    assert code == 1
    assert json.loads(out) == {
        "id": "e-1",
        "event": "error",
        "code": "internal",
        "message": "the responder was told to fail",
    }
    assert err.startswith("error internal: ")


def test_no_result_within_wait_exits_1(submit, responder: Responder) -> None:
    code, out, err = submit("hang", "--wait", "0.2", "--id", "slow-1")

    assert (code, out) == (1, "")
    assert "no result for request slow-1 within 0.2s" in err


def test_no_redis_exits_2(
    prefix: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("RYZ_REDIS_URL", raising=False)
    monkeypatch.setattr("broker.embedded.discover", lambda **_: None)

    assert main(["submit", "x", "--prefix", prefix]) == 2
    assert "no Redis to talk to" in capsys.readouterr().err


def test_python_dash_m_producer_is_submit(
    redis_url: str, prefix: str, responder: Responder, capsys: pytest.CaptureFixture[str]
) -> None:
    code = producer_main.main(["via module", "--redis-url", redis_url, "--prefix", prefix])

    assert (code, capsys.readouterr().out) == (0, "via module\n")
