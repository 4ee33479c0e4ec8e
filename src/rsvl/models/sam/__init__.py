"""Segment Anything: one implementation for every family that builds on SAM, loading Meta's
and Hugging Face's checkpoint layouts."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rsvl.models.cards import ModelCard
from rsvl.models.sam.cards import CARDS
from rsvl.models.sam.model import Sam, load_sam_model


def load(card: ModelCard, weights: str | Path | None = None, device: str = "cpu", **options: Any) -> Sam:
    """A published SAM checkpoint (Meta or transformers layout)."""
    return load_sam_model(card, weights, device, **options)


__all__ = ["CARDS", "Sam", "load"]
