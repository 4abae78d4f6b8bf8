"""The request fields of several models on one pipeline: ``model`` and ``stop_token_ids``, in flat
fields and in a msgpack payload, and how they travel when a request moves."""

from __future__ import annotations

import msgpack
import pytest

from broker.errors import InvalidRequest
from broker.protocol import MAX_STOP_TOKEN_IDS, GenerationRequest
from broker.validation import parse_request


def parse(**fields: object) -> GenerationRequest:
    flat = {k: (v if isinstance(v, bytes) else str(v)).encode() if not isinstance(v, bytes) else v
            for k, v in fields.items()}
    return parse_request(flat, entry_id="1-0", prefix="ryz", max_request_bytes=1 << 20)


def parse_payload(**fields: object) -> GenerationRequest:
    payload = msgpack.packb(fields, use_bin_type=True)
    return parse_request({b"payload": payload}, entry_id="1-0", prefix="ryz", max_request_bytes=1 << 20)


@pytest.mark.parametrize("name", ["smollm2", "HuggingFaceTB/SmolLM2-135M-Instruct", "random:tiny", "chat@v2",
                                  "a" * 256])
def test_served_model_names_are_accepted_flat_and_in_a_payload(name: str) -> None:
    assert parse(prompt="hi", model=name).model == name
    assert parse_payload(prompt="hi", model=name).model == name


@pytest.mark.parametrize("bad", ["", "two words", "tab\there", "a" * 257, "../../etc/passwd\n", "ünïcode"])
def test_malformed_model_names_are_invalid(bad: str) -> None:
    with pytest.raises(InvalidRequest, match="field 'model'"):
        parse(prompt="hi", model=bad)
    with pytest.raises(InvalidRequest, match="field 'model'"):
        parse_payload(prompt="hi", model=bad)


@pytest.mark.parametrize("bad", [3, 1.5, ["x"], {"a": 1}, True])
def test_a_model_that_is_not_text_is_invalid(bad: object) -> None:
    with pytest.raises(InvalidRequest, match="'model'"):
        parse_payload(prompt="hi", model=bad)


def test_without_model_the_request_names_none() -> None:
    assert parse(prompt="hi").model is None


def test_stop_token_ids_flat_and_in_a_payload() -> None:
    assert parse(prompt="hi", stop_token_ids="[2, 0, 7]").sampling.stop_token_ids == (2, 0, 7)
    assert parse_payload(prompt="hi", stop_token_ids=[5]).sampling.stop_token_ids == (5,)
    assert parse(prompt="hi", stop_token_ids="[]").sampling.stop_token_ids == ()
    assert parse(prompt="hi").sampling.stop_token_ids == ()


@pytest.mark.parametrize("bad", ["2", "[1.5]", "[-1]", '["eos"]', "[true]", "{}", "[1,",
                                 str(list(range(MAX_STOP_TOKEN_IDS + 1))), f"[{1 << 64}]"])
def test_malformed_stop_token_ids_are_invalid(bad: str) -> None:
    with pytest.raises(InvalidRequest, match="field 'stop_token_ids'"):
        parse(prompt="hi", stop_token_ids=bad)


def test_model_stop_token_ids_and_weights_survive_the_queue_and_a_move() -> None:
    request = parse(prompt="hi", model="chat", stop_token_ids="[9, 3]")
    request = request.model_copy(update={"weights": "abc123"})
    assert GenerationRequest.from_wire(request.to_wire()) == request
    moved = parse_request(request.to_ingress(from_owner="g1", epoch=2, signing_key=b"k"), entry_id="2-0",
                          prefix="ryz", max_request_bytes=1 << 20, signing_key=b"k")
    assert (moved.model, moved.sampling.stop_token_ids, moved.weights) == ("chat", (9, 3), "abc123")
    assert (moved.takeover_from, moved.takeover_epoch) == ("g1", 2)
