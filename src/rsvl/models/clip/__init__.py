"""The RS CLIP family: every open_clip-format model (FarSLIP, RemoteCLIP, GeoRSCLIP, SkyCLIP,
OpenAI CLIP) behind rsvl's image-text interface."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import open_clip

from rsvl.models.cards import ModelCard
from rsvl.models.clip.cards import CARDS, open_clip_architecture_card
from rsvl.models.clip.model import ClipModel, load_clip


def architecture_card(name: str) -> ModelCard | None:
    """An unregistered card for a bare open_clip architecture name (``--model ViT-S-32
    --weights final.pt``, e.g. the output of ``rsvl train clip``), with the input size and
    context length of open_clip's config; None when open_clip has no such architecture."""
    card = open_clip_architecture_card(name, list(open_clip.list_models()))
    if card is None:
        return None
    cfg = open_clip.get_model_config(card.architecture) or {}
    size = cfg.get("vision_cfg", {}).get("image_size", card.image_size)
    ctx = cfg.get("text_cfg", {}).get("context_length", card.context_length)
    return replace(card, image_size=int(size if isinstance(size, int) else size[0]), context_length=ctx)


def load(card: ModelCard, weights: str | Path | None = None, device: str = "cpu", **options: Any) -> ClipModel:
    """A published (or user-trained) open_clip checkpoint as a :class:`ClipModel`."""
    return load_clip(card, weights, device, **options)


__all__ = ["CARDS", "ClipModel", "architecture_card", "load"]
