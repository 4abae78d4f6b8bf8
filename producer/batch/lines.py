"""The files of a batch job: input lines -> requests (or the reason they are bad), results -> output lines.

Input: JSON Lines, one request per line, e.g.::

    {"id": "q1", "prompt": "Translate 'cheese' to French:", "max_tokens": 16}
    {"prompt_ids": [104, 105], "temperature": 0}
    {"messages": [{"role": "user", "content": "Hi!"}], "seed": 7}
    {"custom_id": "q4", "body": {"model": "m", "messages": [{"role": "user", "content": "Hi"}]}}

Exactly one of ``prompt``, ``prompt_ids`` and ``messages`` (chat: rendered with the chat template);
optional request fields as in the protocol (``max_tokens`` — ``max_completion_tokens`` is the same
—, ``temperature``, ``top_p``, ``top_k``, ``seed``, ``stop``, ``stop_token_ids``, ``priority``,
``timeout_s``, the sampling controls ``presence_penalty`` ... ``bad_words``, ``n``/``best_of``,
``prompt_logprobs``, and
structured output: ``guided_json``, ``guided_regex``, ``guided_choice``, ``guided_grammar``,
``response_format``, ``structured_outputs``); optional ``id``, echoed in the result. A line in
OpenAI's batch format (``custom_id`` + ``body``) is read as its body with ``custom_id`` as the id.
Fields the protocol refuses by name (``use_beam_search``, ``allowed_token_ids``...:
``broker.refused.UNHONOURED_FIELDS``) make the line bad, and so do ``logprobs``, ``top_logprobs`` and
``echo`` (a result record carries none of them) and ``add_special_tokens`` set against vLLM's default
(true for a prompt, false for a chat); other fields are ignored; blank lines are skipped.

Output: one JSON object per input line, in the order the results come in::

    {"line": 1, "id": "q1", "text": "...", "finish_reason": "stop", "usage": {"prompt_tokens": 9, ...}}
    {"line": 5, "id": null, "error": {"code": "invalid_request", "message": "line is not valid JSON: ..."}}

``line`` is the 1-based line number in the input file; it is what a resumed job goes by.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

from broker.errors import InvalidRequest
from broker.refused import UNHONOURED_FIELDS, unhonoured_field
from broker.validation import parse_request
from producer.chat_template import normalize_messages
from producer.request import Completion, GenerationOptions

# Request fields a line may set, besides its prompt.
OptionField = Literal["max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "priority", "timeout_s",
                      # sampling controls (PROTOCOL.md)
                      "presence_penalty", "frequency_penalty", "repetition_penalty", "min_p", "min_tokens",
                      "ignore_eos", "stop_token_ids", "logit_bias", "bad_words",
                      # several completions (the record's "choices") and prompt logprobs (its "prompt_logprobs")
                      "n", "best_of", "prompt_logprobs",
                      # structured output (PROTOCOL.md)
                      "guided_json", "guided_regex", "guided_choice", "guided_grammar", "response_format",
                      "structured_outputs"]
OPTION_FIELDS: tuple[OptionField, ...] = get_args(OptionField)
PROMPT_FIELDS = ("prompt", "prompt_ids", "messages")
_CHECK_ID = "batch-line"  # a valid request id, only for validating a line's fields

# Fields a line is refused for when set to a value that would change its output: the protocol's, and
# the ones a result record cannot carry or a batch cannot honour. ``add_special_tokens`` follows vLLM's
# defaults, as the gateway: a prompt gets the tokenizer's special tokens (true), a chat only what its
# template writes (false).
_OFF, _ON = frozenset({"0", "false"}), frozenset({"1", "true"})
_BATCH_UNHONOURED: dict[str, frozenset[str] | None] = {
    **UNHONOURED_FIELDS, "logprobs": _OFF, "top_logprobs": frozenset({"0"}), "echo": _OFF,
}
_PROMPT_UNHONOURED = {**_BATCH_UNHONOURED, "add_special_tokens": _ON}
_CHAT_UNHONOURED = {**_BATCH_UNHONOURED, "add_special_tokens": _OFF}


@dataclass(frozen=True)
class LineRequest:
    """A good input line: what to send for it."""

    line: int
    user_id: Any  # the line's own "id", echoed in its result
    prompt: str | None = None
    prompt_ids: list[int] | None = None
    messages: list[dict[str, Any]] | None = None  # chat: rendered into ``prompt`` before sending
    options: GenerationOptions = field(default_factory=lambda: GenerationOptions())


@dataclass(frozen=True)
class BadLine:
    """An input line that cannot become a request: it gets an error record."""

    line: int
    user_id: Any
    message: str


def _scalar_id(value: Any) -> Any:
    return value if isinstance(value, (str, int, float)) and not isinstance(value, bool) else None


def parse_line(line: int, text: str, *, defaults: GenerationOptions | None = None,
               max_request_bytes: int = 1 << 20) -> LineRequest | BadLine | None:
    """One input line; None for a blank one. Validated as a balancer would validate it."""
    if not text.strip():
        return None
    try:
        obj = json.loads(text)
    except ValueError as exc:
        return BadLine(line, None, f"line is not valid JSON: {exc}")
    if not isinstance(obj, dict):
        return BadLine(line, None, f"line is not a JSON object but {type(obj).__name__}")
    user_id = _scalar_id(obj.get("id"))
    if isinstance(obj.get("body"), dict) and "custom_id" in obj:
        user_id, obj = _scalar_id(obj["custom_id"]), obj["body"]
    given = [name for name in PROMPT_FIELDS if obj.get(name) is not None]
    refused_table = _CHAT_UNHONOURED if given == ["messages"] else _PROMPT_UNHONOURED
    if (refused := unhonoured_field(obj, refused_table)) is not None:
        return BadLine(line, user_id, f"field '{refused}': not supported by this server (leave it unset)")
    if len(given) != 1:
        return BadLine(line, user_id, "exactly one of 'prompt', 'prompt_ids' and 'messages' must be given")

    fields: dict[str, Any] = {k: v for k, v in (defaults or {}).items() if v is not None}
    if obj.get("max_completion_tokens") is not None:
        fields["max_tokens"] = obj["max_completion_tokens"]
    fields.update({name: obj[name] for name in OPTION_FIELDS if obj.get(name) is not None})
    if isinstance(fields.get("stop"), str):
        fields["stop"] = [fields["stop"]]
    messages = None
    check: dict[str, Any] = dict(fields)
    if given[0] == "messages":
        try:
            messages = normalize_messages(obj["messages"])
        except InvalidRequest as exc:
            return BadLine(line, user_id, str(exc))
        check["prompt"] = "(chat)"  # the rendered prompt is checked by the balancer
    else:
        check[given[0]] = obj[given[0]]
    try:
        parse_request({"id": _CHECK_ID, **check}, entry_id="0-0", prefix="batch",
                      max_request_bytes=max_request_bytes)
    except InvalidRequest as exc:
        return BadLine(line, user_id, str(exc))
    options = GenerationOptions()
    for name in OPTION_FIELDS:
        if name in fields:
            options[name] = fields[name]
    return LineRequest(line, user_id, prompt=obj.get("prompt") if given[0] == "prompt" else None,
                       prompt_ids=list(obj["prompt_ids"]) if given[0] == "prompt_ids" else None,
                       messages=messages, options=options)


def result_record(line: int, user_id: Any, done: Completion) -> dict[str, Any]:
    """A result line; with ``n`` > 1 also ``choices`` (``{"index", "text", "finish_reason"}`` each,
    the first repeated at the top), with ``prompt_logprobs`` the done event's entries."""
    record = {"line": line, "id": user_id, "text": done.text, "finish_reason": done.finish_reason,
              "usage": {"prompt_tokens": done.prompt_tokens, "completion_tokens": done.completion_tokens,
                        "total_tokens": done.prompt_tokens + done.completion_tokens}}
    if done.choices is not None:
        record["choices"] = [{"index": c.index, "text": c.text, "finish_reason": c.finish_reason}
                             for c in done.choices]
    if done.prompt_logprobs is not None:
        record["prompt_logprobs"] = done.prompt_logprobs
    return record


