"""Whose cancel applies: a request sent with a token only by an entry carrying it (broker.cancellation)."""

from __future__ import annotations

from broker.cancellation import HORIZON_MS, Cancellations, applies


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


def test_wrong_tokens_do_not_push_out_the_owners_and_memory_stays_bounded() -> None:
    """A stranger's wrong tokens for an id are remembered beside the owner's, whichever came first
    (the first-come cap this replaces made a request uncancellable after 32 wrong ones); the total
    is bounded, the oldest pair forgotten first."""
    seen = Cancellations(max_remembered=100)
    for n in range(40):
        seen.add({b"id": b"r1", b"token": f"wrong{n}".encode()}, 0)
    seen.add({b"id": b"r1", b"token": b"RIGHT"}, 0)
    assert seen.matches("r1", "RIGHT") and seen.matches("r1", "wrong39")
    for n in range(100):  # a flood of other ids: the oldest pairs go first, the total stays 100
        seen.add({b"id": f"x{n}".encode()}, 1)
    assert len(seen) == 100 and "r1" not in seen and not seen.matches("r1", "RIGHT")
    seen.add({b"id": b"x5"}, 2)  # seen again: now the newest
    seen.add({b"id": b"y"}, 2)
    assert "x5" in seen and "x0" not in seen


def test_old_cancels_are_forgotten_and_no_request_cancels_are_not_kept() -> None:
    seen = Cancellations()
    seen.add({b"id": b"r1", b"token": b"0"}, 0)
    seen.add({b"id": b"late"}, HORIZON_MS + 1)
    seen.prune(HORIZON_MS + 1)
    assert "r1" not in seen and "late" in seen and len(seen) == 1
    assert seen.add({b"token": b"x"}, 0) is None  # names no request
    assert seen.add({b"id": b"x" * 129}, 0) is None  # no request has such an id (1-128 of ID_RE)
    assert seen.add({b"id": b"a b"}, 0) is None
    assert seen.add({b"id": b"r2", b"token": b"t" * 257}, 0) is None  # no request has such a token
    assert len(seen) == 1


def test_a_cancel_naming_a_later_entry_id_is_not_remembered() -> None:
    """A request sent without 'id' gets its entry id as id: a cancel naming an entry id later than
    its own would otherwise wait (10 minutes) for that request and cancel it as it arrives."""
    seen = Cancellations()
    assert seen.add({b"id": b"9000000000000-0"}, 0.0, entry_id=b"8000000000000-0") is None
    assert "9000000000000-0" not in seen
    assert seen.add({b"id": b"7000000000000-0"}, 0.0, entry_id=b"8000000000000-0") == ("7000000000000-0", None, None)
    assert seen.matches("7000000000000-0", None)
    assert seen.add({b"id": b"my-request"}, 0.0, entry_id=b"8000000000000-0") == ("my-request", None, None)


def test_a_tenant_flooding_its_cancel_stream_pushes_out_its_own_cancels_only() -> None:
    """At the bound, the oldest cancel of the tenant with the most goes: bob's and the shared
    stream's early cancels (sent before their requests) outlive alice's flood; the total stays bounded."""
    seen = Cancellations(max_remembered=100)
    seen.add({b"id": b"b1", b"token": b"bob's"}, 0, tenant="bob")
    seen.add({b"id": b"s1"}, 0)
    seen.add({b"id": b"a0"}, 0, tenant="alice")
    for n in range(1, 1000):
        seen.add({b"id": f"a{n}".encode()}, 1, tenant="alice")
    assert len(seen) == 100
    assert seen.matches("b1", "bob's", tenant="bob") and seen.matches("s1", None) and "s1" in seen
    assert seen.matches("a999", None, tenant="alice") and not seen.matches("a0", None, tenant="alice")
    seen.prune(HORIZON_MS + 2)  # past the horizon of all: every tenant's go
    assert len(seen) == 0 and not seen.matches("b1", "bob's", tenant="bob")
