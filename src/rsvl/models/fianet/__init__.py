"""FIANet referring segmentation (Swin-B + BERT, LAVT decoder)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rsvl.models.cards import ModelCard
from rsvl.models.fianet.cards import CARDS
from rsvl.models.fianet.model import FianetModel, load_fianet


def load(card: ModelCard, weights: str | Path | None = None, device: str = "cpu", **options: Any) -> FianetModel:
    """A FIANet training checkpoint."""
    return load_fianet(card, weights, device, **options)


__all__ = ["CARDS", "FianetModel", "load"]
