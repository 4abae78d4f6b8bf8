"""Whose cancel applies: a request sent with a token only by an entry carrying it (broker.cancellation)."""

from __future__ import annotations

from broker.cancellation import HORIZON_MS, MAX_TOKENS_PER_ID, Cancellations, applies


def test_a_request_without_a_token_is_cancelled_by_any_cancel_of_its_id() -> None:
    seen = Cancellations()
    seen.add({b"id": b"r1"}, 0)
    seen.add({b"id": b"r2", b"token": b"whatever"}, 0)
    assert seen.matches("r1", None) and seen.matches("r2", None)
    assert not seen.matches("r3", None)


def test_a_request_with_a_token_is_cancelled_only_by_its_token() -> None:
    seen = Cancellations()
    seen.add({b"id": b"r1"}, 0)  # someone who knows the id only
    seen.add({b"id": b"r1", b"token": b"guess"}, 0)
    assert not seen.matches("r1", "s3cret")
    seen.add({b"id": b"r1", b"token": b"s3cret"}, 0)
    assert seen.matches("r1", "s3cret")
    assert applies(None, None) and applies(None, "x") and applies("x", "x")
    assert not applies("x", None) and not applies("x", "y")


def test_a_flood_of_wrong_tokens_is_bounded_and_old_cancels_are_forgotten() -> None:
    seen = Cancellations()
    for n in range(10 * MAX_TOKENS_PER_ID):
        seen.add({b"id": b"r1", b"token": str(n).encode()}, 0)
    assert not seen.matches("r1", str(10 * MAX_TOKENS_PER_ID - 1))
    assert seen.matches("r1", "0")
    seen.add({b"id": b"late"}, HORIZON_MS + 1)
    seen.prune(HORIZON_MS + 1)
    assert "r1" not in seen and "late" in seen
    assert seen.add({b"token": b"x"}, 0) is None  # names no request


def test_a_cancel_naming_a_later_entry_id_is_not_remembered() -> None:
    """A request sent without 'id' gets its entry id as id: a cancel naming an entry id later than
    its own would otherwise wait (10 minutes) for that request and cancel it as it arrives."""
    seen = Cancellations()
    assert seen.add({b"id": b"9000000000000-0"}, 0.0, entry_id=b"8000000000000-0") is None
    assert "9000000000000-0" not in seen
    assert seen.add({b"id": b"7000000000000-0"}, 0.0, entry_id=b"8000000000000-0") == ("7000000000000-0", None)
    assert seen.matches("7000000000000-0", None)
    assert seen.add({b"id": b"my-request"}, 0.0, entry_id=b"8000000000000-0") == ("my-request", None)
