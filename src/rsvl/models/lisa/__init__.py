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
from typing import TYPE_CHECKING, Any

from rsvl.models.cards import ModelCard
from rsvl.models.lazy import lazy_names
from rsvl.models.lisa.cards import CARDS

if TYPE_CHECKING:
    from rsvl.models.lisa.model import LisaSeg

#: the family's names and the module of each: ``build`` imports transformers and the LLaVA
#: family, so they are imported on first use (rsvl.models.lazy)
__getattr__ = lazy_names(__name__, {
    "build": "build", "fetch": "build", "load_lisa": "build", "LisaSeg": "model", "LisaNet": "network",
})


def load(card: ModelCard | str, weights: str | Path | None = None, device: str = "cpu", **options: Any) -> LisaSeg:
    """A LISA / FSVLM folder as a :class:`LisaSeg` (see :func:`load_lisa` for the options:
    ``vision_tower``, ``dtype``, ``lora_alpha``)."""
    return __getattr__("load_lisa")(card, weights, device, **options)


__all__ = ["CARDS", "LisaNet", "LisaSeg", "build", "fetch", "load", "load_lisa"]