def error_record(line: int, user_id: Any, code: str, message: str) -> dict[str, Any]:
    return {"line": line, "id": user_id, "error": {"code": code, "message": message}}


def dump_record(record: dict[str, Any]) -> str:
    return json.dumps(record, ensure_ascii=False, separators=(",", ":")) + "\n"


@dataclass
class OutputState:
    """What an output file already holds: the lines answered, and how many of them are errors."""

    done: set[int] = field(default_factory=set)
    errors: int = 0


def scan_output(path: Path) -> OutputState:
    """Read an existing output file, cutting off a torn last line (a write the job did not finish).

    Lines that are not records of ours are left alone and not counted.
    """
    state = OutputState()
    if not path.exists():
        return state
    with open(path, "rb+") as f:
        data = f.read()
        end = data.rfind(b"\n") + 1
        if end < len(data):
            f.truncate(end)
    for raw in data[:end].splitlines():
        try:
            record = json.loads(raw)
        except ValueError:
            continue
        if isinstance(record, dict) and isinstance(record.get("line"), int) and record["line"] not in state.done:
            state.done.add(record["line"])
            state.errors += "error" in record
    return state


def count_lines(path: Path) -> int:
    """Non-blank lines of the input: the job's total."""
    with open(path, "rb") as f:
        return sum(1 for raw in f if raw.strip())


def read_lines(path: Path) -> Iterator[tuple[int, str]]:
    """(1-based line number, text) of every line, undecodable bytes replaced (the line then fails as JSON)."""
    with open(path, encoding="utf-8", errors="replace", newline="\n") as f:
        yield from enumerate(f, start=1)


class OutputFile:
    """The output, opened for appending; ``sync`` makes what was written durable."""

    def __init__(self, path: Path, *, on_write: Callable[[dict[str, Any]], None] | None = None) -> None:
        self._file = open(path, "a", encoding="utf-8")  # noqa: SIM115 - closed by close()
        self._on_write = on_write

    def write(self, record: dict[str, Any]) -> None:
        self._file.write(dump_record(record))
        if self._on_write is not None:
            self._on_write(record)

    def sync(self) -> None:
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        if not self._file.closed:
            self.sync()
            self._file.close()
