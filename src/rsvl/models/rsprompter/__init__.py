"""RSPrompter (anchor, query), SAM-seg and SAM-det on rsvl's SAM."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rsvl.models.cards import ModelCard
from rsvl.models.rsprompter.cards import CARDS
from rsvl.models.rsprompter.model import load_prompter_model


def load(card: ModelCard, weights: str | Path | None = None, device: str = "cpu", **options: Any) -> Any:
    """A trained RSPrompter-family checkpoint (MMDetection or rsvl layout)."""
    return load_prompter_model(card, weights, device, **options)


__all__ = ["CARDS", "load"]
