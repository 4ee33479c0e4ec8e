"""The RS CLIP family: every open_clip-format model (FarSLIP, RemoteCLIP, GeoRSCLIP, SkyCLIP,
OpenAI CLIP) behind rsvl's image-text interface.

Modules, one concern each:

* :mod:`~rsvl.models.clip.cards`: the published cards (pure data);
* :mod:`~rsvl.models.clip.layout`: checkpoint layouts (reading, key normalisation,
  description, Long-CLIP 248-position tables);
* :mod:`~rsvl.models.clip.network`: building the open_clip network, strict loading;
* :mod:`~rsvl.models.clip.dense`: dense features (the modified last block used for OVSS);
* :mod:`~rsvl.models.clip.model`: :class:`ClipModel`, the runtime wrapper the tasks use;
* :mod:`~rsvl.models.clip.factory`: ``build`` and ``load`` by name or card.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from rsvl.models.cards import ModelCard
from rsvl.models.clip.cards import CARDS
from rsvl.models.lazy import lazy_names

if TYPE_CHECKING:
    from rsvl.models.clip.model import ClipModel

#: the family's names and the module of each: they import open_clip (and with it torchvision,
#: torch._dynamo and transformers), so they are imported on first use (rsvl.models.lazy)
__getattr__ = lazy_names(__name__, {
    "DENSE_ATTENTIONS": "dense", "last_block_attention": "dense",
    "architecture_card": "factory", "build": "factory", "card_for": "factory", "load_clip": "factory",
    "LONG_CLIP_KEEP": "layout", "describe_state_dict": "layout", "long_clip_positional_tables": "layout",
    "read_checkpoint": "layout", "to_long_text_state_dict": "layout",
    "ClipModel": "model", "from_open_clip": "model", "build_clip": "network",
})


def load(card: ModelCard, weights: str | Path | None = None, device: str = "cpu", **options: Any) -> ClipModel:
    """A published (or user-trained) open_clip checkpoint as a :class:`ClipModel`
    (``options``: ``dtype``, ``quick_gelu``, ``model_cfg``; see :func:`load_clip`)."""
    return __getattr__("load_clip")(card, weights, device, **options)


__all__ = [
    "CARDS",
    "DENSE_ATTENTIONS",
    "LONG_CLIP_KEEP",
    "ClipModel",
    "architecture_card",
    "build",
    "build_clip",
    "card_for",
    "describe_state_dict",
    "from_open_clip",
    "last_block_attention",
    "load",
    "load_clip",
    "long_clip_positional_tables",
    "read_checkpoint",
    "to_long_text_state_dict",
]
