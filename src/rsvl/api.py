"""The Python API: ``rsvl.load(name)`` gives a model ready for the tasks.

    import rsvl
    model = rsvl.load("mini-clip")                 # built in, offline
    model = rsvl.load("farslip2-vit-b16")          # from the cache, or --weights PATH
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

DEFAULT_MODEL = "mini-clip"


def load(name: str = DEFAULT_MODEL, *, weights: str | Path | None = None, device: str = "cpu", **kwargs: Any) -> Any:
    """Load a registered model by name (``rsvl models`` lists them).

    ``weights`` is a local checkpoint to use instead of the card's file (nothing is
    downloaded then). Unknown names raise :class:`rsvl.errors.UnknownModelError` with close
    matches; missing weights raise :class:`rsvl.errors.WeightsNotFoundError` saying which
    file to place where.
    """
    from rsvl.models.registry import get_card

    card = get_card(name)
    if not card.loader:
        from rsvl.errors import UnknownModelError

        raise UnknownModelError(f"model {card.name} has no loader yet.", hint="Run `rsvl models` to see what loads.")
    module, _, func = card.loader.partition(":")
    loader = getattr(importlib.import_module(module), func)
    model = loader(card, weights=weights, device=device, **kwargs)
    if not getattr(model, "name", None):
        model.name = card.name
    return model
