"""LISA-family language-guided segmentation (LISA, FSVLM): a chat model's ``[SEG]`` prompts
a SAM mask decoder.

Modules, one component each (segment-anything's ``modeling/`` layout): :mod:`.cards` (model
cards), :mod:`.config` (config.json as plain JSON), :mod:`.tokenizer` (LLaMA SentencePiece +
the added ``[SEG]`` / image markers), :mod:`.prompt` (llava_v1 with the image markers),
:mod:`.network` (:class:`LisaNet`, the published key names), :mod:`.convert` (merged and
unmerged LoRA layouts), :mod:`.model` (:class:`LisaSeg`, the
:class:`~rsvl.models.segchat.SegChatModel`), :mod:`.loss` (FSVLM's mask losses) and
:mod:`.build` (``build`` / ``load`` / ``fetch``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rsvl.models.cards import ModelCard
from rsvl.models.lisa.build import build, fetch, load_lisa
from rsvl.models.lisa.cards import CARDS
from rsvl.models.lisa.model import LisaSeg
from rsvl.models.lisa.network import LisaNet


def load(card: ModelCard | str, weights: str | Path | None = None, device: str = "cpu", **options: Any) -> LisaSeg:
    """A LISA / FSVLM folder as a :class:`LisaSeg` (see :func:`load_lisa` for the options:
    ``vision_tower``, ``dtype``, ``lora_alpha``)."""
    return load_lisa(card, weights, device, **options)


__all__ = ["CARDS", "LisaNet", "LisaSeg", "build", "fetch", "load", "load_lisa"]
