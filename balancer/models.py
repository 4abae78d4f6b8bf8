"""Which served model a request goes to: a pure function of the request's ``model`` and the registry.

Each group publishes the names it serves (``--served-model-name``; the first is its canonical name,
the others aliases). A request naming a model goes only to groups serving that name; one naming no
model goes to the only model served, else to the configured default (``default_model``), else it is
invalid. A name no registered group serves ends the request at once with ``model_not_found``; a
model whose groups are all dead (but still registered) is known, so its requests wait for a group
of that model, and never go to another model's.
"""

from __future__ import annotations

from collections.abc import Sequence

from broker.errors import InvalidRequest, ModelNotFound
from broker.registry import GroupStatus, served_names


def resolve_model(requested: str | None, groups: Sequence[GroupStatus], *, default: str | None) -> str | None:
    """The served model name a request goes to; None while no group is registered (it waits).

    ``groups``: every registered group, alive or not. Raises ``ModelNotFound`` for a name (asked
    for, or the default) that no registered group serves, and ``InvalidRequest`` for a request
    without ``model`` when several models are served and no default is set.
    """
    if not groups:
        return None
    if requested is not None:
        if any(g.serves(requested) for g in groups):
            return requested
        raise ModelNotFound(f"model {requested!r} is not served here; served models: "
                            f"{', '.join(served_names(list(groups)))}")
    # Without a name: the models live now (a dead group's model is not "served" to a request that
    # names none), or all registered ones while none is alive; a model is known by its canonical name.
    alive = [g for g in groups if g.alive] or list(groups)
    models = {g.served_models[0] for g in alive if g.served_models}
    if len(models) == 1:
        return models.pop()
    if default is not None:
        if any(g.serves(default) for g in groups):
            return default
        raise ModelNotFound(f"the default model {default!r} is not served here; served models: "
                            f"{', '.join(served_names(list(groups)))}")
    raise InvalidRequest(f"field 'model': required, several models are served: {', '.join(served_names(alive))}")
