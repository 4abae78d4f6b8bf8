"""Which served model a request goes to (balancer.models): a pure function of its ``model`` and the
registry."""

from __future__ import annotations

import pytest

from balancer.models import resolve_model
from broker.errors import InvalidRequest, ModelNotFound
from broker.registry import GroupStatus


def group(name: str, *served: str, alive: bool = True) -> GroupStatus:
    status = GroupStatus(name=name, tp=1, model="/srv/models/x", kv_dtype="none", kv_capacity_tokens=0,
                         kv_used_tokens=0, running=0, waiting=0, queue_depth=0, leader_pid=1, host="h",
                         max_context=64, vocab_size=256, served_models=list(served))
    status.alive = alive
    return status


CHAT, TINY = group("g1", "chat", "chat-latest"), group("g2", "tiny")


def test_a_named_model_goes_to_that_name_or_an_alias() -> None:
    for name in ("chat", "chat-latest", "tiny"):
        assert resolve_model(name, [CHAT, TINY], default=None) == name


def test_an_unknown_name_is_model_not_found_naming_what_is_served() -> None:
    for groups in ([CHAT, TINY], [CHAT]):
        with pytest.raises(ModelNotFound, match=r"'smollm2' is not served.*chat, chat-latest") as err:
            resolve_model("smollm2", groups, default="chat")
        assert err.value.code == "model_not_found"


def test_without_a_name_the_only_model_is_served_under_its_first_name() -> None:
    assert resolve_model(None, [CHAT], default=None) == "chat"
    assert resolve_model(None, [CHAT, group("g3", "chat", "chat-latest")], default=None) == "chat"
    assert resolve_model(None, [CHAT, group("g3", "chat")], default=None) == "chat"  # one model, fewer aliases
    assert resolve_model(None, [TINY, group("g4", "tiny")], default="chat") == "tiny"


def test_without_a_name_and_several_models_the_default_or_a_clear_error() -> None:
    assert resolve_model(None, [CHAT, TINY], default="tiny") == "tiny"
    assert resolve_model(None, [CHAT, TINY], default="chat-latest") == "chat-latest"
    with pytest.raises(InvalidRequest, match=r"'model': required.*chat, chat-latest, tiny") as err:
        resolve_model(None, [CHAT, TINY], default=None)
    assert err.value.code == "invalid_request"
    with pytest.raises(ModelNotFound, match="default model 'gone'"):
        resolve_model(None, [CHAT, TINY], default="gone")


def test_a_model_whose_groups_are_dead_is_still_known_but_not_the_only_one() -> None:
    dead_chat = group("g1", "chat", alive=False)
    assert resolve_model("chat", [dead_chat, TINY], default=None) == "chat"  # it waits for its own groups
    assert resolve_model(None, [dead_chat, TINY], default=None) == "tiny"  # tiny is the one served now
    assert resolve_model(None, [dead_chat], default=None) == "chat"


def test_no_group_registered_yet_means_wait() -> None:
    assert resolve_model("chat", [], default=None) is None
    assert resolve_model(None, [], default="chat") is None
